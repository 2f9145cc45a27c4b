"""Re-ID training data: what a re-ID dataset is, whole-identity subsets, and P x K batches.

A re-ID dataset is a built-in domain (``reid/a`` .. ``reid/d``) or a folder in the Market-1501
layout; training takes whole identities, and batches of P identities x K images each
(:class:`PKSampler`, SAGE's 16 x 4), so that every batch has positives and negatives for the
triplet loss.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from lorex.data.market1501 import FOLDERS, Market1501, ReidSplit, relabel
from lorex.data.registry import BUILTINS
from lorex.data.reid_synth import DOMAINS, REID_DOMAINS, load_reid
from lorex.errors import LorexError

log = logging.getLogger("lorex")

DEFAULT_INSTANCES = 4  # K: images per identity in a batch (SAGE: 16 ids x 4)


def is_reid_data(name: str | Path) -> bool:
    """A built-in re-ID domain name, or a folder in the Market-1501 layout."""
    if str(name) in DOMAINS:
        return True
    root = Path(name)
    return root.is_dir() and all((root / f).is_dir() for f in FOLDERS.values())


def load_reid_data(name: str | Path) -> Market1501:
    """``load_reid`` with a one-line error that says what a re-ID dataset is."""
    if str(name) in BUILTINS:
        raise LorexError(
            f"{name} is a classification dataset; --objective reid needs a re-ID dataset "
            f"({', '.join(REID_DOMAINS)} or a Market-1501 folder)"
        )
    root = Path(name)
    if not is_reid_data(name) and root.is_dir():
        missing = [f for f in FOLDERS.values() if not (root / f).is_dir()]
        raise LorexError(
            f"{root}: not a Market-1501 folder (no {missing[0]}/); --objective reid needs a "
            f"re-ID dataset ({', '.join(REID_DOMAINS)} or a Market-1501 folder)"
        )
    return load_reid(name)


def subset_ids(split: ReidSplit, max_samples: int | None, seed: int = 0) -> ReidSplit:
    """Whole identities, taken in a seeded random order when all their images still fit in
    ``max_samples``; relabelled 0..K-1 (the original ids stay in ``raw_ids``)."""
    if max_samples is None or max_samples >= len(split):
        return split
    uniq, counts = np.unique(split.raw_ids, return_counts=True)
    keep, total = [], 0
    for i in np.random.default_rng(seed).permutation(len(uniq)):
        if total + counts[i] <= max_samples:
            keep.append(uniq[i])
            total += int(counts[i])
    if len(keep) < 2:
        raise LorexError(f"--max-samples {max_samples} keeps fewer than 2 whole identities")
    mask = np.isin(split.raw_ids, keep)
    files = [f for f, m in zip(split.files, mask, strict=True) if m] if split.files else []
    return relabel(
        ReidSplit(split.images[mask], split.ids[mask], split.cams[mask], files, split.raw_ids[mask])
    )


def reid_class_names(split: ReidSplit) -> list[str]:
    """Class names for the relabelled train ids 0..K-1: the ids in the file names."""
    names = {int(i): str(int(r)) for i, r in zip(split.ids, split.raw_ids, strict=True)}
    if sorted(names) != list(range(len(names))):
        raise LorexError("train ids must be relabelled 0..K-1 (market1501.relabel)")
    return [names[i] for i in range(len(names))]


class PKSampler:
    """Batches of P identities x K images each, seeded and deterministic.

    Each epoch (torchreid's ``RandomIdentitySampler``): every identity's images are shuffled and
    cut into chunks of K (an identity with fewer than K images is drawn K times with
    replacement; a remainder shorter than K is left out this epoch); then batches take one chunk
    from each of P distinct identities chosen at random among those with chunks left, until
    fewer than P have any. So an epoch sees about every image once. A batch lists its
    identities' chunks one after the other: ``batch.reshape(P, K)`` has one identity per row.
    """

    def __init__(self, ids: np.ndarray, p: int, k: int = DEFAULT_INSTANCES, seed: int = 0):
        ids = np.asarray(ids)
        if k < 1:
            raise LorexError(f"instances per identity: expected K >= 1, got {k}")
        if p < 2:
            raise LorexError(f"identities per batch: expected P >= 2, got {p}")
        order = np.argsort(ids, kind="stable")
        uniq, starts = np.unique(ids[order], return_index=True)
        if len(uniq) < 2:
            raise LorexError(f"re-ID training needs at least 2 identities, got {len(uniq)}")
        self.groups = np.split(order, starts[1:])  # image indices per identity, ascending
        self.ids = uniq
        self.p, self.k = min(p, len(uniq)), k
        if self.p < p:
            log.warning("only %d identities: batches of %d ids x %d", len(uniq), self.p, k)
        self.rng = np.random.default_rng([seed, 7])

    def epoch(self) -> list[np.ndarray]:
        """The batches of one epoch: index arrays of length P * K."""
        rng, k = self.rng, self.k
        chunks: list[list[np.ndarray]] = []
        for idx in self.groups:
            if len(idx) < k:
                chunks.append([rng.choice(idx, k, replace=True)])
            else:
                idx = rng.permutation(idx)
                chunks.append([idx[i : i + k] for i in range(0, len(idx) - k + 1, k)])
        left = np.array([len(c) for c in chunks])
        used = np.zeros(len(chunks), dtype=np.int64)
        batches = []
        while (left > 0).sum() >= self.p:
            chosen = rng.choice(np.flatnonzero(left > 0), self.p, replace=False)
            batches.append(np.concatenate([chunks[c][used[c]] for c in chosen]))
            used[chosen] += 1
            left[chosen] -= 1
        return batches
