"""The ``lorex`` command line. Every user error prints one line and exits with status 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from lorex.errors import LorexError
from lorex.version import __version__

log = logging.getLogger("lorex")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (not usage + error) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


def one_line(message: str) -> str:
    """``message`` with control characters (a newline in a file or field name, say) escaped, so
    an error stays one line on the terminal."""
    if message.isprintable():
        return message
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be a whole number in [0, 2**63), got {value}")
    return value


def _add_training_options(
    p: argparse.ArgumentParser, epochs: int, lr: float | None, batch: int = 64
) -> None:
    p.add_argument(
        "--epochs", type=_positive_int, default=epochs, help=f"passes over the data ({epochs})"
    )
    p.add_argument("--batch-size", type=_positive_int, default=batch, help=f"batch size ({batch})")
    lr_help = f"peak learning rate ({lr})" if lr else "peak learning rate (default: the method's)"
    p.add_argument("--lr", type=_positive_float, default=lr, help=lr_help)
    p.add_argument(
        "--weight-decay", type=_non_negative_float, default=0.05, help="AdamW weight decay (0.05)"
    )
    p.add_argument("--seed", type=_seed, default=0, help="random seed (0)")
    p.add_argument(
        "--max-samples",
        type=_positive_int,
        default=None,
        help="train on a class-balanced subset of at most this many images",
    )
    p.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="random 2-pixel shifts",
    )
    p.add_argument(
        "--feature-cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with a frozen backbone (linear, losa) and no augmentation, run the backbone once "
        "and cache its outputs (default: on)",
    )
    _add_device(p)
    _add_checkpoint_options(p)


def _add_checkpoint_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        default=100,
        help="save the whole training state under OUT.parts/ every N optimiser steps (100)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoint under OUT.parts/ left by a stopped run; the result "
        "is bit-identical to an uninterrupted run on the CPU",
    )
    p.add_argument(
        "--no-checkpoint", action="store_true", help="do not write checkpoints (no resume)"
    )


def _checkpoint_options(args: argparse.Namespace, out: str):
    from lorex.training.checkpoint import CheckpointOptions, work_directory

    if args.no_checkpoint:
        if args.resume:
            raise LorexError("--resume and --no-checkpoint exclude each other")
        return None
    return CheckpointOptions(work_directory(out), args.checkpoint_every, args.resume)


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")


def _train_config(args: argparse.Namespace, augment_default: bool, default_lr: float | None = None):
    from lorex.training.config import TrainConfig

    return TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr if args.lr is not None else default_lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
        max_samples=args.max_samples,
        augment=augment_default if args.augment is None else args.augment,
        feature_cache=args.feature_cache,
    )


def cmd_data_list(args: argparse.Namespace) -> int:
    from lorex.data import BUILTINS, load_dataset
    from lorex.data.reid_synth import DOMAINS, split_sizes
    from lorex.data.rgbx_synth import PAIRED

    print(f"{'name':<20} {'train':>7} {'test':>6} {'classes':>7}  description")
    for name, spec in BUILTINS.items():
        if spec.size is not None and spec.classes is not None:  # known without generating
            sizes, classes = (spec.size("train"), spec.size("test")), len(spec.classes)
        else:
            train, test = load_dataset(name, "train"), load_dataset(name, "test")
            sizes, classes = (len(train), len(test)), len(train.classes)
        print(f"{name:<20} {sizes[0]:>7} {sizes[1]:>6} {classes:>7}  {spec.description}")
    print(f"\n{'re-ID':<9} {'ids':>4} {'cams':>4} {'train':>6} {'query':>6} {'gallery':>7}  style")
    for name, d in DOMAINS.items():
        n = split_sizes(name)
        print(
            f"{name:<9} {d.num_ids:>4} {d.cameras:>4} {n['train']:>6} {n['query']:>6} "
            f"{n['gallery']:>7}  {d.description}"
        )
    print(f"\n{'paired':<10} {'modality':<8} {'sensor':<6} {'train':>6} {'test':>5}  classes")
    for name, p in PAIRED.items():
        print(
            f"{name:<10} {p.modality:<8} {p.sensor:<6} {p.size('train'):>6} {p.size('test'):>5}  "
            f"{', '.join(p.classes)}: {p.description}"
        )
    return 0


def cmd_data_make(args: argparse.Namespace) -> int:
    from lorex.data import load_dataset, write_imagefolder
    from lorex.data.market1501 import write_market1501
    from lorex.data.paired import PAIRED_SETS, is_paired_folder, load_paired, write_paired_folder
    from lorex.data.reid_synth import load_reid
    from lorex.io import atomic_directory

    if args.name.startswith("reid/") and not Path(args.name).exists():  # Market-1501 layout
        if args.max_samples is not None:
            raise LorexError("--max-samples does not apply to re-ID domains")
        data = load_reid(args.name)
        with atomic_directory(args.out) as tmp:
            write_market1501(tmp, data)
        sizes = {s: len(getattr(data, s)) for s in ("train", "query", "gallery")}
        print(f"wrote {args.out}: " + ", ".join(f"{s} {n}" for s, n in sizes.items()))
        return 0
    if args.name in PAIRED_SETS or (Path(args.name).is_dir() and is_paired_folder(args.name)):
        pairs = {
            s: load_paired(args.name, s, True, args.max_samples, args.seed)
            for s in ("train", "test")
        }
        with atomic_directory(args.out) as tmp:
            for split, data in pairs.items():
                write_paired_folder(data, tmp / split)
        print(f"wrote {args.out}: " + ", ".join(f"{s} {len(d)}" for s, d in pairs.items()))
        return 0
    splits = {s: load_dataset(args.name, s, args.max_samples, args.seed) for s in ("train", "test")}
    with atomic_directory(args.out) as tmp:
        for split, data in splits.items():
            write_imagefolder(data, tmp / split)
    print(f"wrote {args.out}: " + ", ".join(f"{s} {len(d)}" for s, d in splits.items()))
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from lorex.training.expert_jobs import pretrain, resolve_device

    metrics = pretrain(
        args.preset,
        args.out,
        _train_config(args, augment_default=True),
        args.data,
        resolve_device(args.device),
        checkpoint=_checkpoint_options(args, args.out),
    )
    if not metrics:  # another rank than 0 under torchrun
        return 0
    print(f"pretrained {args.out}: test accuracy {metrics['accuracy']:.4f} on {args.data}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from lorex.training.expert_jobs import resolve_device, train_expert
    from lorex.training.methods import METHODS

    method = METHODS[args.method].from_args(args)
    if args.objective == "reid":
        return _train_reid(args, method)
    if args.num_instances is not None:
        raise LorexError("--num-instances applies to --objective reid only")
    metrics = train_expert(
        args.base,
        args.data,
        method,
        args.out,
        _train_config(args, False, default_lr=METHODS[args.method].default_lr),
        resolve_device(args.device),
        head_from=args.head_from,
        freeze_head=args.freeze_head,
        feature_stats=args.feature_stats,
        checkpoint=_checkpoint_options(args, args.out),
    )
    if not metrics:  # another rank than 0 under torchrun
        return 0
    print(
        f"trained {args.out} ({args.method}): "
        f"test accuracy {metrics['accuracy']:.4f} on {args.data}"
    )
    print(efficiency_line(metrics))
    return 0


def cmd_train_experts(args: argparse.Namespace) -> int:
    from lorex.training.expert_jobs import resolve_device
    from lorex.training.experts import train_experts
    from lorex.training.methods import METHODS

    method = METHODS[args.method].from_args(args)
    summary = train_experts(
        args.base,
        args.sources,
        method,
        args.out,
        _train_config(args, False, default_lr=METHODS[args.method].default_lr),
        resolve_device(args.device),
        checkpoint_every=None if args.no_checkpoint else args.checkpoint_every,
        resume=args.resume,
    )
    for name, entry in summary["experts"].items():
        print(f"{name:>12}: test accuracy {entry['accuracy']:.4f} ({entry['source']})")
    print(f"wrote {args.out} ({len(summary['experts'])} experts, experts.json)")
    return 0


def _train_reid(args: argparse.Namespace, method) -> int:
    from lorex.data.reid import DEFAULT_INSTANCES
    from lorex.training.evaluation import reid_line
    from lorex.training.expert_jobs import resolve_device, train_reid_expert

    for flag, given in (
        ("--head-from", args.head_from),
        ("--freeze-head", args.freeze_head),
        ("--feature-stats", args.feature_stats),
    ):
        if given:
            raise LorexError(f"{flag} does not apply to --objective reid")
    metrics = train_reid_expert(
        args.base,
        args.data,
        method,
        args.out,
        _train_config(args, False, default_lr=type(method).default_lr),
        resolve_device(args.device),
        num_instances=args.num_instances or DEFAULT_INSTANCES,
        checkpoint=_checkpoint_options(args, args.out),
    )
    if not metrics:  # another rank than 0 under torchrun
        return 0
    print(f"trained {args.out} ({args.method}, re-ID): {reid_line(metrics)} on {args.data}")
    print(efficiency_line(metrics))
    return 0


def efficiency_line(metrics: dict) -> str:
    """The four-axis summary LoSA's paper compares methods on, for any training run."""
    share = 100 * metrics["trainable_params"] / max(1, metrics["total_params"])
    cache = ", feature cache on" if metrics.get("feature_cache") else ""
    return (
        f"efficiency: {metrics['trainable_params']:,} trainable parameters ({share:.2f}%), "
        f"peak training memory {metrics['peak_train_mb']:.0f} MB, "
        f"training {metrics['train_seconds']:.1f} s{cache}, "
        f"inference {metrics['infer_ms_per_image']:.3f} ms/image"
    )


def cmd_eval(args: argparse.Namespace) -> int:
    from lorex.data import load_dataset
    from lorex.data.reid import is_reid_data
    from lorex.io import write_json
    from lorex.models import load_model
    from lorex.training.evaluation import evaluate_classifier
    from lorex.training.expert_jobs import resolve_device

    device = resolve_device(args.device)
    if is_reid_data(args.data):
        return _eval_reid(args, device)
    model = load_model(args.model, device)
    if args.head:
        model.set_head(args.head)
    data = load_dataset(args.data, args.split, args.max_samples)
    acc = evaluate_classifier(model, data, device)
    result = {
        "model": str(args.model),
        "data": args.data,
        "split": args.split,
        "samples": len(data),
        "head": model.head_info[model.active_head]["task"],
        "accuracy": acc,
        "lorex_version": __version__,
    }
    print(f"accuracy {acc:.4f} on {args.data} ({args.split}, {len(data)} images)")
    if args.json:
        write_json(args.json, result)
    return 0


def _eval_reid(args: argparse.Namespace, device) -> int:
    """Query-vs-gallery retrieval of a re-ID dataset (a built-in domain or a Market folder)."""
    from lorex.data.reid import load_reid_data
    from lorex.io import write_json
    from lorex.models import load_model
    from lorex.models.resize import fit_image_size
    from lorex.training.evaluation import evaluate_reid, reid_line

    if args.split != "test":
        raise LorexError("--split does not apply to re-ID data: queries rank the gallery")
    if args.max_samples is not None:
        raise LorexError("--max-samples does not apply to re-ID evaluation")
    model = load_model(args.model, device)
    if args.head:
        model.set_head(args.head)
    data = load_reid_data(args.data)
    fit_image_size(model, data.query.images.shape[1:3])  # a square base: positions resampled
    scores = evaluate_reid(model, data, device)
    head = model.head_info[model.active_head]["task"] if model.active_head else None
    result = {
        "model": str(args.model),
        "data": str(args.data),
        "query_samples": len(data.query),
        "gallery_samples": len(data.gallery),
        "head": head,
        **scores,
        "lorex_version": __version__,
    }
    print(
        f"{reid_line(scores)} on {args.data} "
        f"(query {len(data.query)}, gallery {len(data.gallery)} images)"
    )
    if args.json:
        write_json(args.json, result)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from lorex.io import read_json
    from lorex.models import load_model
    from lorex.training.methods import count_parameters

    model = load_model(args.model)
    config = read_json(Path(args.model) / "config.json")
    print(f"model      {args.model}")
    print(
        f"backbone   {model.backbone_config.get('type')} "
        f"({count_parameters(model.backbone):,} parameters)"
    )
    for key, info in model.head_info.items():
        mark = "*" if key == model.active_head else " "
        kind = f", {info['kind']}" if info.get("kind") else ""
        print(f"head     {mark} {info['task']} ({len(info['classes'])} classes{kind})")
    if "base" in config:
        print(f"base       {config['base']['path']}")
    for entry in config.get("adapters") or []:
        cfg = entry.get("config", {})
        print(
            f"adapter    {entry['name']} [{entry['state']}] r={cfg.get('r')} "
            f"alpha={cfg.get('lora_alpha')} targets={cfg.get('target_modules')} "
            f"sha256={str(entry.get('sha256'))[:12]} ({entry['path']}/)"
        )
    if model.side is not None:
        c = model.side.config
        print(
            f"side       losa: {count_parameters(model.side):,} parameters, taps "
            f"{c.tapped(model.side.depth)}, width {model.side.width}, ranks channel "
            f"{c.rank_channel} token {c.rank_token}"
            + (f" temporal {c.rank_temporal}, {c.frames}-frame clips" if c.frames > 1 else "")
        )
    gate = getattr(model.backbone, "gate_config", None)
    if gate is not None:
        from lorex.adapters.gated import expert_parameter_count, gate_parameters

        print(
            f"gate       {gate.kind}: {len(gate.experts)} LoRA experts ({', '.join(gate.experts)}) "
            f"r={gate.r} scaling={gate.scaling} on {len(gate.target_modules)} layers; "
            f"{expert_parameter_count(model.backbone):,} expert and "
            f"{sum(p.numel() for p in gate_parameters(model.backbone)):,} gate parameters"
        )
    made_by = config.get("made_by", {})
    if made_by:
        print(f"made by    {json.dumps(made_by, sort_keys=True)}")
    return 0


def cmd_merge_adapter(args: argparse.Namespace) -> int:
    from lorex.adapters.lora import merge_and_unload
    from lorex.io import read_json
    from lorex.models import load_model, save_model

    model = load_model(args.model)
    source = read_json(Path(args.model) / "config.json")
    if not source.get("adapters"):
        raise LorexError(f"{args.model}: has no adapters to merge")
    folded = merge_and_unload(model.backbone)
    made_by = {
        "command": "merge-adapter",
        "source": str(args.model),
        "folded": folded,
        "adapters": source["adapters"],
        "lorex_version": __version__,
    }
    save_model(model, args.out, weights="full", made_by=made_by, seed=source.get("seed"))
    print(f"wrote {args.out}: {', '.join(folded)} folded into the backbone weights")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from lorex.merging import MERGE_METHODS, merge_models

    method = MERGE_METHODS[args.method].from_args(args)
    from lorex.training.expert_jobs import resolve_device

    record = merge_models(
        method, args.base, args.experts, args.out, device=resolve_device(args.device)
    )
    counts = ", ".join(f"{rule} {len(keys)}" for rule, keys in record["rules"].items())
    print(
        f"wrote {args.out}: {len(args.experts)} experts merged with {args.method} "
        f"({record['merged_tensors']} tensors merged, {record['kept_from_base']} kept from the "
        f"base; tensors per rule: {counts}) in {record['seconds']:.1f} s"
    )
    return 0


def _auto_or_positive(text: str) -> float | str:
    return text if text == "auto" else _positive_float(text)


def _add_merge_options(p: argparse.ArgumentParser) -> None:
    """Every method's options; one left unset takes the chosen method's own default."""
    from lorex.merging.methods.doge import ETA_RELATIVE as DOGE_ETA_RELATIVE
    from lorex.merging.methods.doge import LR_RELATIVE as DOGE_LR_RELATIVE
    from lorex.merging.methods.wudi import LR_RELATIVE as WUDI_LR_RELATIVE

    g = p.add_argument_group("method options (default: the method's own)")
    g.add_argument(
        "--scale",
        type=float,
        help="lambda: task-arithmetic 0.3, dare 0.3, ties 1.0, dare-ties 1.0, iso-c 1.0, "
        "iso-cts 1.0, tsv-m 1.0, wudi 1.0",
    )
    g.add_argument("--density", type=float, help="ties: fraction kept per task vector (0.2)")
    g.add_argument("--merge-func", choices=("mean", "sum"), help="ties, dare-ties: (mean)")
    g.add_argument("--drop", type=float, help="dare, dare-ties: drop probability p (0.5)")
    g.add_argument("--seed", type=_seed, help="dare, dare-ties: seed of the drop masks (0)")
    g.add_argument(
        "--eta",
        type=_auto_or_positive,
        help="doge: lambda_i = eta / ||tau_i||; 'auto' (default): --eta-relative x the mean "
        "||tau_i||; the paper's 0.07 fits CLIP-sized task vectors",
    )
    g.add_argument(
        "--eta-relative",
        type=_positive_float,
        help=f"doge: auto's eta relative to the mean ||tau_i|| ({DOGE_ETA_RELATIVE})",
    )
    g.add_argument(
        "--subspace", type=_positive_int, help="doge: shared directions = rank / this (6)"
    )
    g.add_argument("--mask", type=float, help="doge: fraction kept by the global mask (0.3)")
    g.add_argument("--steps", type=int, help="doge, wudi: Adam steps per matrix (400, 300)")
    g.add_argument(
        "--lr",
        type=_auto_or_positive,
        help="doge, wudi: Adam step; 'auto' (default) follows each matrix's task vectors "
        "(--lr-relative x their RMS entry); the papers' absolute steps are 1e-4 and 1e-5",
    )
    g.add_argument(
        "--lr-relative",
        type=_positive_float,
        help="doge, wudi: the auto step relative to the matrix's RMS task-vector entry "
        f"({DOGE_LR_RELATIVE}, {WUDI_LR_RELATIVE}; chosen on validation data)",
    )
    g.add_argument(
        "--blocks",
        metavar="REGEX",
        help="doge, wudi: the tensors inside blocks are those whose names match REGEX "
        "(default: the repeated, numbered blocks found from the names, e.g. 'h.N.', 'layers.N.')",
    )
    g.add_argument(
        "--common", type=float, help="iso-cts: fraction of the rank kept as common subspace (0.8)"
    )


def _add_full_results(p: argparse.ArgumentParser, bench: str) -> None:
    default = Path("benchmarks") / "results" / bench / "results.json"
    p.add_argument(
        "--full-results",
        type=Path,
        default=default,
        help=f"a full run's results.json that a --quick run compares its order with ({default})",
    )


def cmd_bench_merge(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from lorex.data import load_dataset
    from lorex.experiments.demo import run_demo
    from lorex.experiments.merge_bench import SMALL_LR, merge_quick_checks, write_merge_report
    from lorex.experiments.settings import FULL, QUICK
    from lorex.io import read_json
    from lorex.metrics.agreement import read_full_results
    from lorex.training.expert_jobs import resolve_device
    from lorex.training.records import run_record

    settings = replace(
        QUICK if args.quick else FULL,
        merge_kinds=("full", "frozen-head", "frozen-head-small-lr", "lora"),
        merge_methods=None,
        frozen_head_experts=True,
        small_lr=SMALL_LR,
        reid=False,  # the merge bench needs the digit experts only
        cross_modal=False,
    )
    demo = args.out / "demo"
    run_demo(demo, device=resolve_device(args.device), seed=args.seed, settings=settings)
    results = read_json(demo / "metrics.json")["merge"]
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
    from lorex.experiments.losa_bench import run_bench
    from lorex.experiments.losa_report import quick_checks, write_report
    from lorex.metrics.agreement import read_full_results
    from lorex.training.records import run_record

    results = run_bench(args.out, quick=args.quick, seed=args.seed, resume=not args.fresh)
    results["run"] = run_record("bench losa", None, quick=args.quick, seed=args.seed)
    if args.quick:
        results["quick_checks"] = quick_checks(
            results, read_full_results(args.full_results), str(args.full_results)
        )
    print(f"wrote {write_report(results, args.out)}")
    return 0


def _sage_config(args: argparse.Namespace):
    from dataclasses import fields

    from lorex.adaptation.sage.config import SageConfig

    return SageConfig(**{f.name: getattr(args, f.name) for f in fields(SageConfig)})


def cmd_adapt_reid(args: argparse.Namespace) -> int:
    from lorex.adaptation.sage.pipeline import adapt_reid
    from lorex.adaptation.sage.report import ordered_variants
    from lorex.training.expert_jobs import resolve_device

    cfg = _sage_config(args)
    metrics = adapt_reid(
        args.sources,
        args.target,
        args.out,
        cfg,
        resolve_device(args.device),
        work=args.work,
        checkpoint=_checkpoint_options(args, args.out),
    )
    if not metrics:  # another rank than 0 under torchrun
        return 0
    for name in ordered_variants(metrics["variants"]):
        v = metrics["variants"][name]
        print(
            f"{name:>16}: mAP {100 * v['mAP']:5.1f}  rank-1 {100 * v['rank1']:5.1f}  "
            f"mINP {100 * v['mINP']:5.1f}  {v['infer_ms_per_image']:.3f} ms/image"
        )
    print(f"wrote {args.out} (the {cfg.gate} gate's model, metrics.json, report.md)")
    return 0


def cmd_adapt_classify(args: argparse.Namespace) -> int:
    from lorex.adaptation.sage.classification import adapt_classification
    from lorex.adaptation.sage.report import ordered_variants
    from lorex.training.expert_jobs import resolve_device

    cfg = _sage_config(args)
    metrics = adapt_classification(
        args.sources,
        args.target,
        args.out,
        cfg,
        resolve_device(args.device),
        work=args.work,
        checkpoint=_checkpoint_options(args, args.out),
    )
    if not metrics:  # another rank than 0 under torchrun
        return 0
    for name in ordered_variants(metrics["variants"]):
        v = metrics["variants"][name]
        print(f"{name:>16}: accuracy {100 * v['accuracy']:5.1f}")
    print(f"wrote {args.out} (the {cfg.gate} gate's model, metrics.json)")
    return 0


def cmd_adapt_cross_modal(args: argparse.Namespace) -> int:
    from lorex.adaptation.cross_modal import adapt_cross_modal
    from lorex.adaptation.cross_modal.options import config_from_args
    from lorex.training.expert_jobs import resolve_device

    metrics = adapt_cross_modal(
        args.source,
        args.target,
        args.ti,
        args.out,
        args.method,
        config_from_args(args),
        resolve_device(args.device),
        checkpoint=_checkpoint_options(args, args.out),
    )
    for name, r in metrics["methods"].items():
        test = r.get("test_accuracy")
        extra = f", test split {100 * test:5.1f}" if test is not None else ""
        print(f"{name:>18}: accuracy {100 * r['accuracy']:5.1f}{extra} ({r['seconds']:.0f} s)")
    print(f"wrote {args.out} ({metrics['saved_model']}'s model, metrics.json, report.md)")
    return 0


def cmd_bench_sage(args: argparse.Namespace) -> int:
    from lorex.experiments.sage_bench import run_sage_bench
    from lorex.training.expert_jobs import resolve_device

    summary = run_sage_bench(
        args.out,
        quick=args.quick,
        seed=args.seed,
        device=resolve_device(args.device),
        full_results=args.full_results,
    )
    g = summary["goals"]
    print(
        f"gated beats every LoRA expert and the uniform mix on {g['gated_wins']} of "
        f"{g['targets']} targets (light gate: {g['gated_light_wins']})"
    )
    print(f"wrote {args.out / 'results.md'}")
    return 0


def cmd_bench_cross_modal(args: argparse.Namespace) -> int:
    from lorex.experiments.cross_modal_bench import run_cross_modal_bench
    from lorex.training.expert_jobs import resolve_device

    summary = run_cross_modal_bench(
        args.out,
        quick=args.quick,
        seed=args.seed,
        device=resolve_device(args.device),
        full_results=args.full_results,
    )
    for method, value in summary["goals"]["mean_accuracy"].items():
        print(f"{method:>18}: mean accuracy {100 * value:5.1f}")
    print(f"wrote {args.out / 'results.md'}")
    return 0


def cmd_import_timm(args: argparse.Namespace) -> int:
    from lorex.backbones import preset_config
    from lorex.models.timm_import import import_timm

    import_timm(args.checkpoint, preset_config(args.preset), args.out)
    print(f"wrote {args.out} from {args.checkpoint}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lorex.experiments.demo import run_demo
    from lorex.training.expert_jobs import resolve_device

    report = run_demo(
        args.out,
        quick=args.quick,
        device=resolve_device(args.device),
        seed=args.seed,
        preset=args.preset,
    )
    print(f"wrote {report}")
    return 0


def _add_sage_options(p: argparse.ArgumentParser) -> None:
    from lorex.adaptation.sage.config import SageConfig

    d = SageConfig()
    g = p.add_argument_group("stage 2: LoRA experts on pseudo-labels")
    g.add_argument("--epochs", type=_positive_int, default=d.epochs, help=f"({d.epochs})")
    g.add_argument(
        "--iters", type=_positive_int, help="steps per epoch (default: one pass over the target)"
    )
    g.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help="P x K (64)")
    g.add_argument("--num-instances", type=_positive_int, default=d.num_instances, help="K (4)")
    g.add_argument("--lr", type=_positive_float, default=d.lr, help=f"AdamW peak lr ({d.lr})")
    g.add_argument(
        "--weight-decay", type=_non_negative_float, default=d.weight_decay, help="(1e-4)"
    )
    g.add_argument("--rank", type=_positive_int, default=d.rank, help=f"LoRA rank ({d.rank})")
    g.add_argument("--alpha", type=_positive_float, default=d.alpha, help="LoRA alpha (32)")
    g.add_argument(
        "--augment", action=argparse.BooleanOptionalAction, default=d.augment, help="(on)"
    )
    g.add_argument(
        "--label-smoothing", type=float, default=d.label_smoothing, help="cross-entropy (0.1)"
    )
    g = p.add_argument_group("pseudo-labels")
    g.add_argument("--k1", type=_positive_int, default=d.k1, help=f"k-reciprocal k1 ({d.k1})")
    g.add_argument("--k2", type=_positive_int, default=d.k2, help=f"query expansion k2 ({d.k2})")
    g.add_argument("--rho", type=_positive_float, default=d.rho, help="eps heuristic (1.6e-3)")
    g.add_argument("--min-samples", type=_positive_int, default=d.min_samples, help="DBSCAN (4)")
    g.add_argument(
        "--max-target-samples", type=_positive_int, help="whole target identities, at most N"
    )
    g = p.add_argument_group("stage 4: the gate")
    g.add_argument("--gate", choices=("light", "published"), default=d.gate, help="(light)")
    g.add_argument(
        "--gate-iters", type=_positive_int, default=d.gate_iters, help=f"({d.gate_iters})"
    )
    g.add_argument("--gate-lr", type=_positive_float, default=d.gate_lr, help="Adam lr (1e-2)")
    g.add_argument(
        "--gate-camera",
        action=argparse.BooleanOptionalAction,
        default=d.gate_camera,
        help="re-ID targets: the gate also lowers the features' between-camera share, read "
        "from the target's camera ids (on; docs/sage.md)",
    )
    g.add_argument(
        "--gate-camera-batch",
        type=_positive_int,
        default=d.gate_camera_batch,
        help=f"random target images per gate step for the camera term ({d.gate_camera_batch})",
    )
    p.add_argument("--seed", type=_seed, default=d.seed, help="random seed (0)")


def build_parser() -> argparse.ArgumentParser:
    from lorex.adaptation.cross_modal.options import add_cross_modal_options
    from lorex.backbones import PRESETS
    from lorex.training.methods import METHODS

    parser = _Parser(prog="lorex", description=__doc__)
    parser.add_argument("--version", action="version", version=f"lorex {__version__}")
    parser.add_argument(
        "--cache-dir", help="where generated datasets are cached ($LOREX_CACHE_DIR)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    data = sub.add_parser("data", help="list or export the built-in datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    p = data_sub.add_parser("list", help="print the built-in datasets and their sizes")
    p.set_defaults(func=cmd_data_list)
    p = data_sub.add_parser(
        "make",
        help="write a dataset in ImageFolder layout (DIR/{train,test}/<class>/); a paired set "
        "(rgbd/k1, rgbnir/a, ...) as DIR/{train,test}/{rgb,depth|nir}/<class>/",
    )
    p.add_argument("name", help="a built-in dataset name, e.g. digits/mnistm or rgbd/k1")
    p.add_argument("--out", required=True, type=Path, help="output directory (written atomically)")
    p.add_argument(
        "--max-samples", type=_positive_int, default=None, help="per split, class-balanced"
    )
    p.add_argument("--seed", type=_seed, default=0)
    p.set_defaults(func=cmd_data_make)

    p = sub.add_parser("pretrain", help="pretrain a base backbone on the pretraining set")
    p.add_argument("--preset", default="vit-tiny", choices=sorted(PRESETS))
    p.add_argument("--data", default="pretrain/chars", help="dataset name or ImageFolder path")
    p.add_argument("--out", required=True, type=Path, help="output directory (written atomically)")
    _add_training_options(p, epochs=10, lr=5e-4)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("train", help="fine-tune an expert for one dataset from a base model")
    p.add_argument("--base", required=True, type=Path, help="base model directory")
    p.add_argument("--data", required=True, help="dataset name or ImageFolder path")
    p.add_argument(
        "--method",
        default="full",
        choices=sorted(METHODS),
        help="what trains: "
        + "; ".join(
            f"{n}: {m.__doc__.strip().splitlines()[0].rstrip('.').lower()}"
            for n, m in METHODS.items()
        ),
    )
    p.add_argument("--out", required=True, type=Path, help="output directory (written atomically)")
    _add_training_options(p, epochs=5, lr=None)
    p.add_argument(
        "--head-from", type=Path, help="start the task head from this model's (a linear probe)"
    )
    p.add_argument(
        "--freeze-head",
        action="store_true",
        help="keep that head fixed while the rest trains (experts that merge better)",
    )
    p.add_argument(
        "--feature-stats",
        action="store_true",
        help="also record the training set's per-block feature statistics "
        "(feature_stats.safetensors), which SOCKET/TGKT's statistics matching reads from a "
        "source model, as a ResNet keeps them in its BatchNorm buffers",
    )
    p.add_argument(
        "--objective",
        choices=("classification", "reid"),
        default="classification",
        help="classification (default): cross-entropy on a labelled dataset; reid: a person "
        "re-ID expert on reid/a..reid/d or a Market-1501 folder (BN-neck, label-smoothed CE + "
        "batch-hard soft triplet, P x K batches; metrics mAP, rank-k, mINP)",
    )
    p.add_argument(
        "--num-instances",
        type=_positive_int,
        default=None,
        help="reid: K images per identity in a batch; P = batch size / K (4: 64 = 16 x 4)",
    )
    for method in METHODS.values():
        method.add_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "train-experts",
        help="train one expert per source dataset from one base (spread over the processes "
        "under torchrun, one after another without)",
    )
    p.add_argument("--base", required=True, type=Path, help="base model directory")
    p.add_argument("--sources", required=True, nargs="+", help="dataset names or ImageFolder paths")
    p.add_argument(
        "--method",
        default="full",
        choices=sorted(METHODS),
        help="what trains in each expert (full)",
    )
    p.add_argument(
        "--out", required=True, type=Path, help="a folder with one expert per source (OUT/NAME)"
    )
    _add_training_options(p, epochs=5, lr=None)
    for method in METHODS.values():
        method.add_arguments(p)
    p.set_defaults(func=cmd_train_experts)

    p = sub.add_parser(
        "eval",
        help="accuracy of a model on a dataset's test split (re-ID data: mAP, rank-k, mINP of "
        "query vs gallery)",
    )
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--data", required=True, help="dataset name or ImageFolder path")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--head", help="task head to use (default: the model's active head)")
    p.add_argument("--max-samples", type=_positive_int, default=None)
    p.add_argument("--json", type=Path, help="also write the result to this JSON file")
    _add_device(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("info", help="print a model directory's architecture, heads and provenance")
    p.add_argument("model", type=Path)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("merge-adapter", help="fold a model's LoRA adapters into plain weights")
    p.add_argument(
        "model", type=Path, help="model directory with adapters (lorex train --method lora)"
    )
    p.add_argument("--out", required=True, type=Path, help="output directory (written atomically)")
    p.set_defaults(func=cmd_merge_adapter)

    from lorex.merging import MERGE_METHODS

    p = sub.add_parser(
        "merge", help="merge experts fine-tuned from one base into one model, without data"
    )
    p.add_argument("--method", required=True, choices=sorted(MERGE_METHODS))
    p.add_argument("--base", required=True, type=Path, help="the base the experts come from")
    p.add_argument(
        "--experts", required=True, nargs="+", type=Path, help="full or LoRA expert directories"
    )
    p.add_argument("--out", required=True, type=Path, help="output directory (written atomically)")
    _add_merge_options(p)
    _add_device(p)
    p.set_defaults(func=cmd_merge)

    bench = sub.add_parser("bench", help="benchmarks that train (or reuse) experts and report")
    bench_sub = bench.add_subparsers(dest="what", required=True, parser_class=_Parser)
    p = bench_sub.add_parser(
        "merge", help="merge the digit experts (full and LoRA) with every method, per task"
    )
    p.add_argument("--out", required=True, type=Path, help="results and the demo it builds on")
    p.add_argument("--quick", action="store_true", help="the quick demo's experts (minutes)")
    p.add_argument("--seed", type=_seed, default=0)
    _add_full_results(p, "merge-full")
    _add_device(p)
    p.set_defaults(func=cmd_bench_merge)
    p = bench_sub.add_parser(
        "losa",
        help="LoSA against LoRA and full fine-tuning: accuracy, parameters, memory, time, "
        "latency, and the deepest backbone under a memory cap (CPU)",
    )
    p.add_argument("--out", required=True, type=Path, help="results.json, results.md, PNG")
    p.add_argument(
        "--quick",
        action="store_true",
        help="5 epochs from the quick demo's base, a few steps at ViT-B size (minutes)",
    )
    p.add_argument("--seed", type=_seed, default=0)
    _add_full_results(p, "losa")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="rerun every job (default: reuse the answers a stopped run saved in OUT/jobs/)",
    )
    p.set_defaults(func=cmd_bench_losa)
    p = bench_sub.add_parser(
        "sage",
        help="SAGE-reID leave-one-domain-out on reid/a..reid/d: every variant's mAP, rank-1, "
        "mINP, gate weights and inference cost",
    )
    p.add_argument("--out", required=True, type=Path, help="results.json, results.md, PNG")
    p.add_argument("--quick", action="store_true", help="one target, small settings (minutes)")
    p.add_argument("--seed", type=_seed, default=0)
    _add_full_results(p, "sage")
    _add_device(p)
    p.set_defaults(func=cmd_bench_sage)
    p = bench_sub.add_parser(
        "cross-modal",
        help="source-only, SHOT, SOCKET, TGMB + TGKT and ablations on the built-in RGB -> depth "
        "and RGB -> NIR tasks (same- and cross-sensor)",
    )
    p.add_argument("--out", required=True, type=Path, help="results.json, results.md, PNG")
    p.add_argument("--quick", action="store_true", help="two tasks, small settings (minutes)")
    p.add_argument("--seed", type=_seed, default=0)
    _add_full_results(p, "cross_modal")
    _add_device(p)
    p.set_defaults(func=cmd_bench_cross_modal)

    adapt = sub.add_parser("adapt", help="adapt experts to an unlabelled target domain")
    adapt_sub = adapt.add_subparsers(dest="what", required=True, parser_class=_Parser)
    for name, func, help_text, sources_help, target_help in (
        (
            "reid",
            cmd_adapt_reid,
            "SAGE-reID: per-source LoRA experts on target pseudo-labels, mixed by a gate on "
            "the averaged backbone (no source data, no target labels)",
            "re-ID source experts (>= 2)",
            "reid/a..reid/d or a Market-1501 folder",
        ),
        (
            "classify",
            cmd_adapt_classify,
            "the same SAGE pipeline on a classification target (e.g. a digit domain): class "
            "pseudo-labels from the experts' own heads (SHOT's centroids) instead of clusters",
            "classification experts (>= 2)",
            "dataset name or ImageFolder path",
        ),
    ):
        p = adapt_sub.add_parser(name, help=help_text)
        p.add_argument("--sources", required=True, nargs="+", type=Path, help=sources_help)
        p.add_argument("--target", required=True, help=target_help)
        p.add_argument("--out", required=True, type=Path, help="the gated model (atomic)")
        p.add_argument(
            "--work", type=Path, help="stage outputs, reused on a rerun (default: OUT.parts)"
        )
        _add_sage_options(p)
        _add_device(p)
        _add_checkpoint_options(p)
        p.set_defaults(func=func)

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
    add_cross_modal_options(p)
    _add_device(p)
    _add_checkpoint_options(p)
    p.set_defaults(func=cmd_adapt_cross_modal)

    p = sub.add_parser("import-timm", help="turn a timm ViT checkpoint into a lorex base model")
    p.add_argument("checkpoint", type=Path, help=".safetensors (or .pth, loaded with weights_only)")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--out", required=True, type=Path, help="output directory (written atomically)")
    p.set_defaults(func=cmd_import_timm)

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
    p.add_argument("--seed", type=_seed, default=0)
    _add_device(p)
    p.set_defaults(func=cmd_demo)
    return parser


def _join_torchrun(args: argparse.Namespace) -> None:
    """Under ``torchrun``: join the process group for the commands that scale out (data-parallel
    training and adaptation, parallel experts), refuse the others, and silence stdout on every
    rank but 0 (only rank 0 writes and reports)."""
    from lorex.training import distributed

    if not distributed.launched_by_torchrun():
        return
    if args.func not in _DISTRIBUTED:
        what = f"{args.command} {getattr(args, 'what', '') or ''}".strip()
        raise LorexError(
            f"lorex {what} runs in one process; launch it without torchrun (docs/scaling.md)"
        )
    from lorex.training.expert_jobs import resolve_device

    device = distributed.local_device(resolve_device(args.device))
    args.device = str(device)
    if not distributed.init(device).main:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cache_dir:
        os.environ["LOREX_CACHE_DIR"] = str(args.cache_dir)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        _join_torchrun(args)
        return args.func(args)
    except LorexError as exc:
        print(f"lorex {args.command}: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorex: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lorex data list | head`: the reader left; exit quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    finally:
        from lorex.training import distributed

        distributed.leave()


# Commands that run under torchrun: data-parallel training and adaptation, parallel experts.
_DISTRIBUTED = {
    cmd_pretrain,
    cmd_train,
    cmd_adapt_reid,
    cmd_adapt_classify,
    cmd_train_experts,
}

if __name__ == "__main__":
    sys.exit(main())
