"""``merge_models``: check that the experts fit the base, then merge and write, tensor by tensor.

Memory stays at about one tensor of the base plus one of each expert (and the method's own work
on it): the output's safetensors header is known from the base before any data, so each merged
tensor is written and freed before the next is read.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lorex.errors import LorexError
from lorex.io import atomic_directory, read_json, write_json
from lorex.merging.base import KEPT, MergeContext, MergeMethod
from lorex.merging.output import (
    MODEL_CARD,
    ShardedWriter,
    check_out_path,
    copy_base_files,
    hf_config_with_dtype,
    model_card_text,
    output_dtype,
    parse_size,
    resolve_out_dtype,
)
from lorex.merging.sources import ModelSource, open_expert
from lorex.metrics.resources import PeakMemory
from lorex.models.store import CONFIG, FORMAT_VERSION
from lorex.version import __version__

#: The rule of an expert's own head, copied as it is (it has no counterpart in the base).
HEAD_RULE = "copied_from_expert"


def _backbone_keys(source: ModelSource) -> list[str]:
    if source.kind == "hf":
        return source.keys()
    return [k for k in source.keys() if k.startswith("backbone.")]


def check_experts(base: ModelSource, experts: list[ModelSource]) -> list[str]:
    """The backbone names every expert shares with the base, or a one-line error naming the
    first expert and key that do not fit (keys, shapes, dtypes, architecture or base)."""
    keys = _backbone_keys(base)
    for expert in experts:
        where = f"expert {expert.path}"
        if expert.kind != base.kind:
            raise LorexError(f"{where}: a {expert.kind} model, but the base is {base.kind}")
        if base.kind == "lorex" and expert.config.get("backbone") != base.config.get("backbone"):
            raise LorexError(f"{where}: its backbone config differs from the base's")
        if base.kind == "hf" and expert.config.get("model_type") != base.config.get("model_type"):
            raise LorexError(f"{where}: model_type differs from the base's")
        if expert.kind == "lorex" and expert.config.get("side"):
            raise LorexError(
                f"{where}: a LoSA side network is not a change of the backbone's weights, so "
                "there is nothing to merge; use it on its own"
            )
        if expert.base is not None and expert.base.sha256() != base.sha256():
            raise LorexError(f"{where}: fine-tuned from {expert.base.path}, not from this base")
        theirs = _backbone_keys(expert)
        missing = sorted(set(keys) - set(theirs))
        if missing:
            raise LorexError(f"{where}: missing tensor '{missing[0]}'")
        extra = sorted(set(theirs) - set(keys))
        if extra:
            raise LorexError(f"{where}: unexpected tensor '{extra[0]}'")
        for key in keys:
            if expert.spec(key) != base.spec(key):
                (d1, s1), (d2, s2) = expert.spec(key), base.spec(key)
                raise LorexError(
                    f"{where}: tensor '{key}' is {d1} {tuple(s1)}, the base's is {d2} {tuple(s2)}"
                )
    return keys


def _expert_heads(experts: list[ModelSource]) -> tuple[dict[str, Any], dict[str, ModelSource]]:
    """Each expert's own heads, keyed as in its config; a task claimed twice is an error."""
    info: dict[str, Any] = {}
    owner: dict[str, ModelSource] = {}
    for expert in experts:
        if expert.kind != "lorex":
            continue
        for key, head in expert.config.get("heads", {}).items():
            if key in info:
                raise LorexError(
                    f"expert {expert.path}: task '{head.get('task', key)}' already comes from "
                    f"expert {owner[key].path}"
                )
            info[key] = head
            owner[key] = expert
    return info, owner


def _heads_not_written(expert: object) -> list[str]:
    return getattr(expert, "heads_not_written", [])


def merge_models(
    method: MergeMethod,
    base: str | Path,
    experts: list[str | Path],
    out: str | Path,
    progress: bool | None = None,
    device: torch.device | str = "cpu",
    *,
    out_dtype: str | None = None,
    max_shard_size: int | str | None = None,
    copy_files: bool = True,
    model_card: bool = True,
    recipe_text: str | None = None,
    weights: list[float] | None = None,
    densities: list[float] | None = None,
) -> dict[str, Any]:
    """Merge ``experts`` (full, LoRA or mixed, all from ``base``) into a model directory ``out``.

    The per-tensor work (DOGE's optimisation above all) runs on ``device``; files stay on disk.
    ``out_dtype`` ("float32", "float16", "bfloat16"; None: the base's, tensor by tensor) is the
    floating tensors' output dtype; ``max_shard_size`` (bytes or "2GB"; None: one file) splits
    the weights into shards with an index; ``copy_files`` copies a Hugging Face base's tokenizer
    and generation config; ``model_card`` writes ``README.md`` (with ``recipe_text`` if given).
    ``weights`` (one per expert, 1.0 each by default) and ``densities`` (one per expert, default:
    the method's option) are for the methods that take them; the others refuse them.

    Returns the record written to ``merge.json``: method, settings, inputs and their hashes,
    seconds, ``rules`` (each rule applied -> the tensors that got it; every written tensor is in
    exactly one list), and whatever the method's ``report()`` adds (the same for every method).
    """
    if len(experts) < 1:
        raise LorexError("merge needs at least one expert")
    check_out_path(Path(out), [("the base", Path(base))] + [("expert", Path(e)) for e in experts])
    output = OutputOptions(
        dtype=out_dtype,
        max_bytes=None if max_shard_size is None else parse_size(max_shard_size),
        copy_files=copy_files,
        model_card=model_card,
        recipe_text=recipe_text,
    )
    resolve_out_dtype(out_dtype)  # a bad name fails before anything is read
    check_per_expert(method, len(experts), weights, densities)
    with PeakMemory() as memory:
        record = _merge(
            method,
            Path(base),
            [Path(e) for e in experts],
            Path(out),
            progress,
            torch.device(device),
            memory,
            output,
            weights=weights,
            densities=densities,
        )
    return record


def check_per_expert(
    method: MergeMethod,
    n_experts: int,
    weights: list[float] | None,
    densities: list[float] | None,
) -> None:
    """One weight and density per expert, and only for methods that take them (before any
    input is read)."""
    for name, values in (("weights", weights), ("densities", densities)):
        if values is not None and len(values) != n_experts:
            raise LorexError(
                f"{name}: {len(values)} given for {n_experts} experts (one per expert)"
            )
    method.check_weights(weights, densities)


@dataclass(frozen=True)
class OutputOptions:
    """How the merged folder is written (``merge_models``' keyword arguments)."""

    dtype: str | None = None
    max_bytes: int | None = None
    copy_files: bool = True
    model_card: bool = True
    recipe_text: str | None = None


def _merge(
    method: MergeMethod,
    base: Path,
    experts: list[Path],
    out: Path,
    progress: bool | None,
    device: torch.device,
    memory: PeakMemory | None = None,
    output: OutputOptions = OutputOptions(),  # noqa: B008 - frozen, never modified
    weights: list[float] | None = None,
    densities: list[float] | None = None,
) -> dict[str, Any]:
    start = time.perf_counter()
    base_src = ModelSource(base)
    expert_srcs = [open_expert(e, base_src) for e in experts]
    keys = check_experts(base_src, expert_srcs)
    heads, head_owner = _expert_heads(expert_srcs)
    rules = method.plan({k: base_src.spec(k) for k in keys}, len(expert_srcs))
    merged_keys = [k for k in keys if rules[k] != KEPT]
    ctx = MergeContext(base_src, expert_srcs, merged_keys, device, weights, densities)
    method.begin(ctx)

    head_tensors = [
        (f"heads.{key}.{part}", head_owner[key])
        for key in heads
        for part in ("weight", "bias")
        if f"heads.{key}.{part}" in head_owner[key].own_keys()
    ]
    out_dtype = resolve_out_dtype(output.dtype)
    specs = [(k, *base_src.spec(k)) for k in keys]
    specs += [(name, *src.spec(name)) for name, src in head_tensors]
    specs = [(name, output_dtype(dtype, out_dtype), shape) for name, dtype, shape in specs]
    by_rule: dict[str, list[str]] = {}
    for key, rule in rules.items():
        by_rule.setdefault(rule, []).append(key)
    if head_tensors:
        by_rule[HEAD_RULE] = [name for name, _ in head_tensors]
    record: dict[str, Any] = {
        "command": "merge",
        "method": method.name,
        "settings": method.settings(),
        "base": {"path": str(Path(base)), "sha256": base_src.sha256()},
        "experts": [{"path": str(Path(e.path)), "sha256": e.sha256()} for e in expert_srcs],
        "weights": ctx.weights,
        "densities": densities,
        "merged_tensors": len(merged_keys),
        "kept_from_base": len(keys) - len(merged_keys),
        "rules": by_rule,
        "lorex_version": __version__,
        "torch_version": torch.__version__,
    }
    dtypes = {name: dtype for name, dtype, _ in specs}
    unwritten = {str(e.path): e.heads_not_written for e in expert_srcs if _heads_not_written(e)}
    if unwritten:  # a Hugging Face folder has no place for lorex heads
        record["heads_not_written"] = unwritten
    with atomic_directory(out) as tmp:
        with ShardedWriter(
            tmp, specs, output.max_bytes, metadata={"format": "pt", "lorex_version": __version__}
        ) as writer:
            bar = tqdm(  # None: shown on a terminal only, so a log or pipe gets no bar
                keys,
                desc=f"merge ({method.name})",
                unit="tensor",
                disable=progress is False or None,
            )
            merged_set = set(merged_keys)
            for key in bar:
                theta0 = base_src.get(key)
                if key in merged_set:
                    theta = theta0.to(device, torch.float32)
                    value = method.merge(key, theta, ctx.task_vectors(key, theta))
                    writer.write(key, value.to("cpu", dtypes[key]))
                else:
                    writer.write(key, theta0.to(dtypes[key]))
            for name, src in head_tensors:
                writer.write(name, src.get(name).to(dtypes[name]))
        record["output"] = {
            "dtype": output.dtype,
            "max_shard_size": output.max_bytes,
            "files": writer.files,
        }
        record["seconds"] = round(time.perf_counter() - start, 3)
        # Recorded here, inside the temporary directory: nothing is written to ``out`` after the
        # rename (the merged tensors are all written, so the peak is reached by now).
        record["peak_added_mb"] = round(memory.peak_delta_mb, 1) if memory is not None else None
        record.update(method.report())
        _write_side_files(tmp, base_src, heads, record, output)
        write_json(tmp / "merge.json", record)
    base_src.close()
    for e in expert_srcs:
        e.close()
    return record


def _write_side_files(
    folder: Path, base: ModelSource, heads: dict[str, Any], record: dict, output: OutputOptions
) -> None:
    """Everything beside the weights: the config, the base's tokenizer and generation files
    (Hugging Face bases), and the model card."""
    _write_config(folder, base, heads, record, output.dtype)
    if output.copy_files and base.kind == "hf":
        record["copied_files"] = copy_base_files(base.path, folder)
    if output.model_card:
        library = "transformers" if base.kind == "hf" else "lorex"
        text = model_card_text(record, library, output.recipe_text)
        (folder / MODEL_CARD).write_text(text, encoding="utf-8")


def lorex_config(
    source: ModelSource, heads: dict[str, Any], weights: str, record: dict, **fields: Any
) -> dict[str, Any]:
    """A merged lorex model's ``config.json``: the backbone of ``source`` (the base), the
    experts' heads, and the merge's record; ``fields`` add a delta model's ``base`` and
    ``adapters``."""
    return {
        "lorex_version": __version__,
        "format_version": FORMAT_VERSION,
        "backbone": source.config["backbone"],
        "heads": heads,
        "active_head": next(iter(heads), None),
        "weights": weights,
        **fields,
        "made_by": record,
    }


def _write_config(
    folder: Path,
    base: ModelSource,
    heads: dict[str, Any],
    record: dict,
    out_dtype: str | None = None,
) -> None:
    """The merged model's config: a lorex config naming the experts' heads and how it was made,
    or, for a ``save_pretrained`` base, that folder's config again (its dtype field saying
    ``out_dtype`` when one is given)."""
    if base.kind == "lorex":
        write_json(folder / CONFIG, lorex_config(base, heads, "full", record))
    elif out_dtype is None:
        shutil.copy2(base.path / CONFIG, folder / CONFIG)
    else:
        write_json(folder / CONFIG, hf_config_with_dtype(read_json(base.path / CONFIG), out_dtype))
