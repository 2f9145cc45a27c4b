"""``lorex merge`` (experts into one model, without data) and ``merge-adapter`` (LoRA into
plain weights)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorex.adapters.lora import merge_and_unload
from lorex.cli.common_flags import add_device_flag
from lorex.cli.config_flags import add_union_flags
from lorex.errors import LorexError
from lorex.io import read_json
from lorex.merging import MERGE_METHODS, merge_models
from lorex.merging.recipe import Recipe, read_recipe, recipe_text, write_recipe
from lorex.models import load_model, save_model
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


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The run's recipe: the ``--config`` file, or the flags. Giving both is an error (the file
    says everything the flags would, so neither silently wins)."""
    option_names = {n for m in MERGE_METHODS.values() for n in m.Options.__dataclass_fields__}
    if args.config is not None:
        flags = ["method", "base", "experts", "weights", *sorted(option_names)]
        given = [n for n in flags if getattr(args, n, None) is not None]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise LorexError(f"{flag}: not with --config (the recipe {args.config} gives it)")
        return read_recipe(args.config)
    for name in ("method", "base", "experts"):
        if getattr(args, name) is None:
            raise LorexError(f"--{name}: required (or give a recipe with --config)")
    method = MERGE_METHODS[args.method].from_args(args)
    if args.weights is not None and len(args.weights) != len(args.experts):
        raise LorexError(
            f"--weights: {len(args.weights)} given for {len(args.experts)} experts (one per expert)"
        )
    return Recipe(
        args.method, method.settings(), args.base, list(args.experts), weights=args.weights
    )


def cmd_merge(args: argparse.Namespace) -> int:
    recipe = recipe_from_args(args)
    method = recipe.build_method()
    if args.write_config is not None:
        recipe_text(recipe, args.write_config.parent)  # a recipe it cannot write fails first
    # TODO(out_dtype): pass out_dtype=recipe.out_dtype (and recipe_text=... for the model card)
    # once merge_models takes them (issue 26, the output helper's branch).
    record = merge_models(
        method,
        recipe.base,
        recipe.experts,
        args.out,
        device=args.device,
        weights=recipe.weights,
        densities=recipe.densities,
    )
    if args.write_config is not None:
        write_recipe(args.write_config, recipe)
    counts = ", ".join(f"{rule} {len(keys)}" for rule, keys in record["rules"].items())
    print(
        f"wrote {args.out}: {len(recipe.experts)} experts merged with {recipe.method} "
        f"({record['merged_tensors']} tensors merged, {record['kept_from_base']} kept from the "
        f"base; tensors per rule: {counts}) in {record['seconds']:.1f} s"
    )
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
    p.add_argument("--method", choices=sorted(MERGE_METHODS), help="required without --config")
    p.add_argument(
        "--base", type=Path, help="the base the experts come from (required without --config)"
    )
    p.add_argument(
        "--experts",
        nargs="+",
        type=Path,
        help="full or LoRA expert directories (required without --config)",
    )
    p.add_argument(
        "--weights",
        nargs="+",
        type=float,
        metavar="W",
        help="one weight per expert (default 1 each): task vector i is multiplied by W_i after "
        "sparsification; average, task-arithmetic, ties, dare and dare-ties take them",
    )
    p.add_argument(
        "--config",
        type=Path,
        metavar="RECIPE.yaml",
        help="a merge recipe (mergekit's YAML, or lorex names for lorex's own methods): it "
        "gives the method, base, experts, weights and options, so those flags are not given",
    )
    p.add_argument(
        "--write-config",
        type=Path,
        metavar="RECIPE.yaml",
        help="also write the recipe that reproduces this merge (written atomically)",
    )
    p.add_argument("--out", required=True, type=Path, help="output directory (written atomically)")
    options = p.add_argument_group("method options (default: the method's own)")
    methods = {name: method.Options for name, method in MERGE_METHODS.items()}
    add_union_flags(options, methods, MERGE_FLAG_METADATA)
    add_device_flag(p)
    p.set_defaults(func=cmd_merge)
