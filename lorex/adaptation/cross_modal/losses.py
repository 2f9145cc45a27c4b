"""The losses of SHOT, SOCKET, TGMB and TGKT as plain functions of tensors.

Each is small enough to check by hand on a tiny batch (tests/test_cross_modal.py does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per-row Shannon entropy (natural log) of probabilities ``(B, C)``."""
    return -(probs * torch.log(probs.clamp_min(1e-8))).sum(-1)


def information_maximisation(logits: torch.Tensor) -> torch.Tensor:
    """SHOT's L_IM: mean per-image entropy (confident predictions) minus the entropy of the
    mean prediction (diverse predictions over the batch)."""
    probs = F.softmax(logits, dim=1)
    return entropy(probs).mean() - entropy(probs.mean(0))


def kl_distillation(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    confidence: bool = True,
) -> torch.Tensor:
    """TGKT's distillation: KL(teacher || student) at temperature ``T`` times ``T**2``, per image
    weighted by the teacher's top probability when ``confidence`` (unsure teachers count less);
    the teacher is never differentiated."""
    teacher = F.softmax(teacher_logits.detach() / temperature, dim=1)
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    kl = (teacher * (torch.log(teacher.clamp_min(1e-8)) - log_student)).sum(1)
    weight = teacher.max(1).values if confidence else torch.ones_like(kl)
    return (weight * kl).mean() * temperature**2


def teacher_log_probs(
    translated_logits: torch.Tensor,
    raw_logits: torch.Tensor | None = None,
    balance: bool = True,
) -> torch.Tensor:
    """TGKT's teacher over the whole target set ``(N, C)``, as log-probabilities.

    The source's softmax on the translated images, averaged with its softmax on the raw
    (replicated) target images when ``raw_logits`` is given: two readings of one image whose
    errors differ. ``balance`` divides each class by its mean probability over the set and
    renormalises each row, removing the class bias either reading has; it is the same
    uniform-marginal prior that information maximisation's diversity term assumes."""
    probs = F.softmax(translated_logits.float(), dim=1)
    if raw_logits is not None:
        probs = (probs + F.softmax(raw_logits.float(), dim=1)) / 2
    if balance:
        probs = probs / probs.mean(0, keepdim=True).clamp_min(1e-12)
        probs = probs / probs.sum(1, keepdim=True)
    return torch.log(probs.clamp_min(1e-12))


def feature_alignment(student: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """TI feature matching: the distance between the target model's features of TI target
    images and the frozen source model's features of their paired RGB images, as a root mean
    square over channels, averaged over pairs. (SOCKET takes the Frobenius norm of the whole
    batch, which grows with the batch size and the width; this form keeps the weight's meaning
    the same for any batch and any backbone.)"""
    diff = student - source.detach()
    return (diff.norm(dim=1) / diff.shape[1] ** 0.5).mean()


def token_statistics(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (biased) variance of block tokens ``(B, N, D)`` over images and
    tokens: what a BatchNorm layer would track at that depth."""
    flat = tokens.reshape(-1, tokens.shape[-1])
    return flat.mean(0), flat.var(0, unbiased=False)


def statistics_matching(
    block_tokens: list[torch.Tensor],
    source_means: list[torch.Tensor],
    source_vars: list[torch.Tensor],
    first_factor: float = 10.0,
    eps: float = 1e-5,
) -> torch.Tensor:
    """SOCKET's distribution matching on a ViT. Per block: the RMS over channels of the batch
    mean's offset from the source mean in source standard deviations, plus the RMS of the
    batch variance's relative offset from the source variance; the first block counts
    ``first_factor`` times (SOCKET weights its first BN layer x10); averaged over blocks.
    Standardising by the source's own spread makes every block count alike, where raw token
    moments grow with depth in a pre-norm ViT."""
    total = block_tokens[0].new_zeros(())
    for i, (tokens, mu_s, var_s) in enumerate(
        zip(block_tokens, source_means, source_vars, strict=True)
    ):
        mu, var = token_statistics(tokens)
        scale = mu.shape[0] ** 0.5
        term = ((mu - mu_s) / (var_s + eps).sqrt()).norm() / scale
        term = term + ((var - var_s) / (var_s + eps)).norm() / scale
        total = total + (first_factor if i == 0 else 1.0) * term
    return total / len(block_tokens)


def lsgan_critic_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """The critic's least-squares GAN loss: real scores towards 1, fake towards 0."""
    return 0.5 * ((real_scores - 1).pow(2).mean() + fake_scores.pow(2).mean())


def lsgan_generator_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    """The translator's side of L_D: translated target images should score as real RGB."""
    return 0.5 * (fake_scores - 1).pow(2).mean()
