"""Optimiser step sizes that follow the task vectors' scale (``lr="auto"`` of DOGE and WUDI).

Adam moves each entry by about ``lr`` per step whatever the size of the gradient, so an absolute
``lr`` fits one weight scale only: the papers' 1e-4 and 1e-5 suit CLIP task vectors, and on
experts ten times larger or smaller the same number barely moves them or overshoots. ``auto``
solves in the matrix's own units instead: its task vectors are divided by their RMS entry, the
solver runs with the relative step, and the result is scaled back. Experts ``base + c * tau_i``
then give ``c`` times the same update for any ``c`` (up to float round-off).
"""

from __future__ import annotations

import torch

from lorex.errors import LorexError

AUTO = "auto"


def check_step(lr: float | str, lr_relative: float, steps: int) -> None:
    if steps < 0:
        raise LorexError(f"steps: must be >= 0, got {steps}")
    if lr != AUTO and not (isinstance(lr, int | float) and lr > 0):
        raise LorexError(f"lr: must be a positive number or 'auto', got {lr!r}")
    if not lr_relative > 0:
        raise LorexError(f"lr-relative: must be positive, got {lr_relative}")


def solver_units(taus: torch.Tensor, lr: float | str, lr_relative: float) -> tuple[float, float]:
    """``(unit, step)``: solve on ``taus / unit`` with Adam step ``step``, multiply the result
    by ``unit``. ``auto``: the unit is the RMS entry of the stacked task vectors (1 when they
    are all zero), the step ``lr_relative``; an absolute ``lr``: unit 1, step ``lr``. The
    absolute step taken is ``unit * step``."""
    if lr != AUTO:
        return 1.0, float(lr)
    rms = float(taus.square().mean().sqrt())
    return (rms if rms > 0 else 1.0), lr_relative


# --- a deterministic bound on the solver's work --------------------------------------------------
#: Floating-point operations of one Adam update per parameter (moments, bias corrections, step).
ADAM_FLOPS_PER_ENTRY = 12


def check_budget(max_gflop: float) -> None:
    if not max_gflop >= 0:
        raise LorexError(f"max-gflop: must be >= 0 (0: no bound), got {max_gflop}")


def budgeted_steps(steps: int, flops_per_step: float, max_gflop: float) -> int:
    """The steps every matrix takes: ``steps``, or fewer so that all matrices together stay within
    ``max_gflop`` (0: no bound). Counted from the shapes, never timed, so a merge's result does
    not depend on the machine or its load."""
    if max_gflop == 0 or flops_per_step <= 0:
        return steps
    return min(steps, int(max_gflop * 1e9 // flops_per_step))
