"""Which shapes the Triton GEMM (``kernels/int_gemm.py``) takes, without importing Triton: the
quantization report says which layers would run the reference path on CUDA instead."""

from __future__ import annotations

K_MULTIPLE = 16
"""The GEMM steps along K in multiples of 16 (int8 tensor-core tiles, two int4 nibbles a byte)."""


def unsupported_reason(m: int, n: int, k: int, weight_bits: int, group_size: int) -> str | None:
    """Why ``int_gemm.qlinear_triton`` cannot take this shape, or None when it can."""
    if weight_bits not in (4, 8):
        return f"weight_bits={weight_bits} (supported: 4, 8)"
    if m < 0 or n < 1 or k < 1:
        return f"empty or negative shape M={m}, N={n}, K={k}"
    if k % K_MULTIPLE:
        return f"K={k} is not a multiple of {K_MULTIPLE}"
    if group_size and (group_size % K_MULTIPLE or k % group_size):
        return f"group_size={group_size} must be a multiple of {K_MULTIPLE} dividing K={k}"
    return None
