"""``lorex eval``, ``info`` and ``import-timm``: read one model, describe it, or make one."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lorex.adapters.gated import expert_parameter_count, gate_parameters
from lorex.backbones import PRESETS, preset_config
from lorex.cli.common_flags import add_device_flag
from lorex.cli.folder_info import foreign_folder_lines
from lorex.cli.parsing import positive_int
from lorex.data import load_dataset
from lorex.data.reid import is_reid_data, load_reid_data
from lorex.errors import LorexError
from lorex.io import read_json, write_json
from lorex.models import LorexModel, load_model
from lorex.models.resize import fit_image_size
from lorex.models.timm_import import import_timm
from lorex.training.evaluation import evaluate_classifier, evaluate_reid, reid_line
from lorex.training.methods import count_parameters
from lorex.version import __version__


def cmd_eval(args: argparse.Namespace) -> int:
    if is_reid_data(args.data):
        return _eval_reid(args, args.device)
    model = load_model(args.model, args.device)
    if args.head:
        model.set_head(args.head)
    data = load_dataset(args.data, args.split, args.max_samples)
    acc = evaluate_classifier(model, data, args.device)
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


def _eval_reid(args: argparse.Namespace, device: torch.device) -> int:
    """Query-vs-gallery retrieval of a re-ID dataset (a built-in domain or a Market folder)."""
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
    foreign = foreign_folder_lines(Path(args.model))
    if foreign is not None:  # a Hugging Face model or PEFT adapter: described, not loaded
        print("\n".join(foreign))
        return 0
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
    _print_side_and_gate(model)
    made_by = config.get("made_by", {})
    if made_by:
        print(f"made by    {json.dumps(made_by, sort_keys=True)}")
    return 0


def _print_side_and_gate(model: LorexModel) -> None:
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
        print(
            f"gate       {gate.kind}: {len(gate.experts)} LoRA experts ({', '.join(gate.experts)}) "
            f"r={gate.r} scaling={gate.scaling} on {len(gate.target_modules)} layers; "
            f"{expert_parameter_count(model.backbone):,} expert and "
            f"{sum(p.numel() for p in gate_parameters(model.backbone)):,} gate parameters"
        )


def cmd_import_timm(args: argparse.Namespace) -> int:
    import_timm(args.checkpoint, preset_config(args.preset), args.out)
    print(f"wrote {args.out} from {args.checkpoint}")
    return 0


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="accuracy of a model on a dataset's test split (re-ID data: mAP, rank-k, mINP of "
        "query vs gallery)",
    )
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--data", required=True, help="dataset name or ImageFolder path")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--head", help="task head to use (default: the model's active head)")
    p.add_argument("--max-samples", type=positive_int, default=None)
    p.add_argument("--json", type=Path, help="also write the result to this JSON file")
    add_device_flag(p)
    p.set_defaults(func=cmd_eval)


def add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="print a model directory's architecture, heads and provenance (a Hugging Face "
        "folder or PEFT adapter: type, parameters, dtypes, shards, tokenizer, adapter settings)",
    )
    p.add_argument("model", type=Path)
    p.set_defaults(func=cmd_info)


def add_import_timm(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import-timm", help="turn a timm ViT checkpoint into a lorex base model")
    p.add_argument("checkpoint", type=Path, help=".safetensors (or .pth, loaded with weights_only)")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--out", required=True, type=Path, help="output directory (written atomically)")
    p.set_defaults(func=cmd_import_timm)
