"""``lorex pretrain``, ``train`` and ``train-experts``: one model (or one per source) from data."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorex.backbones import PRESETS
from lorex.cli.common_flags import add_checkpoint_flags, add_device_flag, checkpoint_options
from lorex.cli.config_flags import add_config_flags, given_settings
from lorex.cli.parsing import non_negative_float, positive_float, positive_int, seed
from lorex.data.reid import DEFAULT_INSTANCES
from lorex.errors import LorexError
from lorex.training.config import TrainConfig
from lorex.training.evaluation import reid_line
from lorex.training.expert_jobs import pretrain, train_expert, train_reid_expert
from lorex.training.experts import train_experts
from lorex.training.methods import TRAINING_METHODS, TrainingMethod


def add_training_flags(p: argparse.ArgumentParser, epochs: int, lr: float | None) -> None:
    """The optimiser and data flags of every command that trains from labelled data."""
    p.add_argument(
        "--epochs", type=positive_int, default=epochs, help=f"passes over the data ({epochs})"
    )
    p.add_argument("--batch-size", type=positive_int, default=64, help="batch size (64)")
    lr_help = f"peak learning rate ({lr})" if lr else "peak learning rate (default: the method's)"
    p.add_argument("--lr", type=positive_float, default=lr, help=lr_help)
    p.add_argument(
        "--weight-decay", type=non_negative_float, default=0.05, help="AdamW weight decay (0.05)"
    )
    p.add_argument("--seed", type=seed, default=0, help="random seed (0)")
    p.add_argument(
        "--max-samples",
        type=positive_int,
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
    add_device_flag(p)
    add_checkpoint_flags(p)


def train_config(args: argparse.Namespace, augment: bool, lr: float | None = None) -> TrainConfig:
    """The flags of ``add_training_flags``; ``augment`` and ``lr`` are the command's defaults."""
    return TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr if args.lr is not None else lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
        max_samples=args.max_samples,
        augment=augment if args.augment is None else args.augment,
        feature_cache=args.feature_cache,
    )


def add_method_flags(p: argparse.ArgumentParser, help: str) -> None:
    """``--method`` and every registered method's settings, generated from its ``Config``."""
    p.add_argument("--method", default="full", choices=sorted(TRAINING_METHODS), help=help)
    for name, method in TRAINING_METHODS.items():
        if method.Config is not None:
            add_config_flags(p.add_argument_group(f"--method {name}"), method.Config)


def method_from_args(args: argparse.Namespace) -> TrainingMethod:
    method = TRAINING_METHODS[args.method]
    return method.from_settings(
        {} if method.Config is None else given_settings(method.Config, args)
    )


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


def cmd_pretrain(args: argparse.Namespace) -> int:
    metrics = pretrain(
        args.preset,
        args.out,
        train_config(args, augment=True),
        args.data,
        args.device,
        checkpoint=checkpoint_options(args, args.out),
    )
    if not metrics:  # another rank than 0 under torchrun
        return 0
    print(f"pretrained {args.out}: test accuracy {metrics['accuracy']:.4f} on {args.data}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    method = method_from_args(args)
    reid = args.objective == "reid"
    _check_objective_flags(args, reid)
    job = (
        args.base,
        args.data,
        method,
        args.out,
        train_config(args, False, lr=type(method).default_lr),
        args.device,
    )
    checkpoint = checkpoint_options(args, args.out)
    if reid:
        instances = args.num_instances or DEFAULT_INSTANCES
        metrics = train_reid_expert(*job, num_instances=instances, checkpoint=checkpoint)
    else:
        metrics = train_expert(
            *job,
            head_from=args.head_from,
            freeze_head=args.freeze_head,
            feature_stats=args.feature_stats,
            checkpoint=checkpoint,
        )
    if not metrics:  # another rank than 0 under torchrun
        return 0
    if reid:
        print(f"trained {args.out} ({args.method}, re-ID): {reid_line(metrics)} on {args.data}")
    else:
        score = f"test accuracy {metrics['accuracy']:.4f}"
        print(f"trained {args.out} ({args.method}): {score} on {args.data}")
    print(efficiency_line(metrics))
    return 0


def _check_objective_flags(args: argparse.Namespace, reid: bool) -> None:
    """Refuse the flags of the other objective rather than ignore them."""
    if not reid:
        if args.num_instances is not None:
            raise LorexError("--num-instances applies to --objective reid only")
        return
    for flag, given in (
        ("--head-from", args.head_from),
        ("--freeze-head", args.freeze_head),
        ("--feature-stats", args.feature_stats),
    ):
        if given:
            raise LorexError(f"{flag} does not apply to --objective reid")


def cmd_train_experts(args: argparse.Namespace) -> int:
    method = method_from_args(args)
    summary = train_experts(
        args.base,
        args.sources,
        method,
        args.out,
        train_config(args, False, lr=type(method).default_lr),
        args.device,
        checkpoint_every=None if args.no_checkpoint else args.checkpoint_every,
        resume=args.resume,
    )
    for name, entry in summary["experts"].items():
        print(f"{name:>12}: test accuracy {entry['accuracy']:.4f} ({entry['source']})")
    print(f"wrote {args.out} ({len(summary['experts'])} experts, experts.json)")
    return 0


def add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="pretrain a base backbone on the pretraining set")
    p.add_argument("--preset", default="vit-tiny", choices=sorted(PRESETS))
    p.add_argument("--data", default="pretrain/chars", help="dataset name or ImageFolder path")
    p.add_argument("--out", required=True, type=Path, help="output directory (written atomically)")
    add_training_flags(p, epochs=10, lr=5e-4)
    p.set_defaults(func=cmd_pretrain, scales_out=True)


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune an expert for one dataset from a base model")
    p.add_argument("--base", required=True, type=Path, help="base model directory")
    p.add_argument("--data", required=True, help="dataset name or ImageFolder path")
    p.add_argument("--out", required=True, type=Path, help="output directory (written atomically)")
    add_training_flags(p, epochs=5, lr=None)
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
        type=positive_int,
        default=None,
        help="reid: K images per identity in a batch; P = batch size / K (4: 64 = 16 x 4)",
    )
    what = "; ".join(
        f"{n}: {m.__doc__.strip().splitlines()[0].rstrip('.').lower()}"
        for n, m in TRAINING_METHODS.items()
    )
    add_method_flags(p, help=f"what trains: {what}")
    p.set_defaults(func=cmd_train, scales_out=True)


def add_train_experts(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-experts",
        help="train one expert per source dataset from one base (spread over the processes "
        "under torchrun, one after another without)",
    )
    p.add_argument("--base", required=True, type=Path, help="base model directory")
    p.add_argument("--sources", required=True, nargs="+", help="dataset names or ImageFolder paths")
    p.add_argument(
        "--out", required=True, type=Path, help="a folder with one expert per source (OUT/NAME)"
    )
    add_training_flags(p, epochs=5, lr=None)
    add_method_flags(p, help="what trains in each expert (full)")
    p.set_defaults(func=cmd_train_experts, scales_out=True)
