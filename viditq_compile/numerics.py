"""The quantization numerics of viditq_compile, in plain PyTorch.

This module is the single source of truth: every op, kernel and pass is tested against these
functions (integer accumulation bit-exact, float epilogues within stated tolerances). The CPU
implementations of the ``viditq`` ops are built from these same functions, swapping only the
integer GEMM for a fast one, so eager, exported and compiled programs share one definition.

Conventions
- Signed integer grids: ``qmin = -2**(bits-1)``, ``qmax = 2**(bits-1) - 1``.
- Weights ``w [N, K]`` are quantized per output channel: ``w ≈ (q - zero) * scale`` with
  ``q [N, K] int8``, ``scale [N] fp32`` and ``zero [N] int32`` (``None`` when symmetric).
  Asymmetric ranges are min/max forced to include 0, so an exact 0 stays exactly representable.
- Activations are quantized dynamically per token (one scale per row of the input flattened to
  ``[M, K]``), symmetric: ``scale = absmax / qmax``. ``SCALE_FLOOR`` keeps all-zero rows finite.
  A row holding NaN/Inf gets a NaN/Inf scale, so the non-finite value propagates to that row of
  the output only, as it would in floating point; no other row is touched.
- The GEMM accumulates in int32. The epilogue is
  ``out = (acc - zero * rowsum(xq)) * x_scale * w_scale + bias`` computed in fp32, then cast to
  the activation dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

SCALE_FLOOR = 1e-12
"""Smallest absmax used to derive a scale: an all-zero row quantizes to zeros, not NaN."""

SUPPORTED_WEIGHT_BITS = (8,)
SUPPORTED_ACT_BITS = (8,)


def qrange(bits: int) -> tuple[int, int]:
    """The signed integer grid ``(qmin, qmax)`` for ``bits``."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in [2, 8], got {bits!r}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight quantized per output channel.

    q: [N, K] int8, row-major; scale: [N] fp32; zero: [N] int32 or None (symmetric).
    """

    q: Tensor
    scale: Tensor
    zero: Optional[Tensor]
    bits: int

    def dequantize(self) -> Tensor:
        q = self.q.to(torch.float32)
        if self.zero is not None:
            q = q - self.zero.to(torch.float32)[:, None]
        return q * self.scale[:, None]


def quantize_weight(w: Tensor, bits: int = 8, sym: bool = True) -> QuantizedWeight:
    """Quantize ``w [N, K]`` (any float dtype) per output channel, round to nearest.

    Symmetric: ``scale = absmax / qmax``, zero point 0. Asymmetric: ``scale = (max - min) /
    (qmax - qmin)`` over the row's range extended to include 0, ``zero = qmin - round(min /
    scale)``.
    """
    if not isinstance(w, Tensor) or w.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor [N, K], got {type(w).__name__} "
                         f"of shape {tuple(getattr(w, 'shape', ()))}")
    if not w.is_floating_point():
        raise ValueError(f"weight must be floating point, got {w.dtype}")
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or Inf; it cannot be quantized")
    qmin, qmax = qrange(bits)
    wf = w.detach().to(torch.float32)
    if sym:
        scale = wf.abs().amax(dim=1).clamp_min(SCALE_FLOOR) / qmax
        q = torch.clamp(torch.round(wf / scale[:, None]), qmin, qmax)
        return QuantizedWeight(q.to(torch.int8), scale, None, bits)
    lo = wf.amin(dim=1).clamp_max(0.0)
    hi = wf.amax(dim=1).clamp_min(0.0)
    scale = (hi - lo).clamp_min(SCALE_FLOOR) / (qmax - qmin)
    zero = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    q = torch.clamp(torch.round(wf / scale[:, None]) + zero[:, None], qmin, qmax)
    return QuantizedWeight(q.to(torch.int8), scale, zero.to(torch.int32), bits)


def quantize_per_token(x: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Dynamic symmetric per-token quantization.

    x: [..., K] float. Returns q: [..., K] int8 and scale: [..., 1] fp32.
    """
    qmin, qmax = qrange(bits)
    xf = x.to(torch.float32)
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(SCALE_FLOOR) / qmax
    q = torch.clamp(torch.round(xf / scale), qmin, qmax)
    return q.to(torch.int8), scale


def int_gemm_ref(xq: Tensor, wq: Tensor) -> Tensor:
    """Reference integer GEMM ``xq [M, K] int8 @ wq[N, K].T -> [M, N] int32``.

    Accumulates in int64 and checks that the result fits int32, the accumulator every kernel uses.
    """
    acc = xq.to(torch.int64) @ wq.to(torch.int64).t()
    info = torch.iinfo(torch.int32)
    if acc.numel() and (acc.max() > info.max or acc.min() < info.min):
        raise OverflowError("int32 accumulator overflow; K is too large for this bit width")
    return acc.to(torch.int32)


def int_gemm_fast(xq: Tensor, wq: Tensor) -> Tensor:
    """``torch._int_mm`` (int32 accumulation); bit-exact with ``int_gemm_ref``."""
    return torch._int_mm(xq, wq.t())


def dequantize_epilogue(acc: Tensor, x_scale: Tensor, w_scale: Tensor,
                        w_zero: Optional[Tensor] = None, x_rowsum: Optional[Tensor] = None,
                        bias: Optional[Tensor] = None,
                        out_dtype: torch.dtype = torch.float32) -> Tensor:
    """``acc [M, N] int32`` -> ``[M, N] out_dtype``.

    x_scale: [M, 1] fp32; w_scale: [N] fp32; w_zero: [N] int32 with x_rowsum: [M, 1] int32
    (both or neither); bias: [N] any float dtype.
    """
    if w_zero is not None:
        if x_rowsum is None:
            raise ValueError("asymmetric weights need the per-token activation sum")
        acc = acc - x_rowsum * w_zero
    out = acc.to(torch.float32) * x_scale * w_scale
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype)


def w8a8_linear(x: Tensor, wq: Tensor, w_scale: Tensor, w_zero: Optional[Tensor],
                bias: Optional[Tensor], act_bits: int = 8,
                gemm: Callable[[Tensor, Tensor], Tensor] = int_gemm_ref) -> Tensor:
    """Quantized ``linear(x, w, bias)``: per-token activations, per-channel weights.

    x: [..., K] float; wq: [N, K] int8; w_scale: [N] fp32; w_zero: [N] int32 or None;
    bias: [N] or None. Returns [..., N] in x's dtype. ``gemm`` picks the integer GEMM.
    """
    k = x.shape[-1]
    xq, x_scale = quantize_per_token(x.reshape(-1, k), act_bits)
    acc = gemm(xq, wq)
    rowsum = xq.to(torch.int32).sum(dim=-1, keepdim=True) if w_zero is not None else None
    out = dequantize_epilogue(acc, x_scale, w_scale, w_zero, rowsum, bias, x.dtype)
    return out.reshape(*x.shape[:-1], wq.shape[0])


def sqnr_db(reference: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(|ref|^2 / |ref - approx|^2)`` in dB."""
    ref = reference.detach().to(torch.float64)
    err = (ref - approx.detach().to(torch.float64)).pow(2).sum()
    if err == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / err))
