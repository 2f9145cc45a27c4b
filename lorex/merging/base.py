"""One interface for every merge method, and the registry ``lorex merge --method`` reads.

A method sees one tensor name at a time: the base tensor and the experts' task vectors
``tau_i = theta_i - theta_0`` stacked into one float32 tensor. Methods that need a statistic of
the whole model (a global top-k threshold) compute it in ``prepare`` with extra streamed passes.
"""

from __future__ import annotations

import abc
import argparse
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch

from lorex.errors import LorexError
from lorex.merging.blocks import BlockMatcher, compile_blocks
from lorex.merging.sources import ModelSource, Spec
from lorex.merging.steps import budgeted_steps, solver_units

#: Method name -> class, filled from the one list in ``lorex.merging.methods`` (which the package
#: imports first, so the registry is complete wherever ``lorex.merging`` is used).
MERGE_METHODS: dict[str, type[MergeMethod]] = {}

#: The rules that are no method's own maths. A method whose own rule applies to no tensor of a
#: checkpoint stops rather than hand back one of these under its name.
KEPT = "kept_from_base"
MEAN = "mean_task_vector"
GENERIC_RULES = (KEPT, MEAN)


def register_merge_method(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Make ``cls`` known by its ``name`` (``lorex merge --method``, ``method_from_name``)."""
    MERGE_METHODS[cls.name] = cls
    return cls


@dataclass
class MergeContext:
    """What a method may read: the base, the experts, the names it merges (in order), and the
    experts' weights (1.0 each unless given) and densities (None: the method's own option)."""

    base: ModelSource
    experts: list[ModelSource]
    keys: list[str]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: One per expert; None becomes 1.0 each on creation.
    weights: list[float] | None = None
    densities: list[float] | None = None

    def __post_init__(self) -> None:
        if self.weights is None:
            self.weights = [1.0] * len(self.experts)

    def task_vectors(self, key: str, base: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, *shape)`` float32: row i is ``theta_i - theta_0``. Filled row by row, so only
        one expert tensor is in flight at a time; methods may modify it in place."""
        theta0 = (self.base.get(key) if base is None else base).to(self.device, torch.float32)
        taus = torch.empty((len(self.experts), *theta0.shape), device=self.device)
        for row, expert in zip(taus, self.experts, strict=True):
            torch.sub(expert.get(key).to(self.device, torch.float32), theta0, out=row)
        return taus

    def stream(self, keys: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Every merged name with its task vectors, one name at a time."""
        for key in self.keys if keys is None else keys:
            yield key, self.task_vectors(key)


class MergeMethod(abc.ABC):
    name: ClassVar[str]
    #: The frozen dataclass of this method's settings; its fields, with their
    #: ``metadata["help"]``, become CLI options (``lorex.merging.option_fields``).
    Options: ClassVar[type]
    #: Whether per-expert weights have a place in the method's maths (mergekit's generalized
    #: task arithmetic: task vector i is multiplied by w_i after sparsification). A method
    #: without refuses weights other than 1; its docstring says why.
    takes_weights: ClassVar[bool] = False
    #: Whether the method sparsifies each task vector by a density it can take per expert.
    takes_densities: ClassVar[bool] = False
    #: The experts' weights, set by :meth:`begin` (None: 1.0 each, as when ``merge`` is called
    #: on its own), and their densities (None: the method's own option).
    weights: torch.Tensor | None = None
    densities: list[float] | None = None

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()
        for name, value in asdict(self.options).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise LorexError(f"{name}: must be a finite number, got {value}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> MergeMethod:
        """Options given on the command line (not None) override this method's defaults; an
        option of another method is an error rather than silently ignored."""
        names = cls.Options.__dataclass_fields__
        others = {n for m in MERGE_METHODS.values() for n in m.Options.__dataclass_fields__}
        stray = sorted(n for n in others - set(names) if getattr(args, n, None) is not None)
        if stray:
            raise LorexError(f"--{stray[0].replace('_', '-')} does not apply to {cls.name}")
        given = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
        return cls(cls.Options(**given))

    def settings(self) -> dict[str, Any]:
        return asdict(self.options)

    def rule(self, key: str, dtype: torch.dtype, shape: tuple[int, ...], n_tasks: int) -> str:
        """The rule ``key`` gets: the method's own (its name), ``MEAN`` or ``KEPT``. Default:
        every floating tensor gets the method's own."""
        return self.name if dtype.is_floating_point else KEPT

    def looks_for(self) -> str:
        """What the method's own rule applies to, in words (the error when nothing is)."""
        return "floating-point tensors"

    def plan(self, specs: dict[str, Spec], n_tasks: int) -> dict[str, str]:
        """The rule of every tensor, before any is read; stops when the method's own rule
        applies to none of them (it would merge under its name without doing its maths)."""
        rules = {
            k: self.rule(k, dtype, tuple(shape), n_tasks) for k, (dtype, shape) in specs.items()
        }
        if all(r in GENERIC_RULES for r in rules.values()):
            seen = ", ".join(list(specs)[:4]) or "none"
            raise LorexError(
                f"{self.name}: no tensor gets its own rule: it looks for {self.looks_for()}; "
                f"keys seen: {seen}"
            )
        return rules

    def report(self) -> dict[str, Any]:
        """What the method resolved while merging, added to merge.json's record after the
        tensors are written (nothing by default; DOGE: its losses and eta)."""
        return {}

    def check_weights(self, weights: list[float] | None, densities: list[float] | None) -> None:
        """Refuse, in one line, per-expert weights or densities this method has no place for."""
        if weights is not None and not self.takes_weights and any(w != 1 for w in weights):
            raise LorexError(
                f"{self.name}: takes no per-expert weights (its maths has no place for them); "
                "leave them at 1"
            )
        if densities is not None and not self.takes_densities:
            raise LorexError(f"{self.name}: takes no per-expert densities")
        for w in weights or []:
            if not math.isfinite(w):
                raise LorexError(f"weights: must be finite numbers, got {w}")
        for d in densities or []:
            if not 0 < d <= 1:
                raise LorexError(f"densities: each must be in (0, 1], got {d}")

    def begin(self, ctx: MergeContext) -> None:
        """Take the context's weights and densities, then :meth:`prepare` (what ``merge_models``
        calls before the per-tensor pass)."""
        self.check_weights(ctx.weights, ctx.densities)
        self.weights = torch.tensor(ctx.weights, dtype=torch.float32, device=ctx.device)
        self.densities = ctx.densities
        self.prepare(ctx)

    def task_weights(self, n_tasks: int, device: torch.device) -> torch.Tensor:
        """``(N,)`` float32: the experts' weights (1.0 each when none were given)."""
        if self.weights is None:
            return torch.ones(n_tasks, device=device)
        return self.weights.to(device)

    def density_of(self, task: int, default: float) -> float:
        """Expert ``task``'s density: its own where given, else the option's ``default``."""
        return default if self.densities is None else self.densities[task]

    def prepare(self, ctx: MergeContext) -> None:
        """Whole-model statistics before the per-tensor pass (none by default)."""
        return None

    @abc.abstractmethod
    def merge(self, key: str, base: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        """The merged value of one tensor (float32), from the base and the stacked task vectors
        ``(N, *shape)``, which the method owns and may overwrite."""


class MatrixMethod(MergeMethod):
    """A method whose own rule is for 2-D tensors, every other floating tensor getting the mean
    task vector (Iso-C, Iso-CTS, TSV-M); ``theta = theta_0 + scale * merged``."""

    def is_own_matrix(self, shape: tuple[int, ...], n_tasks: int) -> bool:
        return len(shape) == 2

    def rule(self, key: str, dtype: torch.dtype, shape: tuple[int, ...], n_tasks: int) -> str:
        if not dtype.is_floating_point:
            return KEPT
        return self.name if self.is_own_matrix(shape, n_tasks) else MEAN

    def looks_for(self) -> str:
        return "2-D tensors"

    @abc.abstractmethod
    def merge_matrix(self, taus: torch.Tensor) -> torch.Tensor:
        """The merged update of one 2-D tensor from its task vectors ``(N, m, n)``."""

    def merge(self, key: str, base: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        if self.rule(key, base.dtype, tuple(base.shape), len(taus)) == self.name:
            return base + self.options.scale * self.merge_matrix(taus)
        return base + self.options.scale * taus.mean(0)


class BlockwiseMethod(MergeMethod):
    """A method whose own rule optimises the 2-D weights inside a checkpoint's repeated blocks
    (``lorex.merging.blocks``) with Adam; its options carry ``blocks`` (a regex, or None to
    detect), ``lr``, ``lr_relative``, ``steps`` and ``max_gflop`` (``lorex.merging.steps``).
    Every matrix takes the same ``steps_used``: ``steps``, or fewer when one step of all
    matrices, by the method's :meth:`step_flops`, times ``steps`` exceeds ``max_gflop``."""

    #: What every other floating tensor gets: ``KEPT`` or ``MEAN``.
    other_rule: ClassVar[str]

    @abc.abstractmethod
    def step_flops(self, shape: tuple[int, int], n_tasks: int) -> float:
        """Floating-point operations of one solver step on a matrix of ``shape``."""

    def plan(self, specs: dict[str, Spec], n_tasks: int) -> dict[str, str]:
        self.blocks = BlockMatcher(specs, self.options.blocks)
        self.lr_resolved: dict[str, float] = {}
        rules = super().plan(specs, n_tasks)
        self.flops_per_step = sum(
            self.step_flops(tuple(specs[k][1]), n_tasks) for k, r in rules.items() if r == self.name
        )
        self.steps_used = budgeted_steps(
            self.options.steps, self.flops_per_step, self.options.max_gflop
        )
        return rules

    def solver_units(self, key: str, taus: torch.Tensor) -> tuple[float, float]:
        """``lorex.merging.steps.solver_units`` for this matrix, its absolute step recorded."""
        unit, step = solver_units(taus, self.options.lr, self.options.lr_relative)
        self.lr_resolved[key] = unit * step
        return unit, step

    def rule(self, key: str, dtype: torch.dtype, shape: tuple[int, ...], n_tasks: int) -> str:
        if not dtype.is_floating_point:
            return KEPT
        if len(shape) == 2 and key.endswith("weight") and key in self.blocks:
            return self.name
        return self.other_rule

    def looks_for(self) -> str:
        return f"2-D weights inside {self.blocks.describe()}"

    def report(self) -> dict[str, Any]:
        return {
            "blocks": self.blocks.pattern or self.blocks.stacks,
            "lr_resolved": self.lr_resolved,
            "steps_used": self.steps_used,
            "solver_gflop_per_step": self.flops_per_step / 1e9,
            "solver_gflop": self.steps_used * self.flops_per_step / 1e9,
        }


def check_blocks_option(blocks: str | None) -> None:
    """``blocks`` must be None (detect) or a regular expression."""
    if blocks is not None:
        compile_blocks(blocks)
