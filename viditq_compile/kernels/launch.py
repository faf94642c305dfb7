"""What every Triton launch of the package shares: the CUDA device guard.

Triton launches on the *current* CUDA device, not on the tensors' one: a tensor on ``cuda:1``
while ``cuda:0`` is current would be read by a kernel running on device 0 (an illegal address,
or silently wrong results with peer access). The kernel wrappers launch inside
``device_guard(x.device)``.
"""

from __future__ import annotations

import contextlib

import torch


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.cuda.device(device)`` for a CUDA device (the launch then runs on it), a no-op
    context for any other (CPU tensors under ``TRITON_INTERPRET=1``, meta tensors)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
