"""The teacher trial on rgbd k1->k2 (teacher.log): one translator, then the target model with each
teacher variant.

Usage: python teacher_dev.py rgbd_k1_rgb rgbd/k2 rgbd/ti socket,trans,twobal SEED
"""

import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lorex.adaptation.cross_modal.config import CrossModalConfig
from lorex.adaptation.cross_modal.objectives import train_target_model, train_translator
from lorex.adaptation.cross_modal.pipeline import _source_statistics
from lorex.adaptation.cross_modal.tgmb import translate
from lorex.adaptation.cross_modal.transfer import features_and_logits
from lorex.data.paired import load_paired
from lorex.models import load_model

torch.set_num_threads(2)
src = Path("benchmarks/results/cross_modal/sources") / sys.argv[1]  # run from the repo root
target, ti = sys.argv[2], sys.argv[3]
variants = sys.argv[4].split(",")
dev = torch.device("cpu")
cfg = CrossModalConfig(
    epochs=6, max_target_samples=1200, seed=int(sys.argv[5]) if len(sys.argv) > 5 else 0
)
model = load_model(src, dev)
model.requires_grad_(False)
tr = load_paired(target, "train", with_rgb=False, max_samples=1200)
tip = load_paired(ti, "train", with_rgb=True, seed=0)
x, tit, tirgb = tr.target_tensor(), tip.target_tensor(), tip.rgb_tensor()
tif, _ = features_and_logits(model, tirgb, dev)
stats, _ = _source_statistics(model, src, tirgb, dev)
t0 = time.time()
net, _ = train_translator(model, tit, tirgb, x, cfg, dev, False, tif)
_, lt = features_and_logits(model, translate(net, x, dev), dev)
_, lr_ = features_and_logits(model, x, dev)
print("translator", time.time() - t0, flush=True)


def bal(p):
    q = p / p.mean(0, keepdim=True)
    return q / q.sum(1, keepdim=True)


pt, pr = F.softmax(lt, 1), F.softmax(lr_, 1)
teachers = {
    "trans": pt,
    "bal": bal(pt),
    "two": (pt + pr) / 2,
    "twobal": bal((pt + pr) / 2),
    "raw": pr,
}
y = tr.labels
for k, p in teachers.items():
    print(
        f"teacher {k}: acc {(p.argmax(1).numpy() == y).mean():.4f}",
        f"marg {np.round(p.mean(0).numpy(), 2)}",
        flush=True,
    )
for v in variants:
    t0 = time.time()
    c = cfg
    if v == "socket":
        c, tl = replace(cfg, kd_weight=0.0), None
    else:
        tl = torch.log(teachers[v].clamp_min(1e-8))
    m, res = train_target_model(
        model,
        x,
        c,
        dev,
        ti_target=tit,
        ti_source_features=tif,
        teacher_logits=tl,
        source_stats=stats,
        progress=False,
    )
    _, lg = features_and_logits(m, x, dev)
    print(
        f"== {v}: acc {(lg.argmax(1).numpy() == y).mean():.4f} ({time.time() - t0:.0f}s)",
        flush=True,
    )
