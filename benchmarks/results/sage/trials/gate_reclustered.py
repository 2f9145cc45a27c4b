"""Dev trial: the gate trained for several epochs, re-clustering the target with the current
gated model at each epoch's start (the default clusters once, by the uniform mix, for 41 steps).

    python benchmarks/results/sage/trials/gate_reclustered.py a,b,c,d EPOCHS
"""

import json
import sys
import time
from pathlib import Path

import torch

from lorex.adaptation.pseudo_labels import PseudoLabeler
from lorex.adaptation.sage.config import SageConfig
from lorex.adaptation.sage.merged_model import gate_optimizer, gated_model
from lorex.adaptation.sage.objectives import train_on_pseudo_labels
from lorex.adapters.gated import mark_gate_trainable
from lorex.data.reid import load_reid_data
from lorex.training.evaluation import evaluate_reid

torch.set_num_threads(2)
dev = torch.device("cpu")
root = Path("benchmarks/results/sage")
targets, epochs = sys.argv[1].split(","), int(sys.argv[2])
out_path = Path(f"benchmarks/results/sage/trials/gate-reclustered-{epochs}.json")
out = {}
for t in targets:
    t0 = time.time()
    names = [s for s in "abcd" if s != t]
    sources = [root / "sources" / s for s in names]
    experts = [root / "targets" / t / "work" / "experts" / s for s in names]
    data = load_reid_data(f"reid/{t}")
    cfg = SageConfig()
    res = {}
    for kind in ("published", "light"):
        model = gated_model(sources, experts, names, kind, dev)
        if kind == "light":
            res["uniform"] = {k: evaluate_reid(model, data, dev)[k] for k in ("mAP", "rank1")}
        params = mark_gate_trainable(model.backbone)
        model.heads.requires_grad_(False)
        train_on_pseudo_labels(
            model,
            data.train.images,
            PseudoLabeler(cfg.k1, cfg.k2, cfg.rho, cfg.min_samples),
            params,
            lambda total, model=model, cfg=cfg: gate_optimizer(model, cfg.gate_lr),
            cfg,
            epochs=epochs,
            iters=cfg.gate_iters,
            device=dev,
            progress=False,
            freeze_neck=True,
        )
        res[kind] = {k: evaluate_reid(model, data, dev)[k] for k in ("mAP", "rank1")}
        print(t, kind, round(res[kind]["mAP"] * 100, 2), flush=True)
    res["seconds"] = time.time() - t0
    out[t] = res
    print(t, json.dumps({k: (round(v["mAP"] * 100, 2) if isinstance(v, dict) else v)
                         for k, v in res.items()}), flush=True)  # fmt: skip
    out_path.write_text(json.dumps({"epochs": epochs, "gate_iters_per_epoch": 41, **out}, indent=1))
