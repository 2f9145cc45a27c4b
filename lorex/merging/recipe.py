"""Merge recipes: mergekit's YAML for the methods both tools have, lorex's names for the rest.

A recipe names the method, the base, the experts with their weights (and densities) and the
method's settings, so a merge can be kept, shared and rerun (``lorex merge --config``), and a run
can be written back as one (``lorex merge --write-config``).

mergekit's methods map onto lorex's so that the merged model equals mergekit's:

- ``linear`` -> ``average`` with the weights; mergekit makes every listed model *and* the
  ``base_model`` an input, so the base is an expert too (its task vector is 0) unless its weight
  is 0; without ``base_model`` the first model is the base. ``normalize: false`` -> the
  undivided weighted sum (``average``'s ``normalize``).
- ``task_arithmetic`` -> ``task-arithmetic``, ``scale = lambda`` (divided by the sum of the
  weights with ``normalize: true``).
- ``ties`` -> ``ties`` with ``trim: per-tensor``, ``zero_sign: positive``, ``merge_func`` mean
  (``normalize: true``, mergekit's default) or sum, ``scale = lambda``.
- ``dare_ties`` -> ``dare-ties`` with ``drop = 1 - density``, ``zero_sign: positive``,
  ``merge_func`` sum (``normalize: false``, mergekit's default) or mean; ``dare_linear`` ->
  ``dare``. lorex rescales the kept entries by ``1 / (1 - p)``, mergekit to the L1 norm: the same
  at density 1, and no random drop reproduces mergekit's random numbers anyway.

For these methods a model that is the base counts as the base, not an expert (as in mergekit).
lorex settings that mergekit has no word for (``trim``, ``zero_sign``, ``seed``) may sit in the
same ``parameters``. Any other lorex method is written with its lorex name and option names
(``merge_method: doge``, ``parameters: {steps: 100}``). Relative paths are relative to the YAML's
folder.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorex.errors import LorexError
from lorex.io import atomic_write_bytes
from lorex.merging.base import MERGE_METHODS, MergeMethod
from lorex.merging.methods import method_from_name

#: mergekit's name -> lorex's, for the methods both have.
MERGEKIT_METHODS = {
    "linear": "average",
    "task_arithmetic": "task-arithmetic",
    "ties": "ties",
    "dare_ties": "dare-ties",
    "dare_linear": "dare",
}
#: What each mergekit method's ``parameters`` may hold (``weight``/``density``: every model's
#: default), and the lorex settings mergekit has no word for.
_SHARED = ("weight", "normalize", "lambda", "int8_mask")
MERGEKIT_PARAMETERS = {
    "linear": ("weight", "normalize"),
    "task_arithmetic": _SHARED,
    "ties": (*_SHARED, "density", "rescale", "trim", "zero_sign"),
    "dare_ties": (*_SHARED, "density", "rescale", "zero_sign", "seed"),
    "dare_linear": (*_SHARED, "density", "rescale", "seed"),
}
#: Output dtypes a recipe may name (mergekit's ``dtype`` / ``out_dtype``).
DTYPES = ("float32", "float16", "bfloat16")
_TOP_LEVEL = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype")
_UNSUPPORTED = ("slices", "modules", "tokenizer_source", "tokenizer", "chat_template")


@dataclass(frozen=True)
class Recipe:
    """One merge: a lorex method and its options, the base, the experts, their weights and
    densities (None: 1.0 each / the method's option) and the output dtype (None: the base's)."""

    method: str
    options: dict[str, Any]
    base: Path
    experts: list[Path]
    weights: list[float] | None = None
    densities: list[float] | None = None
    out_dtype: str | None = None
    source: Path | None = field(default=None, compare=False)

    def build_method(self) -> MergeMethod:
        return method_from_name(self.method, **self.options)


# --- reading -------------------------------------------------------------------------------------
class _Reader:
    """Checks on one YAML file's values, each error naming the file and the field."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, where: str, what: str) -> LorexError:
        return LorexError(f"{self.path}: {where}: {what}")

    def number(self, where: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(where, f"must be a number, got {value!r}")
        return float(value)

    def flag(self, where: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.fail(where, f"must be true or false, got {value!r}")
        return value

    def model_path(self, where: str, value: Any) -> Path:
        if not isinstance(value, str) or not value:
            raise self.fail(where, f"must be a path, got {value!r}")
        path = Path(value)
        path = path if path.is_absolute() else self.path.parent / path
        if not path.is_dir():
            raise self.fail(where, f"{path} is not a folder")
        return path

    def mapping(self, where: str, value: Any) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise self.fail(where, f"must be a mapping, got {value!r}")
        for key, item in value.items():
            if isinstance(item, list | dict):
                raise self.fail(f"{where}.{key}", "gradients and filtered values are not supported")
        return value


def read_recipe(path: str | Path) -> Recipe:
    """The recipe in ``path``, or a one-line error naming the file and the field."""
    path = Path(path)
    reader = _Reader(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise LorexError(f"{path}: cannot read ({err.strerror})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "YAML"
        raise LorexError(f"{path}: {where}: not valid YAML") from None
    if not isinstance(data, dict):
        raise LorexError(f"{path}: must be a mapping with merge_method, models, ...")
    for key in data:
        if key in _UNSUPPORTED:
            raise reader.fail(str(key), "not supported by lorex (it merges whole models)")
        if key not in _TOP_LEVEL:
            raise reader.fail(str(key), f"unknown field (known: {', '.join(_TOP_LEVEL)})")
    name = data.get("merge_method")
    if not isinstance(name, str):
        raise reader.fail("merge_method", f"missing or not a name, got {name!r}")
    if name not in MERGEKIT_METHODS and name not in MERGE_METHODS:
        known = ", ".join([*MERGEKIT_METHODS, *(m for m in MERGE_METHODS if m != "ties")])
        raise reader.fail("merge_method", f"unknown method {name!r} (known: {known})")
    out_dtype = data.get("out_dtype") or data.get("dtype")
    if out_dtype is not None and out_dtype not in DTYPES:
        where = "out_dtype" if data.get("out_dtype") else "dtype"
        raise reader.fail(where, f"must be one of {', '.join(DTYPES)}, got {out_dtype!r}")
    models = _read_models(reader, data.get("models"))
    base = data.get("base_model")
    base_path = None if base is None else reader.model_path("base_model", base)
    params = reader.mapping("parameters", data.get("parameters"))
    if name in MERGEKIT_METHODS:
        recipe = _from_mergekit(reader, name, base_path, models, params)
    else:
        recipe = _from_lorex(reader, name, base_path, models, params)
    recipe = dataclasses.replace(recipe, out_dtype=out_dtype, source=path)
    try:
        recipe.build_method().check_weights(recipe.weights, recipe.densities)
    except (LorexError, TypeError, ValueError) as err:
        raise reader.fail("parameters", str(err).splitlines()[0]) from None
    return recipe


def _read_models(reader: _Reader, models: Any) -> list[tuple[Path, dict[str, Any]]]:
    """``[(path, parameters)]`` of the ``models`` list, each checked."""
    if models is None:
        raise reader.fail("models", "missing (a list of {model: path, parameters: {...}})")
    if not isinstance(models, list) or not models:
        raise reader.fail("models", f"must be a non-empty list, got {models!r}")
    out = []
    for i, entry in enumerate(models):
        where = f"models[{i}]"
        if not isinstance(entry, dict) or "model" not in entry:
            raise reader.fail(where, "must be a mapping with 'model'")
        stray = sorted(set(entry) - {"model", "parameters"})
        if stray:
            raise reader.fail(f"{where}.{stray[0]}", "unknown field (known: model, parameters)")
        params = reader.mapping(f"{where}.parameters", entry.get("parameters"))
        out.append((reader.model_path(f"{where}.model", entry["model"]), params))
    return out


def _per_model(
    reader: _Reader,
    models: list[tuple[Path, dict[str, Any]]],
    key: str,
    default: float,
    allowed: tuple[str, ...],
) -> list[float]:
    """Each model's ``key`` (its own, else ``default``); other per-model keys are errors."""
    values = []
    for i, (_, params) in enumerate(models):
        for name in params:
            if name not in allowed:
                raise reader.fail(
                    f"models[{i}].parameters.{name}",
                    f"not a per-model parameter here (allowed: {', '.join(allowed)})",
                )
        where = f"models[{i}].parameters.{key}"
        values.append(reader.number(where, params[key]) if key in params else default)
    return values


def _from_mergekit(
    reader: _Reader,
    name: str,
    base: Path | None,
    models: list[tuple[Path, dict[str, Any]]],
    params: dict[str, Any],
) -> Recipe:
    allowed = MERGEKIT_PARAMETERS[name]
    for key in params:
        if key not in allowed:
            raise reader.fail(
                f"parameters.{key}", f"{name} does not take it (it takes: {', '.join(allowed)})"
            )
    per_model = ("weight",) if name in ("linear", "task_arithmetic") else ("weight", "density")
    weight = reader.number("parameters.weight", params.get("weight", 1.0))
    weights = _per_model(reader, models, "weight", weight, per_model)
    density = reader.number("parameters.density", params.get("density", 1.0))
    densities = _per_model(reader, models, "density", density, per_model)
    for key in ("normalize", "int8_mask", "rescale"):
        if key in params:
            reader.flag(f"parameters.{key}", params[key])
    seed = params.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise reader.fail("parameters.seed", f"must be an integer, got {params['seed']!r}")
    scale = reader.number("parameters.lambda", params.get("lambda", 1.0))
    paths = [p for p, _ in models]
    if name == "linear":
        return _linear(reader, base, paths, weights, params)
    if base is None:
        raise reader.fail("base_model", f"missing ({name} needs the base)")
    kept = [i for i, p in enumerate(paths) if p.resolve() != base.resolve()]
    if not kept:
        raise reader.fail("models", "lists only the base: there is nothing to merge")
    paths = [paths[i] for i in kept]
    weights = [weights[i] for i in kept]
    densities = [densities[i] for i in kept]
    default_normalize = name == "ties"
    normalize = params.get("normalize", default_normalize)
    if name in ("task_arithmetic", "dare_linear") and normalize and abs(sum(weights)) >= 1e-8:
        scale = scale / sum(weights)
    options: dict[str, Any] = {"scale": scale}
    if name in ("ties", "dare_ties"):
        options["merge_func"] = "mean" if normalize else "sum"
        options["zero_sign"] = params.get("zero_sign", "positive")
    if name == "ties":
        options["density"] = density
        options["trim"] = params.get("trim", "per-tensor")
    if name in ("dare_ties", "dare_linear"):
        if not 0 < density <= 1:
            raise reader.fail("parameters.density", f"must be in (0, 1], got {density}")
        options["drop"] = 1 - density
        options["seed"] = params.get("seed", 0)
    if name != "task_arithmetic":
        rescale = params.get("rescale", name != "ties")
        if rescale != (name != "ties") and any(d < 1 for d in densities):
            what = "rescales a random drop by 1 / (1 - p)"
            if name == "ties":
                what = "does not rescale a magnitude trim"
            raise reader.fail(
                "parameters.rescale", f"{rescale} with a density below 1: lorex always {what}"
            )
    given_densities = name not in ("task_arithmetic",) and any(d != density for d in densities)
    return Recipe(
        MERGEKIT_METHODS[name],
        options,
        base,
        paths,
        weights=None if all(w == 1 for w in weights) else weights,
        densities=densities if given_densities else None,
    )


def _linear(
    reader: _Reader,
    base: Path | None,
    paths: list[Path],
    weights: list[float],
    params: dict[str, Any],
) -> Recipe:
    """mergekit's ``linear``: every listed model and the base are inputs."""
    normalize = params.get("normalize", True)
    if base is None:
        base = paths[0]
    elif all(p.resolve() != base.resolve() for p in paths):
        paths = [*paths, base]
        weights = [*weights, reader.number("parameters.weight", params.get("weight", 1.0))]
    kept = [
        i for i, p in enumerate(paths) if not (p.resolve() == base.resolve() and weights[i] == 0)
    ]
    if not kept:
        raise reader.fail("models", "lists only the base with weight 0: nothing to merge")
    weights = [weights[i] for i in kept]
    return Recipe(
        "average",
        {"normalize": normalize},
        base,
        [paths[i] for i in kept],
        weights=None if all(w == 1 for w in weights) else weights,
    )


def _from_lorex(
    reader: _Reader,
    name: str,
    base: Path | None,
    models: list[tuple[Path, dict[str, Any]]],
    params: dict[str, Any],
) -> Recipe:
    """A lorex method, its parameters lorex's option names."""
    if base is None:
        raise reader.fail("base_model", f"missing ({name} needs the base)")
    fields = MERGE_METHODS[name].Options.__dataclass_fields__
    for key in params:
        if key not in fields:
            raise reader.fail(
                f"parameters.{key}",
                f"{name} does not take it (it takes: {', '.join(fields) or 'nothing'})",
            )
    weights = _per_model(reader, models, "weight", 1.0, ("weight", "density"))
    has_density = any("density" in p for _, p in models)
    densities = _per_model(reader, models, "density", 1.0, ("weight", "density"))
    return Recipe(
        name,
        dict(params),
        base,
        [p for p, _ in models],
        weights=None if all(w == 1 for w in weights) else weights,
        densities=densities if has_density else None,
    )


# --- writing -------------------------------------------------------------------------------------
def _mergekit_form(recipe: Recipe) -> tuple[str, dict[str, Any]] | None:
    """``(merge_method, parameters)`` in mergekit's words, with the lorex-only settings that
    differ from mergekit's added; None where the method is lorex's own."""
    o = recipe.build_method().settings()  # every option, defaults included
    if recipe.method == "average":
        return "linear", {"normalize": o["normalize"]}
    if recipe.method == "task-arithmetic":
        return "task_arithmetic", {"lambda": o["scale"], "normalize": False}
    if recipe.method == "ties":
        params = {
            "density": o["density"],
            "lambda": o["scale"],
            "normalize": o["merge_func"] == "mean",
        }
        if o["trim"] != "per-tensor":
            params["trim"] = o["trim"]
        if o["zero_sign"] != "positive":
            params["zero_sign"] = o["zero_sign"]
        return "ties", params
    if recipe.method in ("dare", "dare-ties"):
        params = {"density": 1 - o["drop"], "lambda": o["scale"], "normalize": False}
        if recipe.method == "dare-ties":
            params["normalize"] = o["merge_func"] == "mean"
            if o["zero_sign"] != "positive":
                params["zero_sign"] = o["zero_sign"]
        if o["seed"] != 0:
            params["seed"] = o["seed"]
        return ("dare_ties" if recipe.method == "dare-ties" else "dare_linear"), params
    return None


def recipe_text(recipe: Recipe, folder: str | Path | None = None) -> str:
    """The YAML that reproduces ``recipe``: mergekit's format where the method is shared,
    lorex's names otherwise; paths relative to ``folder`` (where the file goes) when given."""

    def where(path: Path) -> str:
        if folder is None:
            return str(path)
        return os.path.relpath(Path(path).resolve(), Path(folder).resolve())

    n = len(recipe.experts)
    weights = recipe.weights or [1.0] * n
    form = _mergekit_form(recipe)
    models = []
    if recipe.method == "average" and all(
        Path(e).resolve() != Path(recipe.base).resolve() for e in recipe.experts
    ):
        # mergekit's linear makes the base an input; weight 0 keeps it out of the mean.
        models.append({"model": where(recipe.base), "parameters": {"weight": 0.0}})
    for i, expert in enumerate(recipe.experts):
        params: dict[str, Any] = {"weight": float(weights[i])}
        if recipe.densities is not None:
            params["density"] = float(recipe.densities[i])
        models.append({"model": where(expert), "parameters": params})
    data: dict[str, Any] = {
        "merge_method": form[0] if form else recipe.method,
        "base_model": where(recipe.base),
        "models": models,
        "parameters": form[1] if form else dict(recipe.options),
    }
    if recipe.out_dtype is not None:
        data["dtype"] = recipe.out_dtype
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def write_recipe(path: str | Path, recipe: Recipe) -> str:
    """Write :func:`recipe_text` to ``path`` atomically, paths relative to its folder; returns
    the text."""
    path = Path(path)
    text = recipe_text(recipe, path.parent)
    atomic_write_bytes(path, text.encode("utf-8"))
    return text
