"""Dev trial (2026-11-26): frozen-head experts fine-tuned with a smaller step; do they merge better?

Trains each digit domain's frozen-head expert at each LR from the bench's own base and linear
probes (``benchmarks/results/merge{,-full}/demo``, which ``lorex bench merge`` leaves behind),
under WORK, and merges each set with six methods at their defaults. Reads test labels: a record
of how the bench's "frozen-head-small-lr" kind was chosen, not a benchmark.

    python benchmarks/results/merge/trials/small_lr.py quick 3e-4,1e-4 /tmp/small-lr
    python benchmarks/results/merge/trials/small_lr.py full 1e-4,3e-4 /tmp/small-lr
"""

import json
import sys
import time
from pathlib import Path

from lorex.data import DIGIT_DOMAINS
from lorex.experiments.merge_bench import score_merges
from lorex.experiments.settings import FULL, QUICK
from lorex.experiments.stages import short
from lorex.training.config import TrainConfig
from lorex.training.expert_jobs import train_expert
from lorex.training.methods import TRAINING_METHODS as METHODS

size, lrs, work = sys.argv[1], [float(x) for x in sys.argv[2].split(",")], Path(sys.argv[3])
s = QUICK if size == "quick" else FULL
demo = Path("benchmarks/results/merge" + ("" if size == "quick" else "-full")) / "demo"
methods = tuple(
    (m, m, {}) for m in ("average", "task-arithmetic", "ties", "doge", "iso-c", "tsv-m")
)
out_path = Path(f"benchmarks/results/merge/trials/small-lr-{size}.json")
out = {}
for lr in lrs:
    root = work / f"{size}-lr{lr}"
    (root / "experts").mkdir(parents=True, exist_ok=True)
    if not (root / "base").exists():
        (root / "base").symlink_to((demo / "base").resolve())
    t0 = time.time()
    for d in DIGIT_DOMAINS:
        target = root / "experts" / short(d) / "frozen-head"
        if (target / "metrics.json").exists():
            continue
        cfg = TrainConfig(
            epochs=s.expert_epochs, batch_size=s.batch_size, lr=lr, seed=0,
            max_samples=s.expert_samples,
        )  # fmt: skip
        probe = demo / "experts" / short(d) / "linear"
        method = METHODS["full"]()
        train_expert(demo / "base", d, method, target, cfg, head_from=probe, freeze_head=True)
    train_s = time.time() - t0
    r = score_merges(root, root / "merged", list(DIGIT_DOMAINS), "frozen-head", methods)
    out[str(lr)] = r
    print(size, lr, "train", round(train_s), "experts", r["experts"], flush=True)
    for k, v in r.items():
        if k != "experts":
            print(f"   {k:16s} {v['average']:.1f} ({v['normalized']:.1f})", flush=True)
    out_path.write_text(json.dumps(out, indent=1))
