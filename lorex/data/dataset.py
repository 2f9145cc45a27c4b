"""In-memory image datasets: uint8 ``(N, H, W, 3)`` arrays (or clips ``(N, T, H, W, 3)``) with
integer labels and class names."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ImageDataset:
    images: np.ndarray  # uint8, (N, H, W, 3), or (N, T, H, W, 3) for clips of T frames
    labels: np.ndarray  # int64, (N,)
    classes: list[str]
    name: str = ""

    def __post_init__(self) -> None:
        if (
            self.images.ndim not in (4, 5)
            or self.images.shape[-1] != 3
            or self.images.dtype != np.uint8
        ):
            raise ValueError(
                f"{self.name}: images must be uint8 (N, H, W, 3) or clips (N, T, H, W, 3), got "
                f"{self.images.dtype} {self.images.shape}"
            )
        if len(self.images) != len(self.labels):
            raise ValueError(
                f"{self.name}: {len(self.images)} images but {len(self.labels)} labels"
            )
        self.labels = self.labels.astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[-3]), int(self.images.shape[-2])

    @property
    def frames(self) -> int:
        """Frames per sample: 1 for images, T for clips."""
        return int(self.images.shape[1]) if self.images.ndim == 5 else 1

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=len(self.classes))

    def subset_indices(self, max_samples: int | None, seed: int = 0) -> np.ndarray:
        """The sorted indices :meth:`subset` keeps."""
        if max_samples is None or max_samples >= len(self):
            return np.arange(len(self), dtype=np.int64)
        rng = np.random.default_rng(seed)
        per_class = [
            rng.permutation(np.flatnonzero(self.labels == c)) for c in range(len(self.classes))
        ]
        picked: list[int] = []
        rank = 0
        while len(picked) < max_samples:  # round-robin over classes keeps the balance
            took = False
            for idx in per_class:
                if rank < len(idx) and len(picked) < max_samples:
                    picked.append(int(idx[rank]))
                    took = True
            if not took:
                break
            rank += 1
        return np.sort(np.asarray(picked, dtype=np.int64))

    def subset(self, max_samples: int | None, seed: int = 0) -> ImageDataset:
        """A class-balanced, seeded subset of at most ``max_samples`` images (order preserved)."""
        if max_samples is None or max_samples >= len(self):
            return self
        return self._take(self.subset_indices(max_samples, seed))

    def held_out(self, max_samples: int | None, seed: int = 0) -> ImageDataset:
        """The images ``subset(max_samples, seed)`` leaves out: data a model trained on that
        subset never saw, for choosing settings without reading the test split."""
        rest = np.ones(len(self), dtype=bool)
        rest[self.subset_indices(max_samples, seed)] = False
        return self._take(np.flatnonzero(rest))

    def _take(self, keep: np.ndarray) -> ImageDataset:
        return ImageDataset(self.images[keep], self.labels[keep], self.classes, self.name)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Images as float ``(N, 3, H, W)`` (clips ``(N, T, 3, H, W)``) in [0, 1], int64 labels."""
        x = torch.from_numpy(self.images).movedim(-1, -3).float().div_(255.0)
        return x.contiguous(), torch.from_numpy(self.labels)


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-class split into sorted train and test indices."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
