"""Merging at LLM size: cheap non-finite checks, how often each expert is read, and the solver
budget of the block-wise methods (deterministic, recorded as steps_used)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorex.errors import LorexError
from lorex.io import SafetensorsReader
from lorex.merging import merge_models, method_from_name
from lorex.merging.base import MERGE_METHODS, MergeContext
from lorex.merging.ops import FoldedMajority, global_thresholds
from lorex.merging.select import kth_for_density
from lorex.merging.sources import ModelSource, all_finite
from lorex.merging.steps import budgeted_steps

HIDDEN, FFN, VOCAB, LAYERS = 16, 24, 40, 2
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = {"gate_proj": (FFN, HIDDEN), "up_proj": (FFN, HIDDEN), "down_proj": (HIDDEN, FFN)}


def llama_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        layer = f"model.layers.{i}."
        shapes |= {f"{layer}self_attn.{p}.weight": (HIDDEN, HIDDEN) for p in PROJ}
        shapes |= {f"{layer}mlp.{p}.weight": s for p, s in MLP.items()}
        shapes |= {f"{layer}{n}.weight": (HIDDEN,) for n in ("input_layernorm", "post_norm")}
    return shapes | {"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}


def hf_folder(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    path.mkdir(parents=True)
    save_file(tensors, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return str(path)


def tiny_llama_zoo(root: Path, n_experts: int = 3):
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g) for k, s in llama_shapes().items()}
    experts = [
        hf_folder(
            root / f"e{i}",
            {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()},
        )
        for i in range(n_experts)
    ]
    return hf_folder(root / "base", base), experts


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return tiny_llama_zoo(tmp_path_factory.mktemp("llama"))


# --- the non-finite check ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize(
    "poison", [[float("nan")], [float("inf")], [float("-inf")], [float("inf"), float("-inf")]]
)
def test_a_non_finite_entry_hidden_in_a_big_tensor_is_found(dtype, poison):
    t = torch.randn(1000, 1000).to(dtype)
    assert all_finite(t)
    g = torch.Generator().manual_seed(1)
    for value, where in zip(
        poison, torch.randperm(t.numel(), generator=g)[: len(poison)], strict=True
    ):
        t.view(-1)[where] = value
    assert not all_finite(t)


def test_finite_values_whose_sum_overflows_pass_and_integers_are_not_checked():
    big = torch.full((1000,), 3e38)  # finite float32; the sum overflows to inf
    assert all_finite(big) and all_finite(big.bfloat16())
    assert all_finite(torch.full((1000,), 60000.0, dtype=torch.float16))  # sum > float16 max
    assert all_finite(torch.full((4,), 2**62, dtype=torch.int64))


def test_a_nan_in_a_big_expert_tensor_is_one_line_naming_file_and_tensor(zoo, tmp_path):
    base, experts = zoo
    reader = SafetensorsReader(Path(experts[1]) / "model.safetensors")
    tensors = {k: reader.get(k).clone() for k in reader.keys()}
    tensors["lm_head.weight"][VOCAB - 3, 7] = float("nan")
    bad = hf_folder(tmp_path / "bad", tensors)
    with pytest.raises(LorexError) as err:
        merge_models(method_from_name("task-arithmetic"), base, [experts[0], bad], tmp_path / "m")
    assert str(Path(bad) / "model.safetensors") in str(err.value)
    assert "'lm_head.weight'" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "m").exists()


# --- reads per expert ----------------------------------------------------------------------------
#: Streamed passes over every expert per method, with its default options (docs/merging.md).
PASSES = {
    "average": 1,
    "task-arithmetic": 1,
    "dare": 1,
    "iso-c": 1,
    "tsv-m": 1,
    "iso-cts": 1,
    "wudi": 1,
    "dare-ties": 2,  # whole-model majority sign, then the merge
    "ties": 3,  # two radix-select passes (the second also takes the majority sign), the merge
    "doge": 3,  # two radix-select passes (the first also takes eta's norms), the merge
}


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_each_expert_tensor_is_read_once_per_pass(zoo, tmp_path, monkeypatch, method):
    base, experts = zoo
    reads: Counter[tuple[str, str]] = Counter()
    real_get = SafetensorsReader.get

    def counting_get(self, name):
        reads[(self.path.parent.name, name)] += 1
        return real_get(self, name)

    monkeypatch.setattr(SafetensorsReader, "get", counting_get)
    options = {"steps": 2} if method in ("doge", "wudi") else {}
    rec = merge_models(
        method_from_name(method, **options), base, experts, tmp_path / "m", progress=False
    )
    kept = set(rec["rules"].get("kept_from_base", []))
    for folder in ["base", *(Path(e).name for e in experts)]:
        for key in llama_shapes():
            # a tensor kept from the base: read once from the base, never from an expert
            expected = (1 if folder == "base" else 0) if key in kept else PASSES[method]
            assert reads[(folder, key)] == expected, (folder, key)


# --- the solver budget ---------------------------------------------------------------------------
def block_matrices() -> list[tuple[int, int]]:
    return [s for k, s in llama_shapes().items() if ".layers." in k and len(s) == 2]


def test_wudi_budget_bounds_the_steps_from_the_shapes_and_is_deterministic(zoo, tmp_path):
    base, experts = zoo
    per_step = sum(2 * o * i * i + 12 * o * i for o, i in block_matrices())
    budget_steps = 3
    max_gflop = (budget_steps + 0.5) * per_step / 1e9
    runs = []
    for name in ("a", "b"):
        method = method_from_name("wudi", steps=40, max_gflop=max_gflop)
        runs.append(merge_models(method, base, experts, tmp_path / name, progress=False))
    assert runs[0]["steps_used"] == budget_steps
    assert runs[0]["solver_gflop_per_step"] == pytest.approx(per_step / 1e9, rel=1e-5)
    assert runs[0]["solver_gflop"] <= max_gflop
    unbounded = method_from_name("wudi", steps=budget_steps, max_gflop=0)
    rec = merge_models(unbounded, base, experts, tmp_path / "c", progress=False)
    assert rec["steps_used"] == budget_steps
    weights = [(tmp_path / n / "model.safetensors").read_bytes() for n in ("a", "b", "c")]
    assert weights[0] == weights[1] == weights[2]


def test_doge_budget_counts_tasks_and_shared_directions(zoo, tmp_path):
    base, experts = zoo
    n, subspace = len(experts), 6
    per_step = sum((4 * n + 4 * (min(s) // subspace) + 12) * s[0] * s[1] for s in block_matrices())
    method = method_from_name("doge", steps=30, max_gflop=2.5 * per_step / 1e9)
    rec = merge_models(method, base, experts, tmp_path / "a", progress=False)
    assert rec["steps_used"] == 2
    assert rec["solver_gflop_per_step"] == pytest.approx(per_step / 1e9, rel=1e-6)
    same = method_from_name("doge", steps=2, max_gflop=0)
    merge_models(same, base, experts, tmp_path / "b", progress=False)
    weights = [(tmp_path / n / "model.safetensors").read_bytes() for n in ("a", "b")]
    assert weights[0] == weights[1]


@pytest.mark.parametrize("method", ["doge", "wudi"])
def test_by_default_there_is_no_budget(zoo, tmp_path, method):
    assert method_from_name(method).options.max_gflop == 0
    big = method_from_name(method, steps=10**6).options  # no step count is too many
    assert budgeted_steps(big.steps, 1e15, big.max_gflop) == 10**6
    rec = merge_models(method_from_name(method, steps=3), *zoo, tmp_path / "m", progress=False)
    assert rec["steps_used"] == 3


def test_a_negative_budget_is_refused():
    with pytest.raises(LorexError, match="max-gflop"):
        method_from_name("wudi", max_gflop=-1.0)


# --- TIES' majority sign, folded into the thresholds' second pass -------------------------------
@pytest.mark.parametrize("quantised", [False, True])
def test_folded_majority_counts_the_signs_a_brute_force_loop_does(tmp_path, monkeypatch, quantised):
    base, experts = tiny_llama_zoo(tmp_path, n_experts=4)
    if quantised:  # bf16 experts: many equal magnitudes, so many entries share a threshold bin
        for e in experts:
            f = Path(e) / "model.safetensors"
            r = SafetensorsReader(f)
            save_file({k: r.get(k).bfloat16().float() for k in r.keys()}, f)
    ctx = MergeContext(ModelSource(base), [ModelSource(e) for e in experts], list(llama_shapes()))
    folded = FoldedMajority()
    thresholds = global_thresholds(ctx, 0.3, None, folded.observe)
    majority = folded.result(thresholds)
    taus = torch.cat([ctx.task_vectors(k).flatten(1) for k in ctx.keys], 1)
    expected = [float(t.abs().kthvalue(kth_for_density(t.numel(), 0.3)).values) for t in taus]
    assert thresholds == expected
    limit = torch.tensor(expected)[:, None]
    brute = int(torch.sign((taus * (taus.abs() >= limit)).sum(0)).sum())
    assert folded.signs == brute
    assert majority == (brute > 0) - (brute < 0)
    assert folded.deferred == [] and 0 < folded.held < taus.numel() * 4


def test_ties_without_room_to_hold_entries_takes_a_pass_and_merges_the_same(
    zoo, tmp_path, monkeypatch
):
    base, experts = zoo
    merge_models(method_from_name("ties"), base, experts, tmp_path / "a", progress=False)
    reads: Counter[str] = Counter()
    real_get = SafetensorsReader.get

    def counting_get(self, name):
        reads[name] += self.path.parent.name == "e0"
        return real_get(self, name)

    monkeypatch.setattr(SafetensorsReader, "get", counting_get)
    monkeypatch.setattr("lorex.merging.ops.DEFERRED_BYTES", 0)
    merge_models(method_from_name("ties"), base, experts, tmp_path / "b", progress=False)
    assert set(reads.values()) == {4}  # the majority sign took a pass of its own
    weights = [(tmp_path / n / "model.safetensors").read_bytes() for n in ("a", "b")]
    assert weights[0] == weights[1]


def test_folded_majority_with_weights_and_per_expert_densities(tmp_path):
    """The fold elects signs on the weighted, trimmed vectors as TIES does, and a task that keeps
    everything (density 1: no threshold bin) never waits."""
    base, experts = tiny_llama_zoo(tmp_path, n_experts=4)
    ctx = MergeContext(ModelSource(base), [ModelSource(e) for e in experts], list(llama_shapes()))
    weights = torch.tensor([0.5, 2.0, -0.7, 1.3])
    densities = [0.3, 1.0, 0.5, 0.2]
    folded = FoldedMajority(weights)
    thresholds = global_thresholds(ctx, densities, None, folded.observe)
    majority = folded.result(thresholds)
    taus = torch.cat([ctx.task_vectors(k).flatten(1) for k in ctx.keys], 1)
    expected = [
        float(t.abs().kthvalue(k).values) if (k := kth_for_density(t.numel(), d)) else 0.0
        for t, d in zip(taus, densities, strict=True)
    ]
    assert thresholds == expected
    kept = taus * (taus.abs() >= torch.tensor(expected)[:, None]) * weights[:, None]
    brute = int(torch.sign(kept.sum(0)).sum())
    assert folded.signs == brute
    assert majority == (brute > 0) - (brute < 0)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.93])
def test_per_tensor_trim_keeps_exactly_k_largest_even_with_ties(density):
    """keep_top_ keeps exactly int(density * n) entries, unchanged, none smaller in magnitude than
    any it drops, also where many magnitudes are equal (bf16-like values), as mergekit's
    argsort does."""
    from lorex.merging.ops import keep_top_

    g = torch.Generator().manual_seed(5)
    levels = torch.randint(1, 14, (4000,), generator=g).float() / 4  # 13 magnitudes: many ties
    values = levels * torch.where(torch.rand(4000, generator=g) < 0.5, -1.0, 1.0)
    trimmed = keep_top_(values.clone(), density)
    kept = trimmed != 0
    assert int(kept.sum()) == max(1, int(density * values.numel()))
    assert torch.equal(trimmed[kept], values[kept])
    assert float(values.abs()[kept].min()) >= float(values.abs()[~kept].max())
