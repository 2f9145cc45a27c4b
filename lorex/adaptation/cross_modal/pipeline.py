"""``adapt_cross_modal``: an RGB source model to a depth or NIR target, with TI pairs only.

What is read: the source model; the task-relevant (TR) target images without their RGB partners
(``load_paired(..., with_rgb=False)`` never touches an RGB file); the TI pairs of other classes.
Target labels are read only to score the result. Accuracy is transductive, on the adaptation set
itself (SOCKET's protocol), and also reported on the held-out test split when there is one.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lorex.adaptation.cross_modal.config import CrossModalConfig
from lorex.adaptation.cross_modal.losses import teacher_log_probs
from lorex.adaptation.cross_modal.methods import CrossModalMethod, resolve_methods
from lorex.adaptation.cross_modal.objectives import train_target_model, train_translator
from lorex.adaptation.cross_modal.report import cross_modal_report, translations_png
from lorex.adaptation.cross_modal.tgmb import translate
from lorex.adaptation.cross_modal.transfer import features_and_logits
from lorex.data.paired import PAIRED, PairedDataset, load_paired
from lorex.errors import LorexError
from lorex.io import tensors_bytes
from lorex.models import LorexModel, load_model, save_model
from lorex.models.stamps import stamp  # what a stage was made from
from lorex.training.checkpoint import CheckpointOptions, remove_if_empty, work_directory
from lorex.training.feature_stats import feature_statistics, load_statistics
from lorex.training.records import run_record
from lorex.version import __version__

log = logging.getLogger("lorex")


def _agreement(scores: torch.Tensor, labels: np.ndarray) -> float:
    return float((scores.argmax(1).numpy() == labels).mean())


def _accuracy(model: LorexModel, images: torch.Tensor, labels: np.ndarray, device) -> float:
    _, logits = features_and_logits(model, images, device)
    return _agreement(logits, labels)


def check_inputs(source: LorexModel, path: Path, target: PairedDataset, ti: PairedDataset) -> None:
    """One-line refusals of a source, target and TI set that do not fit together."""
    if source.active_head is None:
        raise LorexError(f"{path}: the source model has no classification head")
    if list(source.classes) != list(target.classes):
        raise LorexError(
            f"{target.name}: target classes {target.classes} differ from the source head's "
            f"{source.classes} ({path})"
        )
    if ti.modality != target.modality:
        raise LorexError(
            f"{ti.name}: TI pairs are RGB-{ti.modality}, the target is {target.modality}"
        )
    hw = tuple(target.target.shape[1:3])
    for data in (target, ti):
        if tuple(data.target.shape[1:3]) != tuple(source.image_hw):
            raise LorexError(
                f"{data.name}: images are {data.target.shape[1]}x{data.target.shape[2]}, the "
                f"source takes {source.image_hw[0]}x{source.image_hw[1]}"
            )
    if tuple(ti.target.shape[1:3]) != hw:
        raise LorexError(f"{ti.name}: TI images differ in size from the target's")
    if overlap := set(ti.classes) & set(target.classes):
        raise LorexError(
            f"{ti.name}: TI classes must be outside the task; shared: {sorted(overlap)}"
        )


def _source_statistics(
    source: LorexModel, path: Path, ti_rgb: torch.Tensor, device: torch.device
) -> tuple[tuple[list[torch.Tensor], list[torch.Tensor]], str]:
    stats = load_statistics(path, device)
    depth = len(source.backbone.forward_tokens(ti_rgb[:1].to(device)))
    if stats is not None:
        if len(stats[0]) != depth or stats[0][0].shape[-1] != source.num_features:
            raise LorexError(
                f"{path}: feature_stats.safetensors does not fit this model ({len(stats[0])} "
                f"blocks of {stats[0][0].shape[-1]}, expected {depth} of {source.num_features})"
            )
        return stats, "recorded with the source (its training set)"
    return feature_statistics(source, ti_rgb, device), "TI RGB through the source (no record)"


@dataclass
class _Inputs:
    """What every method reads: the frozen source, the target (TR) images and the TI pairs, and
    what the source computes on them once."""

    model: LorexModel
    tr: PairedDataset
    tr_test: PairedDataset | None
    ti_pairs: PairedDataset
    x_tr: torch.Tensor
    x_test: torch.Tensor | None
    ti_t: torch.Tensor
    ti_rgb: torch.Tensor
    ti_source_features: torch.Tensor
    stats: tuple[list[torch.Tensor], list[torch.Tensor]]
    stats_origin: str
    raw_logits: torch.Tensor  # the source on the raw target


def _load_inputs(
    source_dir: Path, target: str, ti: str, cfg: CrossModalConfig, device: torch.device
) -> _Inputs:
    model = load_model(source_dir, device)
    model.requires_grad_(False)
    tr = load_paired(target, "train", with_rgb=False, max_samples=cfg.max_target_samples)
    tr_test = _test_split(target)
    ti_pairs = load_paired(
        ti, "train", with_rgb=True, max_samples=cfg.max_ti_samples, seed=cfg.seed
    )
    check_inputs(model, source_dir, tr, ti_pairs)
    x_tr, x_test = tr.target_tensor(), tr_test.target_tensor() if tr_test else None
    ti_t, ti_rgb = ti_pairs.target_tensor(), ti_pairs.rgb_tensor()
    ti_source_features, _ = features_and_logits(model, ti_rgb, device)
    stats, stats_origin = _source_statistics(model, source_dir, ti_rgb, device)
    _, raw_logits = features_and_logits(model, x_tr, device)
    return _Inputs(
        model,
        tr,
        tr_test,
        ti_pairs,
        x_tr,
        x_test,
        ti_t,
        ti_rgb,
        ti_source_features,
        stats,
        stats_origin,
        raw_logits,
    )


class _MethodRunner:
    """Runs one method after another on the same inputs. A translator (and the source's logits
    on its translations) is shared by every method whose TGMB settings are the same."""

    def __init__(self, inputs: _Inputs, fingerprint: dict, ckpt, device, progress):
        self.inputs, self.fingerprint, self.ckpt = inputs, fingerprint, ckpt
        self.device, self.progress = device, progress
        self.translators: dict[tuple, tuple[nn.Module, list, float, torch.Tensor]] = {}

    def translator(self, m_cfg: CrossModalConfig) -> tuple[nn.Module, list, float, torch.Tensor]:
        key = (m_cfg.tgmb_im_weight, m_cfg.adv_weight, m_cfg.rec_weight, m_cfg.tgmb_feat_weight)
        if key not in self.translators:
            i, device, tick = self.inputs, self.device, time.perf_counter()
            sub = self.ckpt and self.ckpt.sub(
                "tgmb-" + stamp(inputs=self.fingerprint, tgmb=key)[:12]
            )
            net, history = train_translator(
                i.model,
                i.ti_t,
                i.ti_rgb,
                i.x_tr,
                m_cfg,
                device,
                self.progress,
                i.ti_source_features,
                sub,
            )
            _, logits = features_and_logits(i.model, translate(net, i.x_tr, device), device)
            self.translators[key] = (net, history, time.perf_counter() - tick, logits)
        return self.translators[key]

    def run(self, method: CrossModalMethod, cfg: CrossModalConfig) -> tuple[dict, LorexModel]:
        """The method's record (accuracies, histories, costs) and its model."""
        i, device, model = self.inputs, self.device, self.inputs.model
        start = time.perf_counter()
        m_cfg = method.settings(cfg)
        record: dict[str, Any] = {"description": method.description}
        teacher = None
        if method.translator:
            net, history, seconds, translated = self.translator(m_cfg)
            record.update(translator_history=history, translator_seconds=seconds)
            record["translated_accuracy"] = _agreement(translated, i.tr.labels)
            teacher = teacher_log_probs(
                translated, i.raw_logits if m_cfg.kd_raw_view else None, m_cfg.kd_balance
            )
            record["teacher_accuracy"] = _agreement(teacher, i.tr.labels)
        if method.trains_target:
            adapted, result = train_target_model(
                model,
                i.x_tr,
                m_cfg,
                device,
                ti_target=i.ti_t,
                ti_source_features=i.ti_source_features,
                teacher_logits=teacher,
                source_stats=i.stats,
                progress=self.progress,
                desc=method.name,
                checkpoint=self.ckpt
                and self.ckpt.sub(method.name + "-" + stamp(inputs=self.fingerprint)[:12]),
            )
            record["history"] = result.history
            record["trainable_params"] = result.trainable_params
            record["peak_train_mb"] = result.peak_train_mb
        else:
            adapted = model
        if teacher is not None and not method.trains_target:  # tgmb-only reads translations
            record["accuracy"] = record["translated_accuracy"]
            if i.x_test is not None:
                x_read = translate(net, i.x_test, device)
                record["test_accuracy"] = _accuracy(model, x_read, i.tr_test.labels, device)
        else:
            record["accuracy"] = (  # the untrained source's logits are already at hand
                _agreement(i.raw_logits, i.tr.labels)
                if adapted is model
                else _accuracy(adapted, i.x_tr, i.tr.labels, device)
            )
            if i.x_test is not None:
                record["test_accuracy"] = _accuracy(adapted, i.x_test, i.tr_test.labels, device)
        record["seconds"] = time.perf_counter() - start
        log.info("%s: accuracy %.4f (%.0f s)", method.name, record["accuracy"], record["seconds"])
        return record, adapted


def adapt_cross_modal(
    source: str | Path,
    target: str,
    ti: str,
    out: str | Path,
    methods: Sequence[str] = ("tgmb-tgkt",),
    cfg: CrossModalConfig | None = None,
    device: torch.device | str = "cpu",
    progress: bool | None = None,
    keep: str | None = None,
    checkpoint: CheckpointOptions | None = None,
) -> dict[str, Any]:
    """Run ``methods`` (names, ``all`` or ``ablations``) and write one method's model to ``out``
    (``keep``, default the first method) with ``metrics.json`` (every method's accuracy),
    ``report.md``, the translator and a PNG of translated images when TGMB ran.

    ``checkpoint`` (every, resume): each translator and each method's training checkpoints in
    ``OUT.parts/checkpoints/``; the checkpoints stay until the output is written, so a resumed
    run finds the methods that had finished at their last step and only re-scores them."""
    cfg = cfg or CrossModalConfig()
    device = torch.device(device)
    chosen = resolve_methods(list(methods))
    keep = keep or chosen[0].name
    if keep not in [m.name for m in chosen]:
        raise LorexError(f"keep: '{keep}' is not among the methods run")
    source_dir = Path(source)
    ckpt = checkpoint.at(work_directory(out) / "checkpoints") if checkpoint is not None else None
    fingerprint = {"source": str(source_dir), "target": target, "ti": ti}
    inputs = _load_inputs(source_dir, target, ti, cfg, device)
    runner = _MethodRunner(inputs, fingerprint, ckpt, device, progress)
    results: dict[str, dict[str, Any]] = {}
    saved: LorexModel | None = None
    for method in chosen:
        results[method.name], adapted = runner.run(method, cfg)
        if method.name == keep:  # only the model written is kept in memory
            saved = adapted
    metrics = {
        "source": str(source_dir),
        "target": target,
        "ti": ti,
        "modality": inputs.tr.modality,
        "target_samples": len(inputs.tr),
        "ti_pairs": len(inputs.ti_pairs),
        "source_statistics": inputs.stats_origin,
        "methods": results,
        "saved_model": keep,
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "lorex_version": __version__,
        "device": str(device),
    }
    files = _output_files(metrics, runner.translators, inputs, cfg, device)
    made_by = run_record(
        "adapt cross-modal",
        source=str(source_dir),
        target=target,
        ti=ti,
        methods=[m.name for m in chosen],
        cross_modal=cfg.to_dict(),
    )
    out = Path(out)
    save_model(saved, out, made_by=made_by, seed=cfg.seed, extra_files=files)
    if ckpt is not None:  # the output is whole: the checkpoints have done their job
        shutil.rmtree(ckpt.directory, ignore_errors=True)
        remove_if_empty(ckpt.directory.parent)
    return metrics


def _output_files(
    metrics: dict[str, Any], translators: dict, i: _Inputs, cfg: CrossModalConfig, device
) -> dict[str, Any]:
    """``metrics.json`` and ``report.md``; with a translator, its weights and a PNG of it."""
    files: dict[str, Any] = {
        "metrics.json": metrics,
        "report.md": cross_modal_report(metrics).encode(),
    }
    if translators:
        net = next(iter(translators.values()))[0]
        files["translations.png"] = translations_png(
            i.ti_t[:8],
            i.ti_rgb[:8],
            translate(net, i.ti_t[:8], device),
            i.x_tr[:8],
            translate(net, i.x_tr[:8], device),
        )
        files["translator.safetensors"] = tensors_bytes(
            net.state_dict(),
            metadata={"arch": cfg.translator, "width": str(cfg.translator_width)},
        )
    return files


def _test_split(name: str) -> PairedDataset | None:
    """The held-out test split of a built-in set, or of a folder with a ``test/`` folder."""
    if name in PAIRED or (Path(name) / "test").is_dir():
        return load_paired(name, "test", with_rgb=False)
    return None
