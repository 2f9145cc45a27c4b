"""Source-free cross-modal transfer with task-irrelevant pairs: TGMB + TGKT and the baselines
they are compared with (source-only, SHOT, SOCKET); docs/cross_modal.md."""

from typing import Any

from lorex.adaptation.cross_modal.config import CrossModalConfig
from lorex.adaptation.cross_modal.methods import ABLATIONS, CROSS_MODAL_METHODS, MAIN_METHODS

__all__ = [
    "ABLATIONS",
    "CROSS_MODAL_METHODS",
    "MAIN_METHODS",
    "CrossModalConfig",
    "adapt_cross_modal",
]


def __getattr__(name: str) -> Any:
    # The pipeline pulls in training and data code; the CLI's option parser needs only the config.
    if name == "adapt_cross_modal":
        from lorex.adaptation.cross_modal.pipeline import adapt_cross_modal

        return adapt_cross_modal
    raise AttributeError(name)
