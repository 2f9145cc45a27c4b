"""``lorex adapt``: experts to an unlabelled target domain (SAGE for re-ID and classification,
cross-modal transfer for RGB to depth or NIR). Their settings' flags come from the configs."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lorex.adaptation.cross_modal import CrossModalConfig, adapt_cross_modal
from lorex.adaptation.sage.classification import adapt_classification
from lorex.adaptation.sage.config import SageConfig
from lorex.adaptation.sage.pipeline import adapt_reid
from lorex.adaptation.sage.report import ordered_variants
from lorex.cli.common_flags import add_checkpoint_flags, add_device_flag, checkpoint_options
from lorex.cli.config_flags import add_config_flags, config_from_args
from lorex.cli.parsing import Parser


@dataclass(frozen=True)
class SageTarget:
    """One kind of SAGE target: its pipeline, how a variant's scores print, what OUT holds."""

    adapt: Callable[..., dict]
    scores: Callable[[dict], str]
    written: str
    help: str
    sources_help: str
    target_help: str


SAGE_TARGETS = {
    "reid": SageTarget(
        adapt_reid,
        lambda v: (
            f"mAP {100 * v['mAP']:5.1f}  rank-1 {100 * v['rank1']:5.1f}  "
            f"mINP {100 * v['mINP']:5.1f}  {v['infer_ms_per_image']:.3f} ms/image"
        ),
        "metrics.json, report.md",
        "SAGE-reID: per-source LoRA experts on target pseudo-labels, mixed by a gate on "
        "the averaged backbone (no source data, no target labels)",
        "re-ID source experts (>= 2)",
        "reid/a..reid/d or a Market-1501 folder",
    ),
    "classify": SageTarget(
        adapt_classification,
        lambda v: f"accuracy {100 * v['accuracy']:5.1f}",
        "metrics.json",
        "the same SAGE pipeline on a classification target (e.g. a digit domain): class "
        "pseudo-labels from the experts' own heads (SHOT's centroids) instead of clusters",
        "classification experts (>= 2)",
        "dataset name or ImageFolder path",
    ),
}


def cmd_adapt_sage(args: argparse.Namespace) -> int:
    target = SAGE_TARGETS[args.what]
    cfg = config_from_args(SageConfig, args)
    metrics = target.adapt(
        args.sources,
        args.target,
        args.out,
        cfg,
        args.device,
        work=args.work,
        checkpoint=checkpoint_options(args, args.out),
    )
    if not metrics:  # another rank than 0 under torchrun
        return 0
    for name in ordered_variants(metrics["variants"]):
        print(f"{name:>16}: {target.scores(metrics['variants'][name])}")
    print(f"wrote {args.out} (the {cfg.gate} gate's model, {target.written})")
    return 0


def cmd_adapt_cross_modal(args: argparse.Namespace) -> int:
    metrics = adapt_cross_modal(
        args.source,
        args.target,
        args.ti,
        args.out,
        args.method,
        config_from_args(CrossModalConfig, args),
        args.device,
        checkpoint=checkpoint_options(args, args.out),
    )
    for name, r in metrics["methods"].items():
        test = r.get("test_accuracy")
        extra = f", test split {100 * test:5.1f}" if test is not None else ""
        print(f"{name:>18}: accuracy {100 * r['accuracy']:5.1f}{extra} ({r['seconds']:.0f} s)")
    print(f"wrote {args.out} ({metrics['saved_model']}'s model, metrics.json, report.md)")
    return 0


def _add_sage(adapt_sub: argparse._SubParsersAction, name: str) -> None:
    target = SAGE_TARGETS[name]
    p = adapt_sub.add_parser(name, help=target.help)
    p.add_argument("--sources", required=True, nargs="+", type=Path, help=target.sources_help)
    p.add_argument("--target", required=True, help=target.target_help)
    p.add_argument("--out", required=True, type=Path, help="the gated model (atomic)")
    p.add_argument(
        "--work", type=Path, help="stage outputs, reused on a rerun (default: OUT.parts)"
    )
    add_config_flags(p.add_argument_group("SAGE settings (docs/sage.md)"), SageConfig)
    add_device_flag(p)
    add_checkpoint_flags(p)
    p.set_defaults(func=cmd_adapt_sage, scales_out=True)


def _add_cross_modal(adapt_sub: argparse._SubParsersAction) -> None:
    p = adapt_sub.add_parser(
        "cross-modal",
        help="an RGB source model to depth or NIR without its RGB data, with task-irrelevant "
        "RGB-X pairs (TGMB + TGKT, SOCKET, SHOT, source-only)",
    )
    p.add_argument("--source", required=True, type=Path, help="the RGB source model")
    p.add_argument(
        "--target", required=True, help="unlabelled target: rgbd/k1 ... or a paired folder"
    )
    p.add_argument("--ti", required=True, help="task-irrelevant pairs: rgbd/ti ... or a folder")
    p.add_argument("--out", required=True, type=Path, help="the first method's model (atomic)")
    p.add_argument(
        "--method",
        nargs="+",
        default=["tgmb-tgkt"],
        help="methods to run: source-only, shot, socket, tgmb-tgkt, the ablations "
        "(tgmb-only, tgmb-tgkt-paper-teacher, -fixed-teacher, -no-ti, -no-self, -no-adv, -no-im), "
        "'all' (the four main ones) "
        "or 'ablations' (default: tgmb-tgkt)",
    )
    group = p.add_argument_group("cross-modal settings (docs/cross_modal.md)")
    add_config_flags(group, CrossModalConfig)
    add_device_flag(p)
    add_checkpoint_flags(p)
    p.set_defaults(func=cmd_adapt_cross_modal)


def add_adapt(sub: argparse._SubParsersAction) -> None:
    adapt = sub.add_parser("adapt", help="adapt experts to an unlabelled target domain")
    adapt_sub = adapt.add_subparsers(dest="what", required=True, parser_class=Parser)
    for name in SAGE_TARGETS:
        _add_sage(adapt_sub, name)
    _add_cross_modal(adapt_sub)
