"""The methods and ablations of cross-modal transfer, by name: which stages run and which loss
weights are switched off. Every method reads the same ``CrossModalConfig``; a method only zeroes
terms, so a weight given on the command line means the same thing in every method."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from lorex.adaptation.cross_modal.config import CrossModalConfig
from lorex.errors import LorexError

#: The target-training weights; a method switches some of them off.
TRANSFER_WEIGHTS = ("im_weight", "self_weight", "stats_weight", "ti_weight", "kd_weight")


@dataclass(frozen=True)
class CrossModalMethod:
    name: str
    description: str
    translator: bool = False  # runs TGMB (a translator from the target modality to RGB)
    trains_target: bool = True  # False: the source model is scored as it is
    zero: tuple[str, ...] = field(default=())  # config weights set to 0 for this method
    switch_off: tuple[str, ...] = field(default=())  # config flags set to False

    def settings(self, cfg: CrossModalConfig) -> CrossModalConfig:
        """``cfg`` with this method's switched-off terms at zero and flags off."""
        return replace(
            cfg, **{name: 0.0 for name in self.zero}, **{name: False for name in self.switch_off}
        )


_NO_TGKT = ("kd_weight",)
CROSS_MODAL_METHODS: dict[str, CrossModalMethod] = {
    m.name: m
    for m in [
        CrossModalMethod(
            "source-only",
            "the RGB source model on the target images replicated to 3 channels",
            trains_target=False,
        ),
        CrossModalMethod(
            "shot",
            "SHOT: frozen classifier, information maximisation, centroid pseudo-labels",
            zero=("stats_weight", "ti_weight", *_NO_TGKT),
        ),
        CrossModalMethod(
            "socket",
            "SOCKET: SHOT + feature-statistics matching + TI feature matching",
            zero=_NO_TGKT,
        ),
        CrossModalMethod(
            "tgmb-tgkt",
            "TGMB translator, then TGKT: KL from the source on translated (and raw) target images "
            "+ SOCKET's terms",
            translator=True,
        ),
        # Ablations.
        CrossModalMethod(
            "tgmb-only",
            "ablation: the source model on translated target images (no target training)",
            translator=True,
            trains_target=False,
        ),
        CrossModalMethod(
            "tgmb-tgkt-paper-teacher",
            "ablation: TGKT's teacher is the source on translated images alone (the paper's)",
            translator=True,
            switch_off=("kd_raw_view", "kd_balance", "kd_refresh"),
        ),
        CrossModalMethod(
            "tgmb-tgkt-fixed-teacher",
            "ablation: TGKT's teacher is not refreshed with the target model's own reading",
            translator=True,
            switch_off=("kd_refresh",),
        ),
        CrossModalMethod(
            "tgmb-tgkt-no-ti",
            "ablation: TGKT without TI feature alignment",
            translator=True,
            zero=("ti_weight",),
        ),
        CrossModalMethod(
            "tgmb-tgkt-no-self",
            "ablation: TGKT without self pseudo-labels",
            translator=True,
            zero=("self_weight",),
        ),
        CrossModalMethod(
            "tgmb-tgkt-no-adv",
            "ablation: the translator without its adversarial loss",
            translator=True,
            zero=("adv_weight",),
        ),
        CrossModalMethod(
            "tgmb-tgkt-no-im",
            "ablation: the translator without information maximisation through the source",
            translator=True,
            zero=("tgmb_im_weight",),
        ),
    ]
}
MAIN_METHODS = ("source-only", "shot", "socket", "tgmb-tgkt")
ABLATIONS = tuple(name for name in CROSS_MODAL_METHODS if name not in MAIN_METHODS)


def get_method(name: str) -> CrossModalMethod:
    if name not in CROSS_MODAL_METHODS:
        raise LorexError(
            f"unknown cross-modal method '{name}'; choose from {', '.join(CROSS_MODAL_METHODS)}"
        )
    return CROSS_MODAL_METHODS[name]


def resolve_methods(names: list[str]) -> list[CrossModalMethod]:
    """Method names, with ``all`` for the main methods and ``ablations`` for the ablations."""
    out: list[str] = []
    for name in names:
        expanded = MAIN_METHODS if name == "all" else ABLATIONS if name == "ablations" else [name]
        out.extend(n for n in expanded if n not in out)
    return [get_method(n) for n in out]
