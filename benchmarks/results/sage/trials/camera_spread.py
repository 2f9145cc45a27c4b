"""Dev trial: is a label-free signal of target quality hidden in the cameras? Each model's
pseudo-label clusters on the target train split (the method's own clustering), and how many
cameras each cluster spans: a re-ID feature that groups by camera instead of by person makes
single-camera clusters. Target camera ids are metadata the method may read (Market-1501 file
names carry them); identities are not read here, only the saved test mAP for comparison.

    python benchmarks/results/sage/trials/camera_spread.py a,b,c,d
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

from lorex.adaptation.pseudo_labels import PseudoLabeler
from lorex.adaptation.sage.merged_model import gated_model
from lorex.data.reid import load_reid_data
from lorex.models import load_model
from lorex.training.evaluation import reid_embeddings

torch.set_num_threads(2)
dev = torch.device("cpu")
root = Path("benchmarks/results/sage")
bench = json.loads((root / "results.json").read_text())
out_path = root / "trials" / "camera-spread.json"
out = json.loads(out_path.read_text()) if out_path.exists() else {}


def camera_share(feats: torch.Tensor, cams: np.ndarray) -> float:
    """Between-camera share of the (normalised) features' variance: 0 if the cameras' means
    coincide, 1 if each camera is a point."""
    x = torch.nn.functional.normalize(feats.double(), dim=1)
    mu = x.mean(0)
    total = (x - mu).square().sum(1).mean()
    between = sum(
        (cams == c).mean() * (x[torch.from_numpy(cams == c)].mean(0) - mu).square().sum()
        for c in np.unique(cams)
    )
    return round(float(between / total), 4)


def spread(labels: np.ndarray, cams: np.ndarray) -> dict:
    keep = labels >= 0
    entropies, single = [], 0
    n_cams = len(np.unique(cams))
    for c in np.unique(labels[keep]):
        _, counts = np.unique(cams[labels == c], return_counts=True)
        p = counts / counts.sum()
        entropies.append(float(-(p * np.log(p)).sum() / np.log(n_cams)))
        single += len(counts) == 1
    clusters = max(1, len(entropies))
    return {
        "clustered": round(float(keep.mean()), 3),
        "clusters": len(entropies),
        "camera_entropy": round(float(np.mean(entropies)) if entropies else 0.0, 3),
        "single_camera_clusters": round(single / clusters, 3),
    }


for t in sys.argv[1].split(","):
    names = [s for s in "abcd" if s != t]
    sources = [root / "sources" / s for s in names]
    experts = [root / "targets" / t / "work" / "experts" / s for s in names]
    data = load_reid_data(f"reid/{t}")
    models = {f"direct/{n}": load_model(s, dev) for n, s in zip(names, sources, strict=True)}
    models |= {f"lora/{n}": load_model(e, dev) for n, e in zip(names, experts, strict=True)}
    models["uniform"] = gated_model(sources, experts, names, "light", dev)
    res = {}
    for label, model in models.items():
        feats = reid_embeddings(model, data.train.images, device=dev)
        pl = PseudoLabeler()(feats)
        res[label] = spread(pl.labels, data.train.cams) | {
            "camera_share": camera_share(feats, data.train.cams),
            "mAP": round(100 * bench[f"reid/{t}"][label]["mAP"], 1),
        }
        print(t, label, res[label], flush=True)
    out[t] = res
    out_path.write_text(json.dumps(out, indent=1))
