"""Experiment: are experts fine-tuned under a frozen head easier to merge?

The Task Arithmetic line of work fine-tunes each expert with its classification head frozen (the
zero-shot head from CLIP's text encoder). The demo's full experts instead train a fresh head with
the backbone. Here each digit expert starts from the quick demo's base and its linear-probe head,
keeps that head frozen and fine-tunes the backbone (5 epochs, 2,000 images, lr 1e-3, as the demo's
full experts); then every merge method runs on the four experts.

    python benchmarks/merge_frozen_head.py --demo runs/demo-quick --out benchmarks/results
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from lorex.data import DIGIT_DOMAINS, load_dataset
from lorex.demo import QUICK, run_demo, short
from lorex.io import read_json, write_json
from lorex.merging.bench import METHOD_ORDER, merge_table, score_merges
from lorex.models import LorexModel, load_model, save_model
from lorex.training.loop import TrainConfig, fit
from lorex.training.methods import FullFinetune
from lorex.training.run import evaluate, run_record


class FrozenHeadFinetune(FullFinetune):
    """Every backbone parameter trains; the (probe) head stays as it is."""

    name = "full-frozen-head"

    def prepare(self, model: LorexModel) -> None:
        model.requires_grad_(True)
        model.heads.requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--demo", type=Path, required=True, help="a quick demo folder (made if absent)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if not (args.demo / "metrics.json").is_file():
        run_demo(args.demo, quick=True)
    work = args.demo / "frozen-head"
    if not (work / "base").exists():
        shutil.copytree(args.demo / "base", work / "base")
    domains = list(DIGIT_DOMAINS)
    cfg = TrainConfig(
        epochs=QUICK.expert_epochs, lr=QUICK.full_lr, max_samples=QUICK.expert_samples
    )
    for domain in domains:
        target = work / "experts" / short(domain) / "full"
        if (target / "metrics.json").is_file():
            continue
        model = load_model(args.demo / "experts" / short(domain) / "linear")  # base + probe head
        train = load_dataset(domain, "train", cfg.max_samples, cfg.seed)
        fit(model, FrozenHeadFinetune(), train, cfg)
        accuracy = evaluate(model, load_dataset(domain, "test"))
        save_model(model, target, extra_files={"metrics.json": {"accuracy": accuracy}})
    frozen = score_merges(work, work / "merged", domains, "full", methods=METHOD_ORDER)
    demo_merge = read_json(args.demo / "metrics.json")["merge"]["full"]
    record = {
        "benchmark": "merge_frozen_head",
        "frozen_head_experts": frozen,
        "demo_experts_fast_methods": demo_merge,
        "run": run_record("merge_frozen_head", cfg),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "merge_frozen_head.json", record)
    (args.out / "merge_frozen_head.md").write_text(
        "# Merging experts fine-tuned under a frozen linear-probe head (quick demo base)\n\n"
        + merge_table(frozen)
        + "\n\nThe demo's own full experts (head trained with the backbone), same base, data:\n\n"
        + merge_table(demo_merge)
        + "\n"
    )
    print((args.out / "merge_frozen_head.md").read_text())


if __name__ == "__main__":
    main()
