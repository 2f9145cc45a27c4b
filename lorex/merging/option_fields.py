"""Option fields several merge methods share, each with the help text of its ``lorex merge`` flag.

A method's options are a frozen dataclass whose fields carry ``metadata={"help": ...}`` (the CLI
builds its flags from them, one flag per field name over every method). A field that means the
same thing in several methods is made here, so its name and help are written once: one flag
name has one help text in every method that takes it (its default may differ).
"""

from __future__ import annotations

from typing import Any

from lorex.merging.ops import MERGE_FUNCS, ZERO_SIGNS
from lorex.merging.steps import AUTO
from lorex.settings_field import setting


def scale_field(default: float) -> Any:
    return setting(default, "lambda: the merged update's weight")


def merge_func_field() -> Any:
    return setting(
        "mean", "how the entries that agree with the elected sign combine", choices=MERGE_FUNCS
    )


def drop_field() -> Any:
    return setting(0.5, "drop probability p")


def seed_field() -> Any:
    return setting(0, "seed of the drop masks")


def steps_field(default: int) -> Any:
    return setting(default, "Adam steps per matrix")


def lr_field() -> Any:
    return setting(
        AUTO,
        "Adam step; 'auto' (default) follows each matrix's task vectors "
        "(--lr-relative x their RMS entry); the papers' absolute steps are 1e-4 (doge) and "
        "1e-5 (wudi)",
    )


def lr_relative_field(default: float) -> Any:
    return setting(
        default,
        "the auto step relative to the matrix's RMS task-vector entry (chosen on validation data)",
    )


def blocks_field() -> Any:
    return setting(
        None,
        "the tensors inside blocks are those whose names match REGEX (default: the "
        "repeated, numbered blocks found from the names, e.g. 'h.N.', 'layers.N.')",
        metavar="REGEX",
    )


def zero_sign_field() -> Any:
    return setting(
        "majority",
        "the sign of entries whose elected sum is 0: the whole model's majority (one more pass "
        "over the experts) or positive (mergekit's; no extra pass)",
        choices=ZERO_SIGNS,
    )


def max_gflop_field(default: float) -> Any:
    return setting(
        default,
        "bound on the solver's floating-point work over all matrices, in GFLOP: every matrix "
        "takes min(--steps, budget / FLOPs of one step of all matrices) steps (from the shapes, "
        "never timed; recorded as steps_used); 0: no bound",
    )
