"""The handwritten digits (UCI "Optical Recognition of Handwritten Digits", CC BY 4.0; see
``assets/README.md``): 1797 8x8 images with 16 gray levels, upsampled to the demo's resolution."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # the label of the unconditional (classifier-free guidance) branch
DEFAULT_SIZE = 16
MIN_SIZE, MAX_SIZE = 8, 128
SPLITS = ("all", "train", "test")
NUM_TEST = 360  # held-out images (20 %); the split is fixed (a seeded permutation)
_SPLIT_SEED = 1234


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be an int in [{MIN_SIZE}, {MAX_SIZE}], got {size!r}")
    return int(size)


def _raw() -> tuple[np.ndarray, np.ndarray]:
    with np.load(os.path.join(ASSETS, "digits.npz"), allow_pickle=False) as f:
        return f["images"], f["labels"]


def split_indices(split: str = "all") -> torch.Tensor:
    """Indices (int64, sorted) of a split of the 1797 images: ``"all"``, ``"train"`` (1437) or
    ``"test"`` (360, held out from the classifier's and the demo DiT's training)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    n = len(_raw()[1])
    if split == "all":
        return torch.arange(n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(_SPLIT_SEED))
    idx = perm[:NUM_TEST] if split == "test" else perm[NUM_TEST:]
    return idx.sort().values


def to_size(images8: torch.Tensor, size: int) -> torch.Tensor:
    """[N, 1, 8, 8] in [-1, 1] -> [N, 1, size, size] (bilinear, antialiased when shrinking)."""
    if images8.shape[-1] == size:
        return images8.clone()
    return F.interpolate(images8, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=size < images8.shape[-1]).clamp_(-1.0, 1.0)


def load_digits(size: int = DEFAULT_SIZE, *, split: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [N, 1, size, size] float32 in [-1, 1], labels [N] int64 in 0..9)``.

    The 8x8 originals (gray levels 0..16) map linearly to [-1, 1] (0 -> -1, 16 -> 1) and are
    upsampled bilinearly. size: an int in [8, 128]. split: ``"all"`` (1797), ``"train"`` (1437) or
    ``"test"`` (360); the split is fixed.
    """
    size = _check_size(size)
    idx = split_indices(split)
    images, labels = _raw()
    x = torch.from_numpy(images.astype(np.float32))[idx].unsqueeze(1) / 8.0 - 1.0
    return to_size(x, size), torch.from_numpy(labels.astype(np.int64))[idx]
