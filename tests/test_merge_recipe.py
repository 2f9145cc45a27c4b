"""Per-expert weights and densities, mergekit's TIES/DARE-TIES options, and merge recipes.

The weighted methods are checked against plain loops over every entry written here from the
definitions (mergekit's generalized task arithmetic), not against lorex's vectorised maths; the
recipes against mergekit itself where it is installed (``compare`` extra).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorex.errors import LorexError
from lorex.merging import merge_models, method_from_name
from lorex.merging.methods.dare import drop_and_rescale_
from lorex.merging.recipe import Recipe, read_recipe, recipe_text, write_recipe
from tests.tiny_hf import TINY_LLAMA

SHAPES = {
    "layers.0.mlp.weight": (6, 5),
    "layers.0.mlp.bias": (5,),
    "layers.1.mlp.weight": (6, 5),
    "layers.1.mlp.bias": (5,),
    "embed.weight": (7, 3),
}


def _folder(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "toy"}))
    save_file(tensors, str(path / "model.safetensors"))
    return path


@pytest.fixture
def toy(tmp_path):
    """A Hugging Face-style base and three experts with random task vectors of mixed sign."""
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    experts = []
    for i in range(3):
        tensors = {
            k: v + torch.randn(v.shape, generator=g) * (0.1 + 0.05 * i) for k, v in base.items()
        }
        experts.append(_folder(tmp_path / f"e{i}", tensors))
    return _folder(tmp_path / "base", base), experts


def _load(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _taus(base: Path, experts: list[Path]) -> dict[str, list[list[float]]]:
    """Per key, per expert, the task vector's entries as Python floats."""
    b = _load(base)
    loaded = [_load(e) for e in experts]
    return {k: [(e[k] - b[k]).flatten().tolist() for e in loaded] for k in SHAPES}


def _sign(x: float) -> float:
    return (x > 0) - (x < 0)


# --- references: plain loops over entries -------------------------------------------------------
def _trim_global(taus, densities):
    """Per task, keep |x| >= the k-th smallest |x| over the whole task vector."""
    kept = {k: [list(row) for row in rows] for k, rows in taus.items()}
    for i, d in enumerate(densities):
        everything = sorted(abs(x) for k in taus for x in taus[k][i])
        k_th = len(everything) - int(len(everything) * d)
        if k_th == 0:
            continue
        threshold = everything[k_th - 1]
        for k in taus:
            kept[k][i] = [x if abs(x) >= threshold else 0.0 for x in taus[k][i]]
    return kept


def _trim_per_tensor(taus, densities):
    """Per task and tensor, keep the max(1, int(d * n)) largest |x|."""
    kept = {}
    for k, rows in taus.items():
        kept[k] = []
        for row, d in zip(rows, densities, strict=True):
            if d >= 1:
                kept[k].append(list(row))
                continue
            n = max(1, int(d * len(row)))
            order = sorted(range(len(row)), key=lambda j: -abs(row[j]))
            keep = set(order[:n])
            kept[k].append([x if j in keep else 0.0 for j, x in enumerate(row)])
    return kept


def _ties_reference(taus, weights, zero_sign, merge_func, scale):
    """Weigh, elect (``zero_sign`` where the sum is 0), disjoint merge; the update per key."""
    weighted = {
        k: [[w * x for x in row] for row, w in zip(rows, weights, strict=True)]
        for k, rows in taus.items()
    }
    if zero_sign == "majority":
        total = sum(
            _sign(sum(col)) for rows in weighted.values() for col in zip(*rows, strict=True)
        )
        fallback = _sign(total)
    else:
        fallback = 1.0
    out = {}
    for k, rows in weighted.items():
        merged = []
        for col in zip(*rows, strict=True):
            s = _sign(sum(col)) or fallback
            agree = [i for i, x in enumerate(col) if _sign(x) == s and x != 0]
            value = sum(col[i] for i in agree)
            if merge_func == "mean":
                divisor = sum(weights[i] for i in agree)
                value = value / (divisor if divisor != 0 else 1.0)
            merged.append(scale * value)
        out[k] = merged
    return out


def _check_update(out: Path, base: Path, expected: dict[str, list[float]], tol=1e-5):
    merged, b = _load(out), _load(base)
    for k, values in expected.items():
        got = (merged[k] - b[k]).flatten()
        assert torch.allclose(got, torch.tensor(values), atol=tol, rtol=0), k


WEIGHTS = [0.5, 2.0, -0.75]


@pytest.mark.parametrize("normalize", [True, False])
def test_average_weighted_matches_loop(toy, tmp_path, normalize):
    base, experts = toy
    method = method_from_name("average", normalize=normalize)
    merge_models(method, base, experts, tmp_path / "out", progress=False, weights=WEIGHTS)
    b, loaded = _load(base), [_load(e) for e in experts]
    merged = _load(tmp_path / "out")
    for k in SHAPES:
        flat = [e[k].flatten().tolist() for e in loaded]
        want = [sum(w * col[i] for i, w in enumerate(WEIGHTS)) for col in zip(*flat, strict=True)]
        if normalize:
            want = [x / sum(WEIGHTS) for x in want]
        assert torch.allclose(merged[k].flatten(), torch.tensor(want), atol=1e-5, rtol=0), k
    assert b.keys() == merged.keys()


def test_task_arithmetic_weighted_matches_loop(toy, tmp_path):
    base, experts = toy
    merge_models(
        method_from_name("task-arithmetic", scale=0.7),
        base,
        experts,
        tmp_path / "o",
        progress=False,
        weights=WEIGHTS,
    )
    taus = _taus(base, experts)
    want = {
        k: [
            0.7 * sum(w * c for w, c in zip(WEIGHTS, col, strict=True))
            for col in zip(*rows, strict=True)
        ]
        for k, rows in taus.items()
    }
    _check_update(tmp_path / "o", base, want)


def test_dare_weighted_and_per_expert_drop(toy, tmp_path):
    """dare: ``scale * sum_i w_i drop_i(tau_i)`` with drop_i = 1 - density_i; the masks are the
    seeded ones (``drop_and_rescale_``, whose rate is tested on its own below)."""
    base, experts = toy
    densities = [1.0, 0.5, 0.8]
    method = method_from_name("dare", scale=0.9, seed=3)
    merge_models(
        method, base, experts, tmp_path / "o", progress=False, weights=WEIGHTS, densities=densities
    )
    b, loaded = _load(base), [_load(e) for e in experts]
    want = {}
    for k in SHAPES:
        rows = []
        for i, e in enumerate(loaded):
            tau = (e[k] - b[k]).float()
            drop_and_rescale_(tau, 1 - densities[i], 3, i, k)
            rows.append(tau.flatten().tolist())
        want[k] = [
            0.9 * sum(w * c for w, c in zip(WEIGHTS, col, strict=True))
            for col in zip(*rows, strict=True)
        ]
    _check_update(tmp_path / "o", base, want)


def test_drop_rate_follows_density():
    tau = torch.ones(20000)
    drop_and_rescale_(tau, 0.3, 0, 0, "k")
    kept = float((tau != 0).float().mean())
    assert abs(kept - 0.7) < 0.02
    assert torch.allclose(tau[tau != 0], torch.full_like(tau[tau != 0], 1 / 0.7))


@pytest.mark.parametrize(
    "trim,zero_sign,merge_func",
    [
        ("global", "majority", "mean"),
        ("per-tensor", "positive", "mean"),
        ("per-tensor", "majority", "sum"),
        ("global", "positive", "sum"),
    ],
)
def test_ties_weighted_per_expert_density_matches_loop(toy, tmp_path, trim, zero_sign, merge_func):
    base, experts = toy
    densities = [0.5, 0.3, 0.8]
    method = method_from_name(
        "ties", trim=trim, zero_sign=zero_sign, merge_func=merge_func, scale=0.8
    )
    merge_models(
        method, base, experts, tmp_path / "o", progress=False, weights=WEIGHTS, densities=densities
    )
    taus = _taus(base, experts)
    trimmed = (_trim_global if trim == "global" else _trim_per_tensor)(taus, densities)
    _check_update(
        tmp_path / "o", base, _ties_reference(trimmed, WEIGHTS, zero_sign, merge_func, 0.8)
    )


def test_ties_density_option_applies_per_tensor(toy, tmp_path):
    """Without per-expert densities every task keeps ``density`` of each tensor."""
    base, experts = toy
    method = method_from_name("ties", trim="per-tensor", density=0.4, zero_sign="positive")
    merge_models(method, base, experts, tmp_path / "o", progress=False)
    trimmed = _trim_per_tensor(_taus(base, experts), [0.4] * 3)
    _check_update(
        tmp_path / "o", base, _ties_reference(trimmed, [1.0] * 3, "positive", "mean", 1.0)
    )


@pytest.mark.parametrize("zero_sign", ["majority", "positive"])
@pytest.mark.parametrize("merge_func", ["mean", "sum"])
def test_dare_ties_weighted_at_density_one_matches_loop(toy, tmp_path, zero_sign, merge_func):
    base, experts = toy
    method = method_from_name(
        "dare-ties", drop=0.0, zero_sign=zero_sign, merge_func=merge_func, scale=1.3
    )
    merge_models(method, base, experts, tmp_path / "o", progress=False, weights=WEIGHTS)
    _check_update(
        tmp_path / "o",
        base,
        _ties_reference(_taus(base, experts), WEIGHTS, zero_sign, merge_func, 1.3),
    )


def test_zero_sign_positive_reads_each_expert_once(toy, tmp_path, monkeypatch):
    """dare-ties and per-tensor ties with zero_sign positive need no whole-model pass."""
    from lorex.merging.sources import ModelSource

    base, experts = toy
    reads: list[str] = []
    original = ModelSource.get

    def counting(self, key):
        if self.path in experts:
            reads.append(key)
        return original(self, key)

    monkeypatch.setattr(ModelSource, "get", counting)
    for i, method in enumerate(
        [
            method_from_name("dare-ties", drop=0.2, zero_sign="positive"),
            method_from_name("ties", trim="per-tensor", zero_sign="positive", density=0.5),
        ]
    ):
        reads.clear()
        merge_models(method, base, experts, tmp_path / f"o{i}", progress=False)
        assert len(reads) == len(SHAPES) * len(experts), method.name


@pytest.mark.parametrize("name", ["doge", "wudi", "iso-c", "iso-cts", "tsv-m"])
def test_methods_without_weights_refuse_them(toy, tmp_path, name):
    base, experts = toy
    with pytest.raises(LorexError, match="takes no per-expert weights") as err:
        merge_models(method_from_name(name), base, experts, tmp_path / "o", weights=[1.0, 2.0, 1.0])
    assert "\n" not in str(err.value)
    assert not (tmp_path / "o").exists()
    with pytest.raises(LorexError, match="takes no per-expert densities"):
        merge_models(method_from_name(name), base, experts, tmp_path / "o", densities=[0.5] * 3)


def test_weights_count_and_values_checked(toy, tmp_path):
    base, experts = toy
    with pytest.raises(LorexError, match=r"weights: 2 given for 3 experts"):
        merge_models(method_from_name("ties"), base, experts, tmp_path / "o", weights=[1.0, 2.0])
    with pytest.raises(LorexError, match=r"densities: each must be in \(0, 1\]"):
        merge_models(
            method_from_name("ties"), base, experts, tmp_path / "o", densities=[0.5, 0.0, 1.0]
        )
    with pytest.raises(LorexError, match="average: takes no per-expert densities"):
        merge_models(
            method_from_name("average"), base, experts, tmp_path / "o", densities=[0.5] * 3
        )
    assert not (tmp_path / "o").exists()


def test_cli_weights(toy, tmp_path, capsys):
    from lorex.cli import main

    base, experts = toy
    args = [
        "merge",
        "--method",
        "task-arithmetic",
        "--base",
        str(base),
        "--experts",
        *map(str, experts),
    ]
    assert main([*args, "--weights", "1", "2", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--weights: 2 given for 3 experts" in err
    assert not (tmp_path / "o").exists()
    assert (
        main(
            [*args, "--weights", "0.5", "2", "-0.75", "--scale", "1", "--out", str(tmp_path / "o")]
        )
        == 0
    )
    taus = _taus(base, experts)
    want = {
        k: [
            sum(w * c for w, c in zip(WEIGHTS, col, strict=True)) for col in zip(*rows, strict=True)
        ]
        for k, rows in taus.items()
    }
    _check_update(tmp_path / "o", base, want)
    assert (
        main(
            [
                "merge",
                "--method",
                "tsv-m",
                "--base",
                str(base),
                "--experts",
                *map(str, experts),
                "--weights",
                "1",
                "1",
                "3",
                "--out",
                str(tmp_path / "t"),
            ]
        )
        == 2
    )
    assert "tsv-m: takes no per-expert weights" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["ties", "dare-ties"])
@pytest.mark.parametrize("zero_sign,expected", [("majority", -0.5), ("positive", 0.5)])
def test_zero_sign_where_the_elected_sum_is_zero(tmp_path, name, zero_sign, expected):
    """Entries whose task vectors cancel exactly get the model's majority (here negative) or +1."""
    g = torch.Generator().manual_seed(1)
    base = {k: torch.zeros(s) for k, s in SHAPES.items()}
    rows = []
    for i in range(3):
        tensors = {k: -torch.rand(s, generator=g) - 0.1 for k, s in SHAPES.items()}
        tensors["layers.0.mlp.weight"].view(-1)[:5] = (0.5, -0.5, 0.0)[i]
        rows.append(_folder(tmp_path / f"e{i}", tensors))
    b = _folder(tmp_path / "base", base)
    options = {"density": 1.0} if name == "ties" else {"drop": 0.0}
    method = method_from_name(name, zero_sign=zero_sign, **options)
    merge_models(method, b, rows, tmp_path / "o", progress=False)
    got = _load(tmp_path / "o")["layers.0.mlp.weight"].view(-1)[:5]
    assert torch.equal(got, torch.full((5,), expected))
    _check_update(
        tmp_path / "o", b, _ties_reference(_taus(b, rows), [1.0] * 3, zero_sign, "mean", 1.0)
    )


# --- recipes --------------------------------------------------------------------------------------
def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def named(toy, tmp_path):
    """The toy models under short names beside the recipe: base, e0, e1, e2."""
    return tmp_path


def test_mergekit_ties_maps_every_field(toy, named):
    path = _recipe(
        named,
        """
merge_method: ties
base_model: base
models:
  - model: e0
    parameters: {weight: 0.5, density: 0.3}
  - model: e1
  - model: base
    parameters: {weight: 9}
parameters: {density: 0.6, weight: 2, lambda: 0.9, normalize: false, int8_mask: true}
dtype: bfloat16
""",
    )
    r = read_recipe(path)
    assert r.method == "ties"
    assert r.options == {
        "scale": 0.9,
        "merge_func": "sum",
        "zero_sign": "positive",
        "density": 0.6,
        "trim": "per-tensor",
    }
    assert r.base == named / "base"
    assert r.experts == [named / "e0", named / "e1"]  # the base is the base, not an expert
    assert r.weights == [0.5, 2.0]
    assert r.densities == [0.3, 0.6]
    assert r.out_dtype == "bfloat16"


TIES_E0 = "merge_method: ties\nbase_model: base\nmodels: [{model: e0}]\n"
LINEAR = "merge_method: linear\nbase_model: base\n"
TA = "merge_method: task_arithmetic\nbase_model: base\n"
BASE = "base_model: base\n"


@pytest.mark.parametrize(
    "text,method,options,weights",
    [
        (
            LINEAR + "models:\n  - model: e0\n    parameters: {weight: 3}\n"
            "  - model: e1\n    parameters: {weight: 1}\nparameters: {weight: 2}\n",
            "average",
            {"normalize": True},
            [3.0, 1.0, 2.0],  # mergekit makes the unlisted base an input with the default weight
        ),
        (
            "merge_method: linear\nmodels:\n  - model: e0\n    parameters: {weight: 3}\n"
            "  - model: e1\n    parameters: {weight: 1}\nparameters: {normalize: false}\n",
            "average",
            {"normalize": False},
            [3.0, 1.0],
        ),
        (
            TA + "models:\n  - model: e0\n    parameters: {weight: 3}\n"
            "  - model: e1\n    parameters: {weight: 1}\n"
            "parameters: {lambda: 0.8, normalize: true}\n",
            "task-arithmetic",
            {"scale": 0.2},
            [3.0, 1.0],
        ),
        (
            "merge_method: dare_ties\nbase_model: base\nmodels:\n  - model: e0\n  - model: e1\n"
            "parameters: {density: 0.7, seed: 5, zero_sign: majority}\n",
            "dare-ties",
            {
                "scale": 1.0,
                "merge_func": "sum",
                "zero_sign": "majority",
                "drop": 1 - 0.7,
                "seed": 5,
            },
            None,
        ),
        (
            "merge_method: dare_linear\n"
            + BASE
            + "models:\n  - model: e0\n    parameters: {weight: 2}\n"
            "  - model: e1\n    parameters: {weight: 2}\n"
            "parameters: {lambda: 0.5, normalize: true}\n",
            "dare",
            {"scale": 0.125, "drop": 0.0, "seed": 0},
            [2.0, 2.0],
        ),
        (
            "merge_method: doge\nbase_model: base\nmodels:\n  - model: e0\n  - model: e1\n"
            "parameters: {steps: 100, lr: auto}\n",
            "doge",
            {"steps": 100, "lr": "auto"},
            None,
        ),
    ],
)
def test_mergekit_methods_map_onto_lorex(toy, named, text, method, options, weights):
    r = read_recipe(_recipe(named, text))
    assert (r.method, r.options, r.weights) == (method, options, weights)
    assert r.base == (named / "e0" if "base_model" not in text else named / "base")


BAD = [
    (
        "merge_method: frankenmerge\nbase_model: base\nmodels: [{model: e0}]\n",
        "merge_method: unknown method 'frankenmerge'",
    ),
    ("base_model: base\nmodels: [{model: e0}]\n", "merge_method: missing"),
    ("merge_method: ties\nbase_model: base\n", "models: missing"),
    ("merge_method: ties\nbase_model: base\nmodels: e0\n", "models: must be a non-empty list"),
    ("merge_method: ties\nbase_model: base\nmodels: [{model: nowhere}]\n", "models[0].model:"),
    ("merge_method: ties\nbase_model: gone\nmodels: [{model: e0}]\n", "base_model:"),
    ("merge_method: ties\nmodels: [{model: e0}]\n", "base_model: missing"),
    (
        "merge_method: ties\n" + BASE + "models: [{model: e0, parameters: {weight: heavy}}]\n",
        "models[0].parameters.weight: must be a number",
    ),
    (
        TIES_E0 + "parameters: {normalize: 1}\n",
        "parameters.normalize: must be true or false",
    ),
    (
        TIES_E0 + "parameters: {epsilon: 0.1}\n",
        "parameters.epsilon: ties does not take it",
    ),
    (
        LINEAR + "models: [{model: e0, parameters: {density: 0.5}}]\n",
        "models[0].parameters.density: not a per-model parameter",
    ),
    (
        TA + "models: [{model: e0}]\nparameters: {density: 0.5}\n",
        "parameters.density: task_arithmetic does not take it",
    ),
    (
        "merge_method: doge\nbase_model: base\nmodels: [{model: e0}]\nparameters: {density: 0.5}\n",
        "parameters.density: doge does not take it",
    ),
    (
        "merge_method: doge\nbase_model: base\nmodels: [{model: e0, parameters: {weight: 2}}]\n",
        "doge: takes no per-expert weights",
    ),
    (
        TIES_E0 + "parameters: {density: 0.5, rescale: true}\n",
        "parameters.rescale",
    ),
    (
        "merge_method: dare_ties\n" + BASE + "models: [{model: e0}]\n"
        "parameters: {density: 0.5, rescale: false}\n",
        "parameters.rescale",
    ),
    (
        TIES_E0 + "parameters: {trim: sideways}\n",
        "parameters: trim: must be one of global, per-tensor",
    ),
    (
        TIES_E0 + "parameters: {weight: [0, 1]}\n",
        "parameters.weight: gradients and filtered values are not supported",
    ),
    ("merge_method: ties\nbase_model: base\nslices: []\n", "slices: not supported"),
    (
        TIES_E0 + "flavour: x\n",
        "flavour: unknown field",
    ),
    (
        TIES_E0 + "dtype: float8\n",
        "dtype: must be one of",
    ),
    (
        "merge_method: ties\nbase_model: base\nmodels: [{model: base}]\n",
        "models: lists only the base",
    ),
    ("merge_method: [ties\n", "not valid YAML"),
    # a Python tag: safe_load builds no objects, so this is refused, not run
    ("merge_method: !!python/object/apply:os.getcwd []\n", "not valid YAML"),
    ("- just\n- a list\n", "must be a mapping"),
]


@pytest.mark.parametrize("text,needle", BAD)
def test_bad_recipes_one_line_nothing_written(toy, named, capsys, text, needle):
    from lorex.cli import main

    path = _recipe(named, text)
    out = named / "out"
    assert (
        main(
            [
                "merge",
                "--config",
                str(path),
                "--out",
                str(out),
                "--write-config",
                str(named / "w.yaml"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(path) in err and needle in err, err
    assert not out.exists() and not (named / "w.yaml").exists()


def test_config_and_flags_together_is_an_error(toy, named, capsys):
    from lorex.cli import main

    path = _recipe(named, TIES_E0)
    for extra in (["--method", "ties"], ["--density", "0.5"], ["--weights", "2"]):
        assert main(["merge", "--config", str(path), "--out", str(named / "o"), *extra]) == 2
        err = capsys.readouterr().err
        assert f"{extra[0]}: not with --config" in err
    assert main(["merge", "--out", str(named / "o"), "--base", str(named / "base")]) == 2
    assert "--method: required (or give a recipe with --config)" in capsys.readouterr().err
    assert not (named / "o").exists()


RUNS = [
    ["--method", "average", "--weights", "1", "2", "0.5"],
    ["--method", "average", "--no-normalize"],
    ["--method", "task-arithmetic", "--scale", "0.4", "--weights", "1", "2", "0.5"],
    ["--method", "ties", "--density", "0.5", "--weights", "1", "2", "0.5"],
    ["--method", "ties", "--trim", "per-tensor", "--zero-sign", "positive", "--merge-func", "sum"],
    ["--method", "dare", "--drop", "0.3", "--seed", "7", "--weights", "1", "2", "0.5"],
    ["--method", "dare-ties", "--drop", "0.2", "--zero-sign", "positive"],
    ["--method", "iso-cts", "--common", "0.5"],
    ["--method", "wudi", "--steps", "5"],
]


@pytest.mark.parametrize("flags", RUNS, ids=[" ".join(r[:2]) for r in RUNS])
def test_write_config_reproduces_the_run(toy, named, flags):
    """--write-config writes a recipe that --config merges to the very same tensors."""
    from lorex.cli import main

    base, experts = toy
    recipe = named / "sub" / "recipe.yaml"
    args = ["merge", "--base", str(base), "--experts", *map(str, experts), *flags]
    assert main([*args, "--out", str(named / "a"), "--write-config", str(recipe)]) == 0
    assert main(["merge", "--config", str(recipe), "--out", str(named / "b")]) == 0
    a, b = _load(named / "a"), _load(named / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    text = recipe.read_text()
    assert "../e0" in text  # relative to the recipe's folder
    again = read_recipe(recipe)
    assert recipe_text(again, recipe.parent) == text


def test_recipe_round_trip_api(toy, named):
    base, experts = toy
    r = Recipe(
        "ties",
        method_from_name("ties", trim="per-tensor").settings(),
        base,
        experts,
        weights=[1.0, 2.0, 3.0],
        densities=[0.2, 0.5, 1.0],
        out_dtype="float16",
    )
    text = write_recipe(named / "r.yaml", r)
    assert (
        "merge_method: ties" in text and "dtype: float16" in text and "zero_sign: majority" in text
    )
    back = read_recipe(named / "r.yaml")
    assert back == r
    # options left out are the method's defaults, in either form
    assert "trim: global" in recipe_text(Recipe("ties", {}, base, experts))
    assert "merge_method: doge" in recipe_text(Recipe("doge", {"steps": 3}, base, experts))


# --- against mergekit -----------------------------------------------------------------------------
#: name -> (merge_method, with the base listed?, parameters), each over the same three experts.
MERGEKIT_RECIPES = {
    "linear": ("linear", True, "{}"),
    "linear-sum": ("linear", False, "{normalize: false}"),
    "task_arithmetic": ("task_arithmetic", False, "{lambda: 0.7}"),
    "task_arithmetic-normalize": ("task_arithmetic", False, "{normalize: true}"),
    "ties": ("ties", False, "{density: 1.0, lambda: 0.9}"),
    "ties-half": ("ties", False, "{density: 0.5}"),
    "ties-sum": ("ties", False, "{density: 0.5, normalize: false}"),
    "dare_ties": ("dare_ties", False, "{density: 1.0}"),
}


def _mergekit_yaml(method: str, list_base: bool, parameters: str, models: str) -> str:
    """A mergekit recipe; ``linear-sum`` has no base_model (the first model is the base)."""
    base = "" if parameters == "{normalize: false}" and method == "linear" else "base_model: base\n"
    listed = "  - model: base\n    parameters: {weight: 0.5}\n" if list_base else ""
    return (
        f"merge_method: {method}\n{base}models:\n{models}{listed}"
        f"parameters: {parameters}\ndtype: float32\n"
    )


RUN_MERGEKIT = """
import sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
args = sys.argv[1:]
for recipe, out in zip(args[::2], args[1::2]):
    with open(recipe) as fh:
        config = MergeConfiguration.model_validate(yaml.safe_load(fh))
    run_merge(config, out, MergeOptions(write_model_card=False, quiet=True))
"""


def _llamas(root: Path, shard: str | None) -> None:
    """A tiny float32 LlamaForCausalLM base and three perturbed experts, saved with
    save_pretrained (several shards and an index when ``shard`` is given)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(**TINY_LLAMA)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float()
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(root / "base", safe_serialization=True, **kwargs)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(3):
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(base[k] + torch.randn(p.shape, generator=g) * 0.02)
        model.save_pretrained(root / f"e{i}", safe_serialization=True, **kwargs)


def _all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("shard", [None, "40KB"], ids=["one-file", "sharded"])
def test_recipes_match_mergekit(tmp_path, shard):
    """The same YAML through mergekit and through ``lorex merge --config``: max |diff| <= 1e-5
    over every tensor, for linear, task_arithmetic, ties (density 1 and, per tensor, 0.5) and
    dare_ties at density 1, with unequal per-model weights."""
    pytest.importorskip("mergekit")
    _llamas(tmp_path, shard)
    if shard:
        assert len(list((tmp_path / "base").glob("*.safetensors"))) > 1
        assert (tmp_path / "base" / "model.safetensors.index.json").is_file()
    models = "".join(
        f"  - model: e{i}\n    parameters: {{weight: {w}}}\n" for i, w in enumerate([0.3, 1.2, 0.7])
    )
    jobs = []
    for name, (method, list_base, parameters) in MERGEKIT_RECIPES.items():
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(_mergekit_yaml(method, list_base, parameters, models))
        jobs += [str(recipe), str(tmp_path / f"mergekit-{name}")]
    # One process for every recipe (mergekit's import is slow), run where the YAML's relative
    # paths mean what they mean to lorex (mergekit reads them against the working folder).
    subprocess.run(
        [sys.executable, "-c", RUN_MERGEKIT, *jobs],
        check=True,
        capture_output=True,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    from lorex.cli import main

    base = _all_tensors(tmp_path / "base")
    for name in MERGEKIT_RECIPES:
        ours = tmp_path / f"lorex-{name}"
        sharding = ["--max-shard-size", shard] if shard else []  # sharded in, sharded out
        command = ["merge", "--config", str(tmp_path / f"{name}.yaml"), "--out", str(ours)]
        assert main([*command, *sharding]) == 0
        if shard:
            assert len(list(ours.glob("model-*-of-*.safetensors"))) > 1
        a, b = _all_tensors(ours), _all_tensors(tmp_path / f"mergekit-{name}")
        assert a.keys() == b.keys(), name
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert worst <= 1e-5, (name, worst)
        assert max(float((a[k] - base[k]).abs().max()) for k in a) > 1e-3, name  # not the base
