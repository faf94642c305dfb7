"""A small CNN that recognises the digits, for scoring generated samples: ``forward(x)`` gives
logits, ``features(x)`` the 128-d penultimate activations (for a Fréchet distance)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from viditq_demo.digits.data import DEFAULT_SIZE, NUM_CLASSES

FEATURE_DIM = 128


class DigitClassifier(nn.Module):
    """Input [B, 1, size, size] in [-1, 1] (size 16 for the shipped weights); three 3x3 conv
    layers (16, 32, 64 channels; 2x max-pool after the first two), a 128-d ReLU feature layer,
    dropout, 10 logits."""

    def __init__(self, size: int = DEFAULT_SIZE):
        super().__init__()
        if size % 4:
            raise ValueError(f"size must be a multiple of 4, got {size!r}")
        self.size = size
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * (size // 4) ** 2, FEATURE_DIM)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def _check(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != (1, self.size, self.size):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"the classifier takes [B, 1, {self.size}, {self.size}] images, got {shape}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 128] penultimate activations (after ReLU)."""
        self._check(x)
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        h = F.relu(self.conv3(h))
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 10] logits."""
        return self.head(self.dropout(self.features(x)))
