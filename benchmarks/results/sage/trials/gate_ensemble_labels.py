"""Dev trial: the gate trained on pseudo-labels clustered from the K LoRA experts' concatenated
embeddings (the ensemble, used at training time only) instead of the uniform mix's own."""

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lorex.adaptation.pseudo_labels import PseudoLabeler, centroids
from lorex.adaptation.sage import objectives as plt
from lorex.adaptation.sage.config import SageConfig
from lorex.adaptation.sage.merged_model import gated_model, train_gate
from lorex.data.reid import load_reid_data
from lorex.metrics.reid import reid_scores as evaluate
from lorex.models import load_model
from lorex.training.evaluation import evaluate_reid, reid_embeddings

torch.set_num_threads(2)
dev = torch.device("cpu")
root = Path("benchmarks/results/sage")
targets = sys.argv[1].split(",")
out = {}
for t in targets:
    t0 = time.time()
    names = [s for s in "abcd" if s != t]
    sources = [root / "sources" / s for s in names]
    experts = [root / "targets" / t / "work" / "experts" / s for s in names]
    data = load_reid_data(f"reid/{t}")
    images = data.train.images
    cfg = SageConfig()
    ens = []
    q_g = []
    for e in experts:
        m = load_model(e, dev)
        ens.append(reid_embeddings(m, images, device=dev).numpy())
        q_g.append(
            (
                reid_embeddings(m, data.query.images, device=dev).numpy(),
                reid_embeddings(m, data.gallery.images, device=dev).numpy(),
            )
        )
    if "--with-mix" in sys.argv:  # gate-ensemble-labels-with-mix.json
        uni = gated_model(sources, experts, names, "light", dev)
        ens.append(reid_embeddings(uni, images, device=dev).numpy())
    feats = np.concatenate(ens, 1) / np.sqrt(len(ens))
    qf = np.concatenate([q for q, _ in q_g], 1) / np.sqrt(len(q_g))
    gf = np.concatenate([g for _, g in q_g], 1) / np.sqrt(len(q_g))
    r = evaluate(
        2 - 2 * qf @ gf.T, data.query.ids, data.gallery.ids, data.query.cams, data.gallery.cams
    )
    res = {"ensemble": {"mAP": float(r["mAP"]), "rank1": float(r["cmc"][0])}}
    labeler = PseudoLabeler(cfg.k1, cfg.k2, cfg.rho, cfg.min_samples)
    ens_labels, num = labeler(feats)
    res["ensemble_clusters"] = int(num)

    def relabel_from_ensemble(model, imgs, lab, device, labeler=labeler, ens_labels=ens_labels):
        lab.eps = labeler.eps
        own = reid_embeddings(model, imgs, device=device).numpy()
        cents = centroids(own, ens_labels)
        plt.set_centroid_classifier(model, cents)
        return ens_labels, cents

    orig = plt.relabel
    for kind in ("published", "light"):
        for mode in ("own", "ensemble"):
            plt.relabel = relabel_from_ensemble if mode == "ensemble" else orig
            model = gated_model(sources, experts, names, kind, dev)
            if mode == "own" and kind == "light":
                res["uniform"] = {k: evaluate_reid(model, data, dev)[k] for k in ("mAP", "rank1")}
            train_gate(model, images, cfg, dev, progress=False)
            res[f"{kind}-{mode}"] = {
                k: evaluate_reid(model, data, dev)[k] for k in ("mAP", "rank1")
            }
            print(t, kind, mode, round(res[f"{kind}-{mode}"]["mAP"] * 100, 2), flush=True)
    plt.relabel = orig
    res["seconds"] = time.time() - t0
    out[t] = res
    print(
        t,
        json.dumps(
            {k: (round(v["mAP"] * 100, 2) if isinstance(v, dict) else v) for k, v in res.items()}
        ),
        flush=True,
    )
    Path("/tmp/sage_ens.json").write_text(json.dumps(out, indent=1))
