"""``lorex bench`` and ``lorex demo``: the experiments that train (or reuse) experts and report.

The only CLI module that imports the demo and the benchmarks, so they can move in one place.
Each is called through its module (``demo.run_demo``), as tests replace those functions there.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from lorex.backbones import PRESETS
from lorex.cli.common_flags import add_device_flag, add_seed_flag
from lorex.cli.parsing import Parser
from lorex.data import load_dataset
from lorex.experiments import cross_modal_bench, demo, losa_bench, losa_report, sage_bench
from lorex.experiments.merge_bench import SMALL_LR, merge_quick_checks, write_merge_report
from lorex.experiments.settings import FULL, QUICK
from lorex.io import read_json
from lorex.metrics.agreement import read_full_results
from lorex.training.records import run_record


def cmd_bench_merge(args: argparse.Namespace) -> int:
    settings = replace(
        QUICK if args.quick else FULL,
        merge_kinds=("full", "frozen-head", "frozen-head-small-lr", "lora"),
        merge_methods=None,
        frozen_head_experts=True,
        small_lr=SMALL_LR,
        reid=False,  # the merge bench needs the digit experts only
        cross_modal=False,
    )
    out = args.out / "demo"
    demo.run_demo(out, device=args.device, seed=args.seed, settings=settings)
    results = read_json(out / "metrics.json")["merge"]
    results["run"] = run_record("bench merge", None, quick=args.quick, seed=args.seed)
    checks = None
    if args.quick:
        images = {d.split("/")[-1]: len(load_dataset(d, "test")) for d in settings.domains}
        full = read_full_results(args.full_results)
        checks = merge_quick_checks(results, full, images, str(args.full_results))
    report = write_merge_report(
        results,
        args.out,
        f"Merging the digit-domain experts ({'quick' if args.quick else 'full'})",
        checks,
    )
    print(f"wrote {report}")
    return 0


def cmd_bench_losa(args: argparse.Namespace) -> int:
    results = losa_bench.run_bench(
        args.out, quick=args.quick, seed=args.seed, resume=not args.fresh
    )
    results["run"] = run_record("bench losa", None, quick=args.quick, seed=args.seed)
    if args.quick:
        results["quick_checks"] = losa_report.quick_checks(
            results, read_full_results(args.full_results), str(args.full_results)
        )
    print(f"wrote {losa_report.write_report(results, args.out)}")
    return 0


def _run_options(args: argparse.Namespace) -> dict:
    """What the SAGE and cross-modal benches take from their flags."""
    return {
        "quick": args.quick,
        "seed": args.seed,
        "device": args.device,
        "full_results": args.full_results,
    }


def cmd_bench_sage(args: argparse.Namespace) -> int:
    summary = sage_bench.run_sage_bench(args.out, **_run_options(args))
    g = summary["goals"]
    print(
        f"gated beats every LoRA expert and the uniform mix on {g['gated_wins']} of "
        f"{g['targets']} targets (light gate: {g['gated_light_wins']})"
    )
    print(f"wrote {args.out / 'results.md'}")
    return 0


def cmd_bench_cross_modal(args: argparse.Namespace) -> int:
    summary = cross_modal_bench.run_cross_modal_bench(args.out, **_run_options(args))
    for method, value in summary["goals"]["mean_accuracy"].items():
        print(f"{method:>18}: mean accuracy {100 * value:5.1f}")
    print(f"wrote {args.out / 'results.md'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    report = demo.run_demo(
        args.out, quick=args.quick, device=args.device, seed=args.seed, preset=args.preset
    )
    print(f"wrote {report}")
    return 0


@dataclass(frozen=True)
class Bench:
    """One ``lorex bench`` subcommand: its function, its committed full results (the folder
    under benchmarks/results/), what OUT holds, what --quick runs, and its help."""

    func: Callable[[argparse.Namespace], int]
    results: str
    out_help: str
    quick_help: str
    help: str


BENCHES = {
    "merge": Bench(
        cmd_bench_merge,
        "merge-full",
        "results and the demo it builds on",
        "the quick demo's experts (minutes)",
        "merge the digit experts (full and LoRA) with every method, per task",
    ),
    "losa": Bench(
        cmd_bench_losa,
        "losa",
        "results.json, results.md, PNG",
        "5 epochs from the quick demo's base, a few steps at ViT-B size (minutes)",
        "LoSA against LoRA and full fine-tuning: accuracy, parameters, memory, time, "
        "latency, and the deepest backbone under a memory cap (CPU)",
    ),
    "sage": Bench(
        cmd_bench_sage,
        "sage",
        "results.json, results.md, PNG",
        "one target, small settings (minutes)",
        "SAGE-reID leave-one-domain-out on reid/a..reid/d: every variant's mAP, rank-1, "
        "mINP, gate weights and inference cost",
    ),
    "cross-modal": Bench(
        cmd_bench_cross_modal,
        "cross_modal",
        "results.json, results.md, PNG",
        "two tasks, small settings (minutes)",
        "source-only, SHOT, SOCKET, TGMB + TGKT and ablations on the built-in RGB -> depth "
        "and RGB -> NIR tasks (same- and cross-sensor)",
    ),
}


def add_bench(sub: argparse._SubParsersAction) -> None:
    parent = sub.add_parser("bench", help="benchmarks that train (or reuse) experts and report")
    bench_sub = parent.add_subparsers(dest="what", required=True, parser_class=Parser)
    for name, bench in BENCHES.items():
        p = bench_sub.add_parser(name, help=bench.help)
        p.add_argument("--out", required=True, type=Path, help=bench.out_help)
        p.add_argument("--quick", action="store_true", help=bench.quick_help)
        add_seed_flag(p)
        default = Path("benchmarks") / "results" / bench.results / "results.json"
        p.add_argument(
            "--full-results",
            type=Path,
            default=default,
            help="a full run's results.json that a --quick run compares its order with "
            f"({default})",
        )
        if bench.func is cmd_bench_losa:  # CPU only; resumes from its saved jobs instead
            p.add_argument(
                "--fresh",
                action="store_true",
                help="rerun every job (default: reuse the answers a stopped run saved in "
                "OUT/jobs/)",
            )
        else:
            add_device_flag(p)
        p.set_defaults(func=bench.func)


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="the built-in story: pretrain, one expert per digit domain, report"
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument(
        "--quick",
        action="store_true",
        help="fewer epochs and samples (under 5 minutes on 2 cores from an empty cache; README)",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), help="backbone preset (default vit-micro)")
    add_seed_flag(p)
    add_device_flag(p)
    p.set_defaults(func=cmd_demo)
