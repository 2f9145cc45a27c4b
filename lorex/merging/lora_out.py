"""LoRA in, LoRA out: merge LoRA experts of one base into one LoRA adapter of a chosen rank.

Any method runs as in ``merge_models``, tensor by tensor, on the exact dense task vectors
(``s * B @ A`` per expert); the merged update ``D = theta - theta_0`` of each adapted matrix is
then cut to rank ``R`` by its SVD, ``B = U_R S_R^(1/2)``, ``A = S_R^(1/2) V_R^T``, with
``lora_alpha = R`` (scaling 1). By Eckart-Young this is the closest rank-``R`` update in the
Frobenius norm, so the error against the dense merge is the energy of the dropped singular values;
it is reported per tensor and for the whole adapter. A and B are never combined separately:
averaging factors (PEFT's ``add_weighted_adapter`` with ``combination_type="linear"``) gives
``mean(B) mean(A)``, which is not the mean of the updates ``mean(B A)``.

Only matrices some expert's LoRA adapts can change: every other tensor's task vectors are zero,
so each method leaves it at the base's value. A method that changes anything else (an adapter
that trained biases) is refused, as is a full expert: an adapter cannot carry those changes.
A convolution's update is factorised as the matrix ``(out, in * k * k)``, as lorex's and PEFT's
convolution LoRA layers store it.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lorex.adapters.lora import LoraConfig
from lorex.adapters.lora.model import CONFIG_NAME as ADAPTER_CONFIG
from lorex.adapters.lora.model import PEFT_PREFIX
from lorex.adapters.lora.model import WEIGHTS_NAME as ADAPTER_WEIGHTS
from lorex.errors import LorexError
from lorex.io import atomic_directory, save_tensors, write_json
from lorex.merging.base import KEPT, MergeContext, MergeMethod
from lorex.merging.merge import _expert_heads, check_experts, check_per_expert, lorex_config
from lorex.merging.output import check_out_path, output_dtype, resolve_out_dtype
from lorex.merging.sources import ModelSource, open_expert
from lorex.metrics.resources import PeakMemory
from lorex.models.layout import file_sha256
from lorex.models.store import CONFIG, WEIGHTS
from lorex.version import __version__

#: The factor names of a linear or convolution layer (an embedding's are lora_embedding_A/B).
EMBEDDING_FREE = ("lora_A.weight", "lora_B.weight")
#: Where a lorex output model keeps its one adapter (lorex's layout for adapter "default").
ADAPTER_DIR = "adapter"


def low_rank_factors(
    delta: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """``(A, B, error, norm)``: the best rank-``rank`` factors of ``delta`` (2-D or a conv
    weight), ``B @ A`` approximating ``delta.flatten(1)``; ``error`` is the Frobenius norm of
    what is left out and ``norm`` that of ``delta``. A rank above the matrix's is padded with
    zero rows/columns so every tensor of an adapter has the same ``r``."""
    matrix = delta.float().flatten(1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    kept = min(rank, len(s))
    root = s[:kept].sqrt()
    b = torch.zeros(matrix.shape[0], rank)
    a = torch.zeros(rank, matrix.shape[1])
    b[:, :kept] = u[:, :kept] * root
    a[:kept] = root[:, None] * vh[:kept]
    error = float(s[kept:].square().sum().sqrt())
    norm = float(s.square().sum().sqrt())
    if delta.ndim == 4:  # conv: A is a conv with the base's kernel, B a 1x1 conv
        a = a.view(rank, *delta.shape[1:])
        b = b.view(delta.shape[0], rank, 1, 1)
    return a, b, error, norm


def lora_targets(experts: list[ModelSource]) -> dict[str, bool]:
    """The base keys any expert's LoRA adapts -> whether it is an embedding's; a full expert
    has no place in an adapter."""
    targets: dict[str, bool] = {}
    for expert in experts:
        keys = expert.lora_keys()
        if keys is None:
            raise LorexError(
                f"expert {expert.path}: a full model; --out-rank merges LoRA experts only "
                "(merge without --out-rank for a dense model)"
            )
        for key, embedding in keys.items():
            targets[key] = targets.get(key, False) or embedding
    if not targets:
        raise LorexError("--out-rank: no expert has an applied LoRA adapter")
    return targets


def module_name(key: str, base: ModelSource) -> str:
    """The module path PEFT sees for base key ``key``: a lorex model's adapters are relative to
    its backbone, a Hugging Face model's to the model transformers builds (whose names may
    differ from the file's keys)."""
    if base.kind == "lorex":
        return key[len("backbone.") : -len(".weight")]
    return base.module_names().get(key, key)[: -len(".weight")]


def merge_to_lora(
    method: MergeMethod,
    base: str | Path,
    experts: list[str | Path],
    out: str | Path,
    rank: int,
    progress: bool | None = None,
    device: torch.device | str = "cpu",
    *,
    out_dtype: str | None = None,
    weights: list[float] | None = None,
    densities: list[float] | None = None,
) -> dict[str, Any]:
    """Merge LoRA ``experts`` of ``base`` with ``method`` into one rank-``rank`` LoRA adapter.

    For a Hugging Face base ``out`` is a PEFT adapter folder (``PeftModel.from_pretrained``
    loads it on the base); for a lorex base it is a lorex model holding the adapter and the
    experts' heads. Returns the record written to ``merge.json``, whose ``lora_out`` gives the
    relative Frobenius error of the adapter against the dense merge, per tensor and overall.
    A and B take ``out_dtype`` (default: each adapted weight's dtype in the base); ``weights``
    and ``densities`` are ``merge_models``'.
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise LorexError(f"out-rank: must be a whole number of at least 1, got {rank!r}")
    if len(experts) < 1:
        raise LorexError("merge needs at least one expert")
    check_out_path(Path(out), [("the base", Path(base))] + [("expert", Path(e)) for e in experts])
    dtype = resolve_out_dtype(out_dtype)
    check_per_expert(method, len(experts), weights, densities)
    with PeakMemory() as memory:
        start = time.perf_counter()
        base_src = ModelSource(base)
        expert_srcs = [open_expert(e, base_src) for e in experts]
        keys = check_experts(base_src, expert_srcs)
        targets = lora_targets(expert_srcs)
        rules = method.plan({k: base_src.spec(k) for k in keys}, len(expert_srcs))
        merged_keys = [k for k in keys if rules[k] != KEPT]
        ctx = MergeContext(
            base_src, expert_srcs, merged_keys, torch.device(device), weights, densities
        )
        method.begin(ctx)
        factors, errors = _factorise(method, ctx, targets, rank, progress, dtype)
        record = _record(method, base_src, expert_srcs, rank, errors)
        record["seconds"] = round(time.perf_counter() - start, 3)
        record["peak_added_mb"] = round(memory.peak_delta_mb, 1)
        record.update(method.report())
        _write(Path(out), Path(base), base_src, expert_srcs, factors, rank, record)
    for src in (base_src, *expert_srcs):
        src.close()
    return record


def _factorise(
    method: MergeMethod,
    ctx: MergeContext,
    targets: dict[str, bool],
    rank: int,
    progress: bool | None,
    dtype: torch.dtype | None,
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[float, float]]]:
    """A and B (under PEFT's keys) of every adapted tensor, and its (error, norm)."""
    factors: dict[str, torch.Tensor] = {}
    errors: dict[str, tuple[float, float]] = {}
    bar = tqdm(ctx.keys, desc=f"merge ({method.name}) to LoRA", unit="tensor", disable=not progress)
    for key in bar:
        theta0 = ctx.base.get(key)
        theta = theta0.to(ctx.device, torch.float32)
        delta = (method.merge(key, theta.clone(), ctx.task_vectors(key, theta)) - theta).cpu()
        if key not in targets:
            if bool(delta.ne(0).any()):
                raise LorexError(
                    f"{method.name} changes '{key}', which no expert's LoRA adapts; an adapter "
                    "cannot carry that change (merge without --out-rank for a dense model)"
                )
            continue
        embedding = targets[key]
        # PEFT keeps an embedding's update transposed: (B @ A).T, B (dim, r), A (r, vocab)
        a, b, error, norm = low_rank_factors(delta.T if embedding else delta, rank)
        stem = f"{PEFT_PREFIX}{module_name(key, ctx.base)}"
        names = ("lora_embedding_A", "lora_embedding_B") if embedding else EMBEDDING_FREE
        factors[f"{stem}.{names[0]}"] = a.to(output_dtype(theta0.dtype, dtype))
        factors[f"{stem}.{names[1]}"] = b.to(output_dtype(theta0.dtype, dtype))
        errors[key] = (error, norm)
    return factors, errors


def _record(
    method: MergeMethod,
    base: ModelSource,
    experts: list[ModelSource],
    rank: int,
    errors: dict[str, tuple[float, float]],
) -> dict[str, Any]:
    total_error = math.sqrt(sum(e * e for e, _ in errors.values()))
    total_norm = math.sqrt(sum(n * n for _, n in errors.values()))
    per_tensor = {k: (e / n if n > 0 else 0.0) for k, (e, n) in errors.items()}
    return {
        "command": "merge",
        "method": method.name,
        "settings": method.settings(),
        "base": {"path": str(base.path), "sha256": base.sha256()},
        "experts": [{"path": str(e.path), "sha256": e.sha256()} for e in experts],
        "weights": method.task_weights(len(experts), torch.device("cpu")).tolist(),
        "lora_out": {
            "rank": rank,
            "tensors": len(errors),
            # ||dense merged update - B A||_F / ||dense merged update||_F, over every tensor
            "relative_error": total_error / total_norm if total_norm > 0 else 0.0,
            "max_tensor_relative_error": max(per_tensor.values(), default=0.0),
            "per_tensor_relative_error": per_tensor,
        },
        "lorex_version": __version__,
        "torch_version": torch.__version__,
    }


def _adapter_config(rank: int, modules: list[str], base_name: str) -> dict[str, Any]:
    config = LoraConfig(r=rank, lora_alpha=float(rank), target_modules=sorted(modules))
    return config.to_peft(base_name)


def _write(
    out: Path,
    base_arg: Path,
    base: ModelSource,
    experts: list[ModelSource],
    factors: dict[str, torch.Tensor],
    rank: int,
    record: dict[str, Any],
) -> None:
    modules = sorted({k[len(PEFT_PREFIX) :].rsplit(".lora_", 1)[0] for k in factors})
    with atomic_directory(out) as tmp:
        if base.kind == "hf":
            save_tensors(tmp / ADAPTER_WEIGHTS, factors, metadata={"format": "pt"})
            write_json(tmp / ADAPTER_CONFIG, _adapter_config(rank, modules, str(base_arg)))
        else:
            _write_lorex_model(tmp, out, base_arg, base, experts, factors, rank, modules, record)
        write_json(tmp / "merge.json", record)


def _write_lorex_model(
    tmp: Path,
    out: Path,
    base_arg: Path,
    base: ModelSource,
    experts: list[ModelSource],
    factors: dict[str, torch.Tensor],
    rank: int,
    modules: list[str],
    record: dict[str, Any],
) -> None:
    """A lorex delta model: the experts' heads in its own file, the adapter beside it."""
    heads, owner = _expert_heads(experts)
    head_tensors = {
        f"heads.{key}.{part}": owner[key].get(f"heads.{key}.{part}")
        for key in heads
        for part in ("weight", "bias")
        if f"heads.{key}.{part}" in owner[key].own_keys()
    }
    save_tensors(
        tmp / WEIGHTS, head_tensors, metadata={"format": "pt", "lorex_version": __version__}
    )
    base_rel = os.path.relpath(base_arg.resolve(), out.resolve())
    adapter_config = _adapter_config(rank, modules, base_rel)
    (tmp / ADAPTER_DIR).mkdir()
    save_tensors(tmp / ADAPTER_DIR / ADAPTER_WEIGHTS, factors, metadata={"format": "pt"})
    write_json(tmp / ADAPTER_DIR / ADAPTER_CONFIG, adapter_config)
    entry = {
        "name": "default",
        "path": ADAPTER_DIR,
        "state": "active",
        "weight": 1.0,
        "sha256": file_sha256(tmp / ADAPTER_DIR / ADAPTER_WEIGHTS),
        "config": adapter_config,
    }
    base_entry = {"path": base_rel, "sha256": base.sha256()}
    config = lorex_config(base, heads, "delta", record, base=base_entry, adapters=[entry])
    write_json(tmp / CONFIG, config)
