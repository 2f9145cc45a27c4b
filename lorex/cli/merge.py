"""``lorex merge`` (experts into one model, without data) and ``merge-adapter`` (LoRA into
plain weights)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorex.adapters.lora import merge_and_unload
from lorex.backbones.hf import is_hf_directory
from lorex.cli.common_flags import add_device_flag
from lorex.cli.config_flags import add_union_flags
from lorex.cli.parsing import positive_int
from lorex.errors import LorexError
from lorex.io import read_json
from lorex.merging import MERGE_METHODS, MergeMethod, merge_models
from lorex.merging.lora_out import merge_to_lora
from lorex.merging.output import OUT_DTYPES, parse_size
from lorex.merging.recipe import Recipe, read_recipe, recipe_text, write_recipe
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
    text = recipe_text(recipe)  # a recipe it cannot write fails before the merge
    out_dtype = args.out_dtype or recipe.out_dtype
    if args.out_rank is not None:
        return _merge_to_lora(args, recipe, method, out_dtype)
    record = merge_models(
        method,
        recipe.base,
        recipe.experts,
        args.out,
        device=args.device,
        weights=recipe.weights,
        densities=recipe.densities,
        out_dtype=out_dtype,
        max_shard_size=args.max_shard_size,
        copy_files=args.copy_files,
        model_card=args.model_card,
        recipe_text=text,
    )
    if args.write_config is not None:
        write_recipe(args.write_config, recipe)
    counts = ", ".join(f"{rule} {len(keys)}" for rule, keys in record["rules"].items())
    print(
        f"wrote {args.out}: {len(recipe.experts)} experts merged with {recipe.method} "
        f"({record['merged_tensors']} tensors merged, {record['kept_from_base']} kept from the "
        f"base; tensors per rule: {counts}) in {record['seconds']:.1f} s"
    )
    for expert, heads in record.get("heads_not_written", {}).items():
        print(f"not written (a Hugging Face folder has no heads): {expert}'s {', '.join(heads)}")
    return 0


def _merge_to_lora(
    args: argparse.Namespace, recipe: Recipe, method: MergeMethod, out_dtype: str | None
) -> int:
    if args.max_shard_size is not None:
        raise LorexError("--max-shard-size does not apply to --out-rank (an adapter is one file)")
    record = merge_to_lora(
        method,
        recipe.base,
        recipe.experts,
        args.out,
        args.out_rank,
        device=args.device,
        out_dtype=out_dtype,
        weights=recipe.weights,
        densities=recipe.densities,
    )
    if args.write_config is not None:
        write_recipe(args.write_config, recipe)
    lora = record["lora_out"]
    print(
        f"wrote {args.out}: {len(recipe.experts)} LoRA experts merged with {recipe.method} into "
        f"one rank-{lora['rank']} adapter on {lora['tensors']} tensors (relative error "
        f"against the dense merge {lora['relative_error']:.2e}, worst tensor "
        f"{lora['max_tensor_relative_error']:.2e}) in {record['seconds']:.1f} s"
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


def _shard_size(text: str) -> int:
    try:
        return parse_size(int(text) if text.isdigit() else text)
    except LorexError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("max_shard_size: ")) from None


def add_output_flags(p: argparse.ArgumentParser) -> None:
    """How the merged folder is written (``lorex.merging.output``)."""
    out = p.add_argument_group("output")
    out.add_argument(
        "--out-dtype",
        choices=sorted(OUT_DTYPES),
        help="dtype of the floating tensors written (default: the base's, tensor by tensor; "
        "integer tensors are never cast)",
    )
    out.add_argument(
        "--max-shard-size",
        type=_shard_size,
        metavar="SIZE",
        help="split the weights into shards of at most SIZE (bytes, or 500MB, 2GB, 1.5GiB) "
        "with a model.safetensors.index.json (default: one model.safetensors)",
    )
    out.add_argument(
        "--no-copy-files",
        dest="copy_files",
        action="store_false",
        help="do not copy a Hugging Face base's tokenizer, generation and preprocessor files",
    )
    out.add_argument(
        "--no-model-card",
        dest="model_card",
        action="store_false",
        help="do not write the README.md model card",
    )


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
    add_output_flags(p)
    p.add_argument(
        "--out-rank",
        type=positive_int,
        default=None,
        metavar="R",
        help="LoRA experts in, one rank-R LoRA adapter out (the dense merge's best rank-R "
        "approximation; its error is reported) instead of a dense model",
    )
    options = p.add_argument_group("method options (default: the method's own)")
    methods = {name: method.Options for name, method in MERGE_METHODS.items()}
    add_union_flags(options, methods, MERGE_FLAG_METADATA)
    add_device_flag(p)
    p.set_defaults(func=cmd_merge)
