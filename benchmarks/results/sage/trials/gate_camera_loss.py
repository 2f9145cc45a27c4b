"""Dev trial: the gate trained to make the features camera-invariant as well.

`camera-spread.json` showed that, within each target, a model's between-camera share of feature
variance (0: the cameras' mean features coincide) ranks the models nearly as their test mAP.
Target camera ids are metadata a re-ID method may read (Market-1501's file names carry them).
Here each of 41 gate steps adds that share, measured on 128 random target train images, to the
pseudo-label loss; both terms are divided by their first value, so neither weight was chosen.

    python benchmarks/results/sage/trials/gate_camera_loss.py a,b,c,d pl+cam|cam|pl
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lorex.adaptation.pseudo_labels import PseudoLabeler
from lorex.adaptation.sage.config import SageConfig
from lorex.adaptation.sage.merged_model import gate_optimizer, gated_model
from lorex.adaptation.sage.relabel import cycle_batches as _cycle
from lorex.adaptation.sage.relabel import reid_head, relabel
from lorex.adapters.gated import mark_gate_trainable
from lorex.data.reid import PKSampler, load_reid_data
from lorex.training.batches import as_float, chw_tensor
from lorex.training.evaluation import evaluate_reid
from lorex.training.objectives.reid import augment_batch
from lorex.training.reid_losses import batch_hard_soft_triplet, label_smoothed_cross_entropy

torch.set_num_threads(2)
dev = torch.device("cpu")
root = Path("benchmarks/results/sage")
targets, mode = sys.argv[1].split(","), sys.argv[2]
kinds = sys.argv[3].split(",") if len(sys.argv) > 3 else ["light"]
out_path = root / "trials" / "gate-camera-loss.json"
out = json.loads(out_path.read_text()) if out_path.exists() else {}


def camera_share(emb: torch.Tensor, cams: torch.Tensor) -> torch.Tensor:
    x = F.normalize(emb, dim=1)
    mu = x.mean(0)
    total = (x - mu).square().sum(1).mean()
    between = sum(
        (cams == c).float().mean() * (x[cams == c].mean(0) - mu).square().sum()
        for c in cams.unique()
    )
    return between / total


def train(model, data, cfg):
    head = reid_head(model)
    params = mark_gate_trainable(model.backbone)
    model.heads.requires_grad_(False)
    optimizer, _ = gate_optimizer(model, cfg.gate_lr)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    images, cams = data.train.images, torch.from_numpy(data.train.cams)
    x = chw_tensor(images)
    labels, _ = relabel(model, images, PseudoLabeler(cfg.k1, cfg.k2, cfg.rho, cfg.min_samples), dev)
    keep = np.flatnonzero(labels >= 0)
    sampler = PKSampler(labels[keep], cfg.batch_size // cfg.num_instances, cfg.num_instances, 1)
    batches = [keep[b] for b in _cycle(sampler, cfg.gate_iters)]
    model.train()
    head.bn.eval()
    first = {}
    for idx in batches:
        loss = 0.0
        if mode in ("pl", "pl+cam"):
            batch = augment_batch(as_float(x[torch.from_numpy(idx)], dev), gen, None)
            feats = model.features(batch)
            target = torch.from_numpy(labels[idx])
            pl = label_smoothed_cross_entropy(head(feats), target, cfg.label_smoothing)
            pl = pl + batch_hard_soft_triplet(feats, target)
            first.setdefault("pl", pl.item())
            loss = loss + pl / first["pl"]
        if mode in ("cam", "pl+cam"):
            rows = torch.from_numpy(rng.choice(len(images), 128, replace=False))
            emb = head.bn(model.features(as_float(x[rows], dev)))
            cam = camera_share(emb, cams[rows])
            first.setdefault("cam", cam.item())
            loss = loss + cam / first["cam"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    model.eval()


for t in targets:
    names = [s for s in "abcd" if s != t]
    sources = [root / "sources" / s for s in names]
    experts = [root / "targets" / t / "work" / "experts" / s for s in names]
    data = load_reid_data(f"reid/{t}")
    cfg = SageConfig()
    res = out.setdefault(t, {})
    for kind in kinds:
        t0 = time.time()
        model = gated_model(sources, experts, names, kind, dev)
        train(model, data, cfg)
        r = evaluate_reid(model, data, dev)
        res[f"{mode}/{kind}"] = {
            "mAP": round(100 * r["mAP"], 2),
            "rank1": round(100 * r["rank1"], 2),
            "seconds": round(time.time() - t0),
        }
        print(t, mode, kind, res[f"{mode}/{kind}"], flush=True)
        out_path.write_text(json.dumps(out, indent=1))
