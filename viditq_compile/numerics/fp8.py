"""The FP8 (e4m3) numerics: per-token activations and per-output-channel weights on the
``float8_e4m3fn`` grid with fp32 scales, accumulated in fp32.

Hopper's tensor cores take e4m3 operands and accumulate in fp32, which Triton software-pipelines
(an int8 dot with an int32 accumulator it does not), and DiT activations with their outlier
channels keep more of their small values on a floating-point grid than on int8's uniform one.
Everything else is the integer route's: the balancing (smoothing, rotation) before quantization,
``quant.qlinear``'s dequantizing epilogue (``acc * x_scale * w_scale + bias`` in fp32) and the
fused epilogues after it. Only the grid and the GEMM differ.

Grid: ``scale = absmax / 448`` (``E4M3_MAX``, the largest finite e4m3fn value) floored at
``quant.SCALE_FLOOR``; ``q = e4m3(clamp(x / scale, -448, 448))``, the cast rounding to nearest
even. A row holding NaN/Inf gets a NaN/Inf scale and its NaNs propagate to that output row, as in
the integer route.

GEMM: every product of two e4m3 values is exact in fp32 (4 + 4 significant bits), so the only
rounding is the fp32 sum. ``fp8_gemm_ref`` sums in float64 and rounds once: the exact result to
fp32. An fp32 implementation (``fp8_gemm_fast``, the Triton kernel, a tensor core) is within
``K * 2^-24 * (|xq| @ |wq|.T)`` of it, whatever its summation order (``FP8_GEMM_RTOL`` per unit
of K); there is no bit-exact contract for the accumulation, unlike int32's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from viditq_compile.numerics import quant

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
FP8_GEMM_RTOL = 2.0 ** -24
"""Per unit of K: an fp32 summation of K exact products is within ``K * FP8_GEMM_RTOL`` of the
float64 sum, relative to the sum of the products' magnitudes."""

FORMATS = ("int", "fp8_e4m3")
"""The number formats a quantized layer can take (``LayerPlan.number_format``)."""


def is_fp8(t: Tensor) -> bool:
    return t.dtype == E4M3


def _to_e4m3(scaled: Tensor) -> Tensor:
    # clamp first: casting a value past the largest finite e4m3fn gives NaN, not saturation
    return scaled.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def quantize_weight_fp8(w: Tensor) -> quant.QuantizedWeight:
    """``w [N, K]`` (any float dtype) -> e4m3 ``q [N, K]``, fp32 per-output-channel ``scale [N]``
    (``absmax / 448``); no zero point. NaN/Inf are refused, as ``quant.quantize_weight`` does."""
    if not isinstance(w, Tensor) or w.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor [N, K], got {type(w).__name__} "
                         f"of shape {tuple(getattr(w, 'shape', ()))}")
    if not w.is_floating_point():
        raise ValueError(f"weight must be floating point, got {w.dtype}")
    bad = quant.nonfinite_summary(w)
    if bad:
        raise ValueError(f"weight contains NaN or Inf ({bad}); it cannot be quantized")
    wf = w.detach().to(torch.float32)
    scale = wf.abs().amax(dim=-1).clamp_min(quant.SCALE_FLOOR) / E4M3_MAX
    return quant.QuantizedWeight(_to_e4m3(wf / scale[:, None]), scale, None, 8, None)


def quantize_per_token_fp8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Dynamic per-token e4m3: x [..., K] float -> q [..., K] e4m3, scale [..., 1] fp32."""
    xf = x.to(torch.float32)
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(quant.SCALE_FLOOR) / E4M3_MAX
    return _to_e4m3(xf / scale), scale


def quantize_act_fp8(x: Tensor, smooth: Tensor | None, rotation: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Balance then quantize an activation to e4m3 per token: ``quant.quantize_act``'s two
    balancing routes (the 16-bit rotation on the exact ±1 factors with its normalisation moved
    into the scale, or fp32 ``balance_activation``), then ``quantize_per_token_fp8``."""
    if rotation and x.dtype in (torch.bfloat16, torch.float16):
        y, unscale = quant.rotate_16bit(x, smooth, rotation)
        q, scale = quantize_per_token_fp8(y)
        return q, scale * unscale
    return quantize_per_token_fp8(quant.balance_activation(x, smooth, rotation))


def fp8_gemm_ref(xq: Tensor, wq: Tensor) -> Tensor:
    """``xq [M, K] e4m3 @ wq [N, K].T -> [M, N] fp32``: exact products summed in float64,
    rounded once to fp32 (module docstring)."""
    return (xq.to(torch.float64) @ wq.to(torch.float64).t()).to(torch.float32)


def fp8_gemm_fast(xq: Tensor, wq: Tensor) -> Tensor:
    """The same GEMM with fp32 operands and accumulation (a BLAS sgemm on CPU): within
    ``K * FP8_GEMM_RTOL`` of ``fp8_gemm_ref``."""
    return xq.to(torch.float32) @ wq.to(torch.float32).t()


def gemm_bound(xq: Tensor, wq: Tensor) -> Tensor:
    """The tolerance of an fp32 e4m3 GEMM against ``fp8_gemm_ref``, per output entry:
    ``K * FP8_GEMM_RTOL * (|xq| @ |wq|.T)``."""
    k = xq.shape[-1]
    return k * FP8_GEMM_RTOL * (xq.to(torch.float64).abs() @ wq.to(torch.float64).abs().t())
