"""``lorex merge`` (experts into one model, without data) and ``merge-adapter`` (LoRA into
plain weights)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorex.adapters.lora import merge_and_unload
from lorex.backbones.hf import is_hf_directory
from lorex.cli.common_flags import add_device_flag
from lorex.cli.config_flags import add_union_flags
from lorex.errors import LorexError
from lorex.io import read_json
from lorex.merging import MERGE_METHODS, merge_models
from lorex.models import load_model, save_model
from lorex.models.hf_folder import HEADS_CONFIG, save_hf_folder
from lorex.models.layout import base_path
from lorex.version import __version__

#: How merge options parse where their type alone says too little. A field's own metadata (its
#: ``check``, ``choices``) takes precedence, so entries here can move into the Options classes.
MERGE_FLAG_METADATA = {
    "merge_func": {"choices": ("mean", "sum")},
    "seed": {"check": "seed"},
    "eta": {"check": "positive_or_auto"},
    "eta_relative": {"check": "positive"},
    "subspace": {"check": "positive"},
    "lr": {"check": "positive_or_auto"},
    "lr_relative": {"check": "positive"},
    "blocks": {"metavar": "REGEX"},
}


def cmd_merge(args: argparse.Namespace) -> int:
    method = MERGE_METHODS[args.method].from_args(args)
    record = merge_models(method, args.base, args.experts, args.out, device=args.device)
    counts = ", ".join(f"{rule} {len(keys)}" for rule, keys in record["rules"].items())
    print(
        f"wrote {args.out}: {len(args.experts)} experts merged with {args.method} "
        f"({record['merged_tensors']} tensors merged, {record['kept_from_base']} kept from the "
        f"base; tensors per rule: {counts}) in {record['seconds']:.1f} s"
    )
    for expert, heads in record.get("heads_not_written", {}).items():
        print(f"not written (a Hugging Face folder has no heads): {expert}'s {', '.join(heads)}")
    return 0


def cmd_merge_adapter(args: argparse.Namespace) -> int:
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
    base_dir = base_path(Path(args.model), source["base"]) if source.get("base") else None
    if base_dir is not None and is_hf_directory(base_dir):
        heads = save_hf_folder(model, base_dir, args.out, made_by)
        kept = f"; heads {', '.join(heads)} in {HEADS_CONFIG}" if heads else ""
        print(
            f"wrote {args.out}: {', '.join(folded)} folded into the backbone weights, as a "
            f"Hugging Face folder like {base_dir} (from_pretrained loads it){kept}"
        )
        return 0
    save_model(model, args.out, weights="full", made_by=made_by, seed=source.get("seed"))
    print(f"wrote {args.out}: {', '.join(folded)} folded into the backbone weights")
    return 0


def add_merge_adapter(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge-adapter", help="fold a model's LoRA adapters into plain weights")
    p.add_argument(
        "model", type=Path, help="model directory with adapters (lorex train --method lora)"
    )
    p.add_argument("--out", required=True, type=Path, help="output directory (written atomically)")
    p.set_defaults(func=cmd_merge_adapter)


def add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge", help="merge experts fine-tuned from one base into one model, without data"
    )
    p.add_argument("--method", required=True, choices=sorted(MERGE_METHODS))
    p.add_argument("--base", required=True, type=Path, help="the base the experts come from")
    p.add_argument(
        "--experts", required=True, nargs="+", type=Path, help="full or LoRA expert directories"
    )
    p.add_argument("--out", required=True, type=Path, help="output directory (written atomically)")
    options = p.add_argument_group("method options (default: the method's own)")
    methods = {name: method.Options for name, method in MERGE_METHODS.items()}
    add_union_flags(options, methods, MERGE_FLAG_METADATA)
    add_device_flag(p)
    p.set_defaults(func=cmd_merge)
