"""Command-line options for every ``CrossModalConfig`` field, generated from the dataclass so that
the CLI and the Python API cannot drift apart."""

from __future__ import annotations

import argparse
from dataclasses import fields

from lorex.adaptation.cross_modal.config import TRANSLATOR_ARCHS, CrossModalConfig

HELP = {
    "epochs": "target-model epochs; each re-computes the pseudo-labels",
    "batch_size": "target and TI batch size",
    "lr": "AdamW peak learning rate of the target backbone (the classifier stays frozen)",
    "weight_decay": "AdamW weight decay",
    "augment": "flip + 2-pixel shift of target images",
    "im_weight": "information maximisation (SHOT ent_par; alpha_im)",
    "self_weight": "centroid pseudo-label cross-entropy (SHOT cls_par; beta_self)",
    "stats_weight": "per-block feature-statistics matching (SOCKET lambda_d)",
    "first_layer_stats_factor": "the first block's statistics term counts this many times",
    "ti_weight": "TI feature alignment (SOCKET lambda_TI; beta_f)",
    "kd_weight": "KL from the source on translated images (TGKT; alpha_d)",
    "kd_temperature": "distillation temperature",
    "kd_confidence": "weight each image's KL by the teacher's top probability",
    "kd_raw_view": "average the teacher with the source on the raw target images (two views)",
    "kd_balance": "divide the teacher's classes by their mean probability over the target set",
    "kd_refresh": "from the second epoch, average the teacher with the target model's own reading",
    "translator": "TGMB translator: tiny (the paper's size) or unet",
    "translator_width": "translator channels",
    "translator_steps": "TGMB Adam steps",
    "translator_lr": "TGMB Adam lr (betas 0.5, 0.999)",
    "rec_weight": "TGMB reconstruction (MSE to the paired TI RGB)",
    "tgmb_feat_weight": "TGMB reconstruction in the source's feature space (lorex's addition)",
    "tgmb_im_weight": "TGMB information maximisation through the frozen source",
    "adv_weight": "TGMB LSGAN critic weight (0: off)",
    "max_target_samples": "use at most N target images (class-balanced)",
    "max_ti_samples": "use at most N TI pairs",
    "seed": "random seed",
}


def add_cross_modal_options(p: argparse.ArgumentParser) -> None:
    defaults = CrossModalConfig()
    group = p.add_argument_group("cross-modal settings (docs/cross_modal.md)")
    for f in fields(CrossModalConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        text = f"{HELP[f.name]} ({default})"
        if isinstance(default, bool):
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=text
            )
        elif f.name == "translator":
            group.add_argument(flag, choices=TRANSLATOR_ARCHS, default=default, help=text)
        elif default is None or isinstance(default, int):
            group.add_argument(flag, type=int, default=default, help=text)
        else:
            group.add_argument(flag, type=type(default), default=default, help=text)


def config_from_args(args: argparse.Namespace) -> CrossModalConfig:
    return CrossModalConfig(**{f.name: getattr(args, f.name) for f in fields(CrossModalConfig)})
