"""TGMB: train a translator from the target modality to source-like RGB, with the source frozen.

Losses (docs/cross_modal.md): reconstruction of the paired TI RGB, which closes the gap between
the modalities on classes outside the task (in pixels, and optionally in the frozen source's
feature space, so that translations read to the source like their real RGB); information
maximisation of the frozen source's predictions on translated task-relevant target images; and
an optional LSGAN critic between real TI RGB and translated task-relevant target images (closes
the gap between TI and TR content). Only the translator and the critic learn.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lorex.adaptation.cross_modal.config import CrossModalConfig
from lorex.adaptation.cross_modal.losses import (
    feature_alignment,
    information_maximisation,
    lsgan_critic_loss,
    lsgan_generator_loss,
)
from lorex.adaptation.cross_modal.translator import PatchCritic, build_translator
from lorex.errors import LorexError
from lorex.models import LorexModel
from lorex.training.checkpoint import Checkpointer, CheckpointOptions


def train_translator(
    source: LorexModel,
    ti_target: torch.Tensor,
    ti_rgb: torch.Tensor,
    target: torch.Tensor,
    cfg: CrossModalConfig,
    device: torch.device,
    progress: bool | None = None,
    ti_source_features: torch.Tensor | None = None,
    checkpoint: CheckpointOptions | None = None,
) -> tuple[nn.Module, list[dict[str, float]]]:
    """The trained translator (in eval mode) and its loss curve (one entry per 50 steps).

    ``ti_target`` ``(M, 1, H, W)`` and ``ti_rgb`` ``(M, 3, H, W)`` are the TI pairs; ``target``
    ``(N, 1, H, W)`` the unlabelled task-relevant target images; all in [0, 1] on the CPU.
    ``ti_source_features``: the source's features of ``ti_rgb``, needed when ``tgmb_feat_weight``
    is positive. ``checkpoint``: as in ``fit`` (translator, critic, both optimisers, the RNGs).
    """
    if cfg.tgmb_feat_weight > 0 and ti_source_features is None:
        raise ValueError("tgmb_feat_weight > 0 needs the source's features of the TI RGB")
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    translator = build_translator(cfg.translator, cfg.translator_width).to(device)
    critic = PatchCritic().to(device) if cfg.adv_weight > 0 else None
    source.eval()
    source.requires_grad_(False)
    betas = (0.5, 0.999)
    opt_t = torch.optim.Adam(translator.parameters(), lr=cfg.translator_lr, betas=betas)
    opt_c = (
        torch.optim.Adam(critic.parameters(), lr=cfg.translator_lr, betas=betas)
        if critic is not None
        else None
    )
    batch = min(cfg.batch_size, len(ti_target), len(target))
    history: list[dict[str, float]] = []
    running: dict[str, float] = {}
    nets = nn.ModuleDict({"translator": translator, **({"critic": critic} if critic else {})})
    ckpt = Checkpointer(
        checkpoint,
        {"loop": "tgmb", "config": cfg.to_dict(), "ti": len(ti_target), "target": len(target)},
        nets,
        {"translator": opt_t, **({"critic": opt_c} if opt_c else {})},
        None,
        {"batches": generator},
    )
    first = 0
    restored = ckpt.restore()
    if restored is not None:
        first, position, _ = restored
        history, running = position["history"], position["running"]
    translator.train()
    bar = tqdm(
        range(first, cfg.translator_steps),
        initial=first,
        total=cfg.translator_steps,
        desc="TGMB",
        disable=progress is False or None,
        leave=False,
    )
    for step in bar:
        ti_idx = torch.randint(len(ti_target), (batch,), generator=generator)
        tr_idx = torch.randint(len(target), (batch,), generator=generator)
        ti_in, ti_out = ti_target[ti_idx].to(device), ti_rgb[ti_idx].to(device)
        tr_in = target[tr_idx].to(device)
        fake_ti = translator(ti_in)
        fake_tr = translator(tr_in)
        terms = {"rec": F.mse_loss(fake_ti, ti_out)}
        if cfg.tgmb_feat_weight > 0:
            terms["feat"] = feature_alignment(
                source.features(fake_ti), ti_source_features[ti_idx].to(device)
            )
        if cfg.tgmb_im_weight > 0:
            terms["im"] = information_maximisation(source(fake_tr))
        if critic is not None:
            terms["adv"] = lsgan_generator_loss(critic(fake_tr))
        loss = (
            cfg.rec_weight * terms["rec"]
            + cfg.tgmb_feat_weight * terms.get("feat", 0.0)
            + cfg.tgmb_im_weight * terms.get("im", 0.0)
            + cfg.adv_weight * terms.get("adv", 0.0)
        )
        if not torch.isfinite(loss):
            raise LorexError(f"TGMB diverged: loss is {loss.item()} at step {step + 1}")
        opt_t.zero_grad(set_to_none=True)
        loss.backward()
        opt_t.step()
        if critic is not None:
            critic_loss = lsgan_critic_loss(critic(ti_out), critic(fake_tr.detach()))
            opt_c.zero_grad(set_to_none=True)
            critic_loss.backward()
            opt_c.step()
            terms["critic"] = critic_loss
        for k, v in terms.items():
            running[k] = running.get(k, 0.0) + float(v.detach())
        if (step + 1) % 50 == 0 or step + 1 == cfg.translator_steps:
            n = (step % 50) + 1
            history.append({"step": step + 1, **{k: v / n for k, v in running.items()}})
            running = {}
            bar.set_postfix(rec=f"{history[-1]['rec']:.4f}")
        if ckpt.due(step + 1) or step + 1 == cfg.translator_steps:
            ckpt.save(step + 1, {"history": history, "running": running})
    bar.close()
    translator.eval()
    translator.requires_grad_(False)
    return translator, history


@torch.inference_mode()
def translate(
    translator: nn.Module, images: torch.Tensor, device: torch.device, batch: int = 256
) -> torch.Tensor:
    """Translated RGB ``(N, 3, H, W)`` of one-channel images ``(N, 1, H, W)``, on the CPU."""
    translator.eval()
    return torch.cat(
        [translator(images[i : i + batch].to(device)).cpu() for i in range(0, len(images), batch)]
    )
