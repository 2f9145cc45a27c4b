"""Dev trial: what each stage-2 LoRA expert does on the averaged backbone, and experts re-based
onto it.

- ``original``: each LoRA expert alone on the averaged backbone (the other experts' B zeroed, its
  own scaled by K so the gate at initialisation gives it weight 1).
- ``rebased RANKS``: each expert's branch replaced by the best rank-R approximation of
  ``W_source + s B A - W_avg`` (truncated SVD per adapted matrix), so that on the averaged backbone
  it reproduces its own expert's matrices, not a LoRA trained on another backbone (the "naive
  averaging" limitation the SAGE brief names); then each alone, the uniform mix, and the light
  gate trained as the default (one clustering, 41 steps).

    python benchmarks/results/sage/trials/experts_on_averaged_backbone.py a,b,c,d original
    python benchmarks/results/sage/trials/experts_on_averaged_backbone.py a,b,c,d rebased 8
"""

import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from lorex.adaptation.pseudo_labels import PseudoLabeler
from lorex.adaptation.sage.config import SageConfig
from lorex.adaptation.sage.merged_model import gate_optimizer, gated_model
from lorex.adaptation.sage.objectives import train_on_pseudo_labels
from lorex.adapters.gated import mark_gate_trainable
from lorex.adapters.gated.layer import GatedLoraLinear
from lorex.data.reid import load_reid_data
from lorex.models import load_model
from lorex.training.evaluation import evaluate_reid

torch.set_num_threads(2)
dev = torch.device("cpu")
root = Path("benchmarks/results/sage")
targets, mode = sys.argv[1].split(","), sys.argv[2]
ranks = [int(r) for r in sys.argv[3].split(",")] if mode == "rebased" else [None]
out_path = root / "trials" / "experts-on-averaged-backbone.json"
out = json.loads(out_path.read_text()) if out_path.exists() else {}


def rebase(model, sources, rank):
    states = [load_model(s).backbone.state_dict() for s in sources]
    for name, m in model.backbone.named_modules():
        if not isinstance(m, GatedLoraLinear):
            continue
        w_avg = m.base_layer.weight.detach().double()
        new_a, new_b = [], []
        for k, state in enumerate(states):
            low_rank = m.scaling * (m.lora_B[k].double() @ m.lora_A[k].double())
            delta = state[name + ".weight"].double() - w_avg + low_rank
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            new_b.append((u[:, :rank] * s[:rank] / m.scaling).float())
            new_a.append(vh[:rank].float())
        m.lora_A = nn.Parameter(torch.stack(new_a), requires_grad=False)
        m.lora_B = nn.Parameter(torch.stack(new_b), requires_grad=False)
        m.r = rank


def only(model, k):
    with torch.no_grad():
        for m in model.backbone.modules():
            if isinstance(m, GatedLoraLinear):
                keep = m.lora_B[k].clone() * m.lora_B.shape[0]
                m.lora_B.zero_()
                m.lora_B[k] = keep


def mean_ap(model, data):
    return round(100 * evaluate_reid(model, data, dev)["mAP"], 2)


for t in targets:
    names = [s for s in "abcd" if s != t]
    sources = [root / "sources" / s for s in names]
    experts = [root / "targets" / t / "work" / "experts" / s for s in names]
    data = load_reid_data(f"reid/{t}")
    cfg = SageConfig()
    for rank in ranks:
        t0 = time.time()
        res = {}
        for k, n in enumerate(names):
            model = gated_model(sources, experts, names, "light", dev)
            if rank:
                rebase(model, sources, rank)
            only(model, k)
            res[f"alone/{n}"] = mean_ap(model, data)
        if rank:
            model = gated_model(sources, experts, names, "light", dev)
            rebase(model, sources, rank)
            res["uniform"] = mean_ap(model, data)
            params = mark_gate_trainable(model.backbone)
            model.heads.requires_grad_(False)
            train_on_pseudo_labels(
                model,
                data.train.images,
                PseudoLabeler(cfg.k1, cfg.k2, cfg.rho, cfg.min_samples),
                params,
                lambda total, model=model, cfg=cfg: gate_optimizer(model, cfg.gate_lr),
                cfg,
                epochs=1,
                iters=cfg.gate_iters,
                device=dev,
                progress=False,
                freeze_neck=True,
            )
            res["gated-light"] = mean_ap(model, data)
        res["seconds"] = round(time.time() - t0)
        out.setdefault(t, {})[f"rebased-rank{rank}" if rank else "original"] = res
        print(t, rank, res, flush=True)
        out_path.write_text(json.dumps(out, indent=1))
