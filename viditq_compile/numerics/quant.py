"""The quantization numerics of viditq_compile, in plain PyTorch.

This module is the single source of truth: every op, kernel and pass is tested against these
functions (integer accumulation bit-exact, float epilogues within stated tolerances). The CPU
implementations of the ``viditq`` ops are built from these same functions, swapping only the
integer GEMM for a fast one, so eager, exported and compiled programs share one definition.

Conventions
- Signed integer grids: ``qmin = -2**(bits-1)``, ``qmax = 2**(bits-1) - 1``.
- Weights ``w [N, K]`` are quantized per output channel (``group=None``) or per output channel
  per group of ``g`` consecutive input channels: ``w ≈ (q - zero) * scale`` with
  ``q [N, K] int8`` (int4 values too: packing is ``numerics/packing.py``'s business), ``scale``
  fp32 and ``zero`` int32 (``None`` when symmetric), both ``[N]`` or ``[N, K // g]``.
  Asymmetric ranges are min/max forced to include 0, so an exact 0 stays exactly representable.
- Activations are first balanced (``x' = (x * m) R``, fp32), then quantized dynamically per
  token (one scale per row of the input flattened to ``[M, K]``), symmetric:
  ``scale = absmax / qmax``, or with one static per-tensor scale. ``SCALE_FLOOR`` keeps all-zero
  rows finite. A row holding NaN/Inf gets a NaN/Inf scale, so the non-finite value propagates to
  that row of the output only, as it would in floating point; no other row is touched.
- The GEMM accumulates in int32 (one GEMM per weight group), so the K one GEMM sums over is
  bounded by ``max_k_for_int32`` (133144 for W8A8); the select pass keeps longer layers in
  floating point. The epilogue is
  ``out = (acc - zero * rowsum(xq)) * x_scale * w_scale + bias`` computed in fp32, then cast to
  the output dtype; ``qlinear`` documents the exact order of the float operations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from viditq_compile.config import capabilities
from viditq_compile.numerics.hadamard import kron_apply

SCALE_FLOOR = 1e-12
"""Smallest absmax used to derive a scale: an all-zero row quantizes to zeros, not NaN."""

SUPPORTED_WEIGHT_BITS = capabilities.WEIGHT_BITS
SUPPORTED_ACT_BITS = capabilities.ACT_BITS  # 4-bit values travel in int8 through the same GEMM


def qrange(bits: int) -> tuple[int, int]:
    """The signed integer grid ``(qmin, qmax)`` for ``bits``."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in [2, 8], got {bits!r}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight quantized per output channel, or per output channel per group along K.

    q: [N, K] int8, row-major, values on the ``bits`` grid (unpacked for int4);
    scale: fp32 and zero: int32 or None (symmetric), both [N] (``group=None``) or [N, K // group].
    """

    q: Tensor
    scale: Tensor
    zero: Tensor | None
    bits: int
    group: int | None = None

    def dequantize(self) -> Tensor:
        """``(q - zero) * scale`` as fp32 [N, K]."""
        n, k = self.q.shape
        g = self.group or k
        q = self.q.to(torch.float32).reshape(n, k // g, g)
        scale = self.scale.reshape(n, k // g, 1)
        if self.zero is not None:
            q = q - self.zero.to(torch.float32).reshape(n, k // g, 1)
        return (q * scale).reshape(n, k)


def _check_group(group: int | None, k: int) -> int:
    """The group size ``group`` resolves to for K=k (``None`` -> k); ValueError if it is not a
    positive int dividing k."""
    if group is None:
        return k
    if not isinstance(group, int) or isinstance(group, bool) or group <= 0 or k % group:
        raise ValueError(f"group={group!r} must be a positive int dividing K={k}")
    return group


def nonfinite_summary(t: Tensor) -> str | None:
    """None when every value of ``t`` is finite; else what is not, for an error message, e.g.
    ``"2 NaN and 1 +Inf value(s), the first at index [3, 17]"``."""
    bad = ~torch.isfinite(t)
    if not bad.any():
        return None
    counts = ((int(torch.isnan(t).sum()), "NaN"), (int((t == math.inf).sum()), "+Inf"),
              (int((t == -math.inf).sum()), "-Inf"))
    kinds = " and ".join(f"{n} {kind}" for n, kind in counts if n)
    first = [int(i) for i in bad.nonzero()[0]]
    return f"{kinds} value(s), the first at index {first}"


def quantize_weight(w: Tensor, bits: int = 8, sym: bool = True,
                    group: int | None = None) -> QuantizedWeight:
    """Quantize ``w [N, K]`` (any float dtype), round to nearest.

    ``group=None``: one scale per output channel; ``group=g`` (dividing K): one per output
    channel per ``g`` consecutive input channels. Over each such range, symmetric:
    ``scale = absmax / qmax``, zero point 0; asymmetric: ``scale = (max - min) / (qmax - qmin)``
    over the range extended to include 0, ``zero = qmin - round(min / scale)``.
    """
    if not isinstance(w, Tensor) or w.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor [N, K], got {type(w).__name__} "
                         f"of shape {tuple(getattr(w, 'shape', ()))}")
    if not w.is_floating_point():
        raise ValueError(f"weight must be floating point, got {w.dtype}")
    qmin, qmax = qrange(bits)
    n, k = w.shape
    g = _check_group(group, k)
    bad = nonfinite_summary(w)
    if bad:
        raise ValueError(f"weight contains NaN or Inf ({bad}); it cannot be quantized")
    wf = w.detach().to(torch.float32).reshape(n, k // g, g)
    if sym:
        scale = wf.abs().amax(dim=-1).clamp_min(SCALE_FLOOR) / qmax
        q = torch.clamp(torch.round(wf / scale[..., None]), qmin, qmax)
        zero = None
    else:
        lo = wf.amin(dim=-1).clamp_max(0.0)
        hi = wf.amax(dim=-1).clamp_min(0.0)
        scale = (hi - lo).clamp_min(SCALE_FLOOR) / (qmax - qmin)
        zero = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
        q = torch.clamp(torch.round(wf / scale[..., None]) + zero[..., None], qmin, qmax)
        zero = zero.to(torch.int32)
    if group is None:
        scale = scale.reshape(n)
        zero = None if zero is None else zero.reshape(n)
    return QuantizedWeight(q.reshape(n, k).to(torch.int8), scale, zero, bits, group)


def smoothing_vector(w_absmax: Tensor, a_absmax: Tensor, alpha: float) -> Tensor:
    """The channel-balancing vector ``m = w_max^alpha / a_max^(1 - alpha)``, fp32 [K].

    w_absmax, a_absmax: [K] (per input channel of the weight and of the calibrated activation).
    Both are floored at 1e-5 and m is clamped to [1e-5, 1e5]. The activation is multiplied by
    m and the weight divided (``balance_activation`` / ``balance_weight``), so alpha is the
    exponent on the weight side (the ViDiT-Q configs' convention).
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if w_absmax.dim() != 1 or w_absmax.shape != a_absmax.shape:
        raise ValueError(f"w_absmax and a_absmax must both be [K], got {tuple(w_absmax.shape)} "
                         f"and {tuple(a_absmax.shape)}")
    if not (torch.isfinite(w_absmax).all() and torch.isfinite(a_absmax).all()):
        raise ValueError("w_absmax or a_absmax contains NaN or Inf")
    w = w_absmax.detach().to(torch.float32).clamp_min(1e-5)
    a = a_absmax.detach().to(torch.float32).clamp_min(1e-5)
    return (w ** alpha / a ** (1.0 - alpha)).clamp(1e-5, 1e5)


def balance_activation(x: Tensor, smooth: Tensor | None, rotation: list[Tensor]) -> Tensor:
    """``x' = (x * smooth) @ kron(*rotation)`` in fp32.

    x: [..., K] float; smooth: [K] fp32 or None (no scaling); rotation: ``kron_factors``-style
    orthogonal factors ``[a_i, a_i]`` fp32 with ``prod(a_i) == K`` (``[]``: no rotation).
    Returns [..., K] fp32 (x itself when x is fp32 and there is nothing to do).
    """
    xf = x.to(torch.float32)
    if smooth is not None:
        xf = xf * smooth
    return kron_apply(xf, [r.to(torch.float32) for r in rotation])


def balance_weight(w: Tensor, smooth: Tensor | None, signs: Tensor | None,
                   rotation: list[Tensor]) -> Tensor:
    """``W' = (W * (signs / smooth)) @ kron(*rotation)`` in fp32, the offline half of balancing.

    w: [N, K] float; smooth: [K] or None (1); signs: [K] of ±1 or None (1), the random diagonal
    of a randomized Hadamard; rotation as in ``balance_activation``. With the activation side
    given ``smooth * signs``, ``balance_activation(x, smooth * signs, R) @ W'.T == x @ w.T`` in
    exact arithmetic.
    """
    wf = w.detach().to(torch.float32)
    if smooth is not None and signs is not None:
        wf = wf * (signs.to(torch.float32) / smooth.to(torch.float32))
    elif smooth is not None:
        wf = wf * smooth.to(torch.float32).reciprocal()
    elif signs is not None:
        wf = wf * signs.to(torch.float32)
    return kron_apply(wf, [r.to(torch.float32) for r in rotation])


def quantize_per_token(x: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Dynamic symmetric per-token quantization.

    x: [..., K] float. Returns q: [..., K] int8 and scale: [..., 1] fp32.
    """
    qmin, qmax = qrange(bits)
    xf = x.to(torch.float32)
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(SCALE_FLOOR) / qmax
    q = torch.clamp(torch.round(xf / scale), qmin, qmax)
    return q.to(torch.int8), scale


def quantize_per_tensor(x: Tensor, scale: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Static symmetric quantization with one calibrated scale.

    x: [..., K] float; scale: 0-d fp32 (floored at ``SCALE_FLOOR``). Returns q: [..., K] int8
    and the scale broadcast to [..., 1] fp32 (a fresh tensor), the layout per-token scales have.
    """
    qmin, qmax = qrange(bits)
    s = scale.to(torch.float32).clamp_min(SCALE_FLOOR)
    q = torch.clamp(torch.round(x.to(torch.float32) / s), qmin, qmax)
    return q.to(torch.int8), s.expand(*x.shape[:-1], 1).clone()


def static_scale(absmax: Tensor, bits: int = 8) -> Tensor:
    """The per-tensor activation scale of the naive static baseline: ``max(absmax) / qmax``
    from calibration statistics (absmax: [K] per input channel), floored, 0-d fp32."""
    _, qmax = qrange(bits)
    return (absmax.max().to(torch.float32) / qmax).clamp_min(SCALE_FLOOR).reshape(())


def rotation_headroom(dtype: torch.dtype, k: int) -> int:
    """The exponent ``t`` below which a row's absmax must lie for the unnormalised ±1 rotation of
    K=k to stay finite in ``dtype`` (16-bit): every partial sum of a ±1 factor pass is at most
    ``k * absmax < 2^ceil(log2 k) * 2^t = 2^e_max``, with ``2^e_max`` the largest power of two of
    the dtype (fp16 15, bf16 127), so it rounds to a finite value. fp16 K=1152: t = 4."""
    return math.frexp(torch.finfo(dtype).max)[1] - 1 - (k - 1).bit_length()


def rotation_prescale(xs: Tensor, headroom: int) -> Tensor:
    """Per-row power of two ``p = 2^-s`` (``[..., 1]`` fp32) with the smallest ``s >= 0`` that puts
    the row's absmax below ``2^headroom`` (``rotation_headroom``); 1 for rows that are all zero,
    already small enough, or hold NaN/Inf (which then propagate as without it).

    xs: [..., K] float. The exponent is read from the fp32 bits of the absmax, so every
    implementation (torch, Inductor, Triton) derives the same ``s``.
    """
    amax = xs.abs().amax(dim=-1, keepdim=True).to(torch.float32)
    biased = (amax.view(torch.int32) >> 23) & 0xFF  # absmax in [2^(biased-127), 2^(biased-126))
    shift = (biased - (126 + headroom)).clamp_min(0)
    shift = torch.where(biased == 255, 0, shift)
    return ((127 - shift) << 23).view(torch.float32)


def rotate_16bit(x: Tensor, smooth: Tensor | None, rotation: list[Tensor]) -> tuple[Tensor, Tensor]:
    """The 16-bit rotation route of ``quantize_act``: ``y`` in x's dtype and ``unscale [..., 1]``
    fp32 with ``balance_activation(x, smooth, rotation) ≈ y * unscale``.

    x: [..., K] bf16/fp16; smooth: [K] fp32 or None; rotation: non-empty ``kron_factors``-style
    factors. Steps, each rounding to x's dtype: ``xs = x * smooth``; ``xs * p`` with the per-row
    power of two ``p = rotation_prescale(xs, rotation_headroom(dtype, K))``; the rotation on the
    exact ±1 factors (16-bit GEMMs accumulate in fp32, and sums of ±1 products of 16-bit values
    are mostly exact in fp32 whatever the order, which keeps the Triton kernel bit-exact with this).
    ``unscale = prod(1/sqrt(a_i)) / p``. Speed on CPU depends on the CPU's 16-bit GEMMs: once
    measured 2-3x faster than fp32 on a 2-core CPU, but 3x slower than the fp32 route on an AVX2
    CPU with torch 2.13 (``benchmarks/test_bench_block.py::test_quantize_act_rotated_16bit``).

    Why ``p``: the ±1 factors grow a row by up to K (its RMS by sqrt(K)); unscaled, that overflowed
    fp16 at input RMS ~508 for K=1152 and ~234 for K=4608, where the model itself stays finite.
    Now every finite row gives finite q and scale. Scaling by a power of two is exact on the
    16-bit grid except for values it moves below fp16's normal range (under 2^-(13+t) of the
    row's absmax, t the headroom; they keep an absolute precision of 2^-25, far below the
    rounding of the rotated sums), so q and the scale are those of rotating unscaled, except
    that q may move by one step on rare entries (measured: 3 of 295k at fp16 K=4608, RMS 30).
    """
    xs = x * smooth.to(x.dtype) if smooth is not None else x
    p = rotation_prescale(xs, rotation_headroom(x.dtype, x.shape[-1]))
    norm = torch.ones((), dtype=torch.float32, device=x.device)
    for r in rotation:
        norm = norm * r[0, 0].abs().to(torch.float32)  # every entry of a factor is ±1/sqrt(a)
    y = kron_apply(xs * p.to(x.dtype), [torch.sign(r).to(x.dtype) for r in rotation])
    return y, norm / p


def quantize_act(x: Tensor, smooth: Tensor | None, rotation: list[Tensor],
                 static_scale: Tensor | None, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Balance then quantize an activation: ``balance_activation`` followed by
    ``quantize_per_token`` (``static_scale is None``) or ``quantize_per_tensor``.

    x: [..., K] float. Returns q: [..., K] int8 and scale: [..., 1] fp32.

    For 16-bit ``x`` with a rotation and dynamic scales, the rotation runs in x's dtype on the
    exact ±1 factors of a per-row power-of-two prescaled x (``rotate_16bit``) and the
    normalisation moves into the per-token scale, ``scale * unscale``. The rotated values are
    rounded once to x's dtype (relative error 2^-9 of each value, well under the int8 step of
    1/254 of the row's absmax).
    """
    if rotation and static_scale is None and x.dtype in (torch.bfloat16, torch.float16):
        y, unscale = rotate_16bit(x, smooth, rotation)
        q, scale = quantize_per_token(y, bits)
        return q, scale * unscale
    xb = balance_activation(x, smooth, rotation)
    if static_scale is None:
        return quantize_per_token(xb, bits)
    return quantize_per_tensor(xb, static_scale, bits)


INT32_MAX = 2 ** 31 - 1


def max_k_for_int32(act_bits: int, weight_bits: int, weight_sym: bool, act_static: bool = False) -> int:
    """The largest K one integer GEMM may sum over without any int32 value of ``qlinear`` leaving
    the int32 range (the fast GEMMs wrap silently; only ``int_gemm_ref`` checks).

    K is what one accumulator sums: the layer's K per output channel, the group size for grouped
    weights (one GEMM per group). Worst case per product: activations |xq| <= 2^(a-1) - 1 (dynamic
    per-token scales put the row's absmax on qmax) or 2^(a-1) (static scales clamp at qmin);
    symmetric weights |wq| <= 2^(w-1) - 1; asymmetric weights ``(wq - zero)`` up to 2^w - 1, which
    also bounds the raw ``acc`` and ``rowsum * zero`` (both at most K * |xq| * 2^(w-1)).
    W8A8 symmetric: 133144; asymmetric int8: 66311; W4A8 asymmetric: 1127288.
    """
    qmax_a = qrange(act_bits)[1] + (1 if act_static else 0)
    qmax_w = qrange(weight_bits)[1] if weight_sym else 2 ** weight_bits - 1
    return INT32_MAX // (qmax_a * qmax_w)


def int32_accumulator_fits(k: int, act_bits: int, weight_bits: int, weight_sym: bool,
                           act_static: bool = False) -> bool:
    """Whether an integer GEMM over ``k`` (the layer's K, or its weight group) fits int32
    (``max_k_for_int32``)."""
    return k <= max_k_for_int32(act_bits, weight_bits, weight_sym, act_static)


def int_gemm_ref(xq: Tensor, wq: Tensor) -> Tensor:
    """Reference integer GEMM ``xq [M, K] int8 @ wq[N, K].T -> [M, N] int32``.

    Accumulates in int64 and checks that the result fits int32, the accumulator every kernel uses.
    """
    acc = xq.to(torch.int64) @ wq.to(torch.int64).t()
    info = torch.iinfo(torch.int32)
    if acc.numel() and (acc.max() > info.max or acc.min() < info.min):
        raise OverflowError("int32 accumulator overflow; K is too large for this bit width "
                            "(max_k_for_int32)")
    return acc.to(torch.int32)


def int_gemm_float64(xq: Tensor, wq: Tensor) -> Tensor:
    """The integer GEMM through float64 (exact: every int8 x int8 dot product of K < 2^38 is an
    integer below 2^53), for devices with no int64 GEMM and shapes ``_int_mm`` refuses (CUDA)."""
    return (xq.to(torch.float64) @ wq.to(torch.float64).t()).to(torch.int32)


def int_gemm_fast(xq: Tensor, wq: Tensor) -> Tensor:
    """``torch._int_mm`` (int32 accumulation); bit-exact with ``int_gemm_ref``."""
    return torch._int_mm(xq, wq.t())


def dequantize_epilogue(acc: Tensor, x_scale: Tensor, w_scale: Tensor,
                        w_zero: Tensor | None = None, x_rowsum: Tensor | None = None,
                        bias: Tensor | None = None,
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


def int8_mm(xq: Tensor, wq: Tensor, w_scale: Tensor | None, out_dtype: torch.dtype,
            gemm: Callable[[Tensor, Tensor], Tensor] = int_gemm_ref) -> Tensor:
    """The integer GEMM with a float output: ``gemm(xq [M, K], wq [N, K]).float()``, times
    ``w_scale [N]`` when given, cast to ``out_dtype``.

    With ``w_scale=None`` and fp32 out this is ``acc.float()``, so ``dequantize_epilogue`` on it
    is bit-exact with ``qlinear`` per channel. With ``w_scale`` and a 16-bit ``out_dtype`` the
    product is rounded once to 16 bits before the per-token scale (``token_scale_epilogue``):
    a relative error of at most 2^-8 (bf16) per element over ``qlinear``, in exchange for half
    the bytes of an fp32 product (the oneDNN route of ``kernels.onednn_int8``).
    """
    acc = gemm(xq, wq).to(torch.float32)
    if w_scale is not None:
        acc = acc * w_scale
    return acc.to(out_dtype)


def zero_adjusted_weight(wq: Tensor, w_zero: Tensor | None) -> Tensor:
    """``wq [N, K] int8 - w_zero [N]`` as int8: the symmetric-code weight whose integer GEMM is the
    reference's ``acc - rowsum(xq) * zero`` exactly (per channel). Raises ``ValueError`` when a
    difference leaves int8 (an asymmetric 8-bit weight can; 4-bit codes and zeros in [-8, 7]
    cannot)."""
    if w_zero is None:
        return wq
    d = wq.to(torch.int16) - w_zero.to(torch.int16).reshape(-1, 1)
    if d.numel() and (d.min() < -128 or d.max() > 127):
        raise ValueError("zero_adjusted_weight: w_q - w_zero leaves int8 for this weight; "
                         "keep the zero point in the epilogue (zero_point_qlinear)")
    return d.to(torch.int8)


def token_scale_epilogue(y: Tensor, x_scale: Tensor, bias: Tensor | None,
                         out_dtype: torch.dtype) -> Tensor:
    """The rest of the epilogue after ``int8_mm`` with a weight scale: ``y.float() * x_scale
    [M, 1] + bias`` in fp32, cast to ``out_dtype``."""
    out = y.to(torch.float32) * x_scale
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype)


def qlinear(xq: Tensor, x_scale: Tensor, wq: Tensor, w_scale: Tensor, w_zero: Tensor | None,
            bias: Tensor | None, group: int | None = None,
            out_dtype: torch.dtype = torch.float32,
            gemm: Callable[[Tensor, Tensor], Tensor] = int_gemm_ref) -> Tensor:
    """Quantized linear on quantized operands: integer GEMM(s) and the dequantizing epilogue.

    xq: [..., K] int8; x_scale: [..., 1] fp32; wq: [N, K] int8 (unpacked); w_scale: [N] fp32
    (``group=None``) or [N, K // group] fp32; w_zero: int32 of w_scale's shape, or None
    (symmetric); bias: [N] any float dtype or None. Returns [..., N] of ``out_dtype``.

    Order of operations (all float math in fp32; it defines the tolerance against a float64
    evaluation of ``(xq * x_scale) @ ((wq - zero) * w_scale).T + bias``):

    - per channel: ``acc = gemm(xq, wq)`` (int32), ``acc -= rowsum(xq) * zero``, then
      ``acc.float() * x_scale * w_scale + bias`` left to right (``dequantize_epilogue``);
    - grouped: for each group ``j`` in order, ``acc_j = gemm(xq[:, j], wq[:, j])`` (int32),
      ``acc_j -= rowsum(xq[:, j]) * zero[:, j]``, ``out += acc_j.float() * w_scale[:, j]``
      (out starting at 0); then ``out * x_scale + bias``.

    The integer part is exact. ``acc_j.float()`` is exact while |acc_j| < 2^24 (always for
    int8 x int4 with group <= 128). Each later fp32 operation rounds once, so with G groups the
    error is at most about ``(G + 3) * 2^-24 * (|xq| @ |deq(w)|.T * x_scale + |bias|)``, plus the
    final cast to ``out_dtype``.
    """
    k = xq.shape[-1]
    n = wq.shape[0]
    lead = xq.shape[:-1]
    xq2 = xq.reshape(-1, k)
    xs2 = x_scale.reshape(-1, 1)
    if group is None:
        acc = gemm(xq2, wq)
        rowsum = xq2.to(torch.int32).sum(dim=-1, keepdim=True) if w_zero is not None else None
        out = dequantize_epilogue(acc, xs2, w_scale, w_zero, rowsum, bias, out_dtype)
        return out.reshape(*lead, n)
    g = _check_group(group, k)
    out = None  # type: ignore[assignment]  # the first group's term replaces it
    for j in range(k // g):
        xj = xq2[:, j * g:(j + 1) * g]
        acc = gemm(xj, wq[:, j * g:(j + 1) * g])
        if w_zero is not None:
            acc = acc - xj.to(torch.int32).sum(dim=-1, keepdim=True) * w_zero[:, j]
        term = acc.to(torch.float32) * w_scale[:, j]
        out = term if out is None else out + term
    out = out * xs2
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype).reshape(*lead, n)


EPILOGUE_ACTIVATIONS = ("none", "gelu_tanh", "silu")


def epilogue_gate_rows(out_shape: Sequence[int], gate_shape: Sequence[int]) -> int:
    """How many consecutive rows of ``out`` flattened to ``[M, N]`` share one row of ``gate``
    flattened to ``[G, N]``, i.e. ``M // G``; raises ``ValueError`` for a gate the fused epilogue
    does not broadcast.

    Supported gate shapes (after left-padding with 1s to out's rank): out's leading dims up to
    some axis, then 1s, then N. That covers ``[N]`` (one gate for all rows), adaLN's ``[B, 1, N]``
    against ``[B, T, N]`` (one per sample), and out's own shape (one per row).
    """
    out_shape, gate_shape = tuple(out_shape), tuple(gate_shape)
    if not out_shape or not gate_shape or len(gate_shape) > len(out_shape) \
            or gate_shape[-1] != out_shape[-1]:
        raise ValueError(f"epilogue gate of shape {gate_shape} does not broadcast along the rows of "
                         f"an output of shape {out_shape} (its last dim must be N={out_shape[-1:]})")
    padded = (1,) * (len(out_shape) - len(gate_shape)) + gate_shape
    lead = padded[:-1]
    j = 0
    while j < len(lead) and lead[j] == out_shape[j] and lead[j] != 1:
        j += 1
    if any(d != 1 for d in lead[j:]):
        raise ValueError(f"epilogue gate of shape {gate_shape} does not broadcast along the rows of "
                         f"an output of shape {out_shape}: supported are [N], the output's leading "
                         f"dims then 1s then N (e.g. [B, 1, N] for [B, T, N]), or the output's shape")
    m = math.prod(out_shape[:-1])
    g = math.prod(out_shape[:j])
    return m // g if g else 1


def epilogue(y: Tensor, activation: str = "none", gate: Tensor | None = None,
             residual: Tensor | None = None) -> Tensor:
    """The pointwise tail a quantized linear can absorb: ``act(y) * gate + residual`` in fp32.

    y: [..., N] fp32 (``qlinear``'s output before the cast); activation: one of
    ``EPILOGUE_ACTIVATIONS`` (``gelu_tanh`` is ``gelu(approximate="tanh")``); gate: float,
    broadcast along y's rows (``epilogue_gate_rows``) or None; residual: float of y's shape or
    None. Returns fp32; the caller casts once to the output dtype, so a fused kernel rounds
    once where the unfused ops (each in the model's dtype) round after every step.
    """
    if activation not in EPILOGUE_ACTIVATIONS:
        raise ValueError(f"epilogue: activation={activation!r} (supported: {EPILOGUE_ACTIVATIONS})")
    if activation == "gelu_tanh":
        y = torch.nn.functional.gelu(y, approximate="tanh")
    elif activation == "silu":
        y = torch.nn.functional.silu(y)
    if gate is not None:
        epilogue_gate_rows(y.shape, gate.shape)
        y = y * gate.to(torch.float32)
    if residual is not None:
        if tuple(residual.shape) != tuple(y.shape):
            raise ValueError(f"epilogue: residual has shape {tuple(residual.shape)}, the output "
                             f"{tuple(y.shape)}")
        y = y + residual.to(torch.float32)
    return y


def w8a8_linear(x: Tensor, wq: Tensor, w_scale: Tensor, w_zero: Tensor | None,
                bias: Tensor | None, act_bits: int = 8,
                gemm: Callable[[Tensor, Tensor], Tensor] = int_gemm_ref) -> Tensor:
    """Quantized ``linear(x, w, bias)``: per-token activations, per-channel weights.

    x: [..., K] float; wq: [N, K] int8; w_scale: [N] fp32; w_zero: [N] int32 or None;
    bias: [N] or None. Returns [..., N] in x's dtype. ``gemm`` picks the integer GEMM.
    ``quantize_act`` (no balancing, dynamic) followed by ``qlinear`` (per channel).
    """
    xq, x_scale = quantize_act(x, None, [], None, act_bits)
    return qlinear(xq, x_scale, wq, w_scale, w_zero, bias, None, x.dtype, gemm)


def timestep_range(t: Tensor, bounds: Sequence[float]) -> Tensor:
    """The timestep range of each entry of ``t``: how many ``bounds`` lie strictly below it.

    t: any shape, any real dtype (diffusers passes int64 or fp32 timesteps); bounds: ascending
    interior boundaries, so range ``i`` holds ``bounds[i-1] < t <= bounds[i]`` (``Plan.range_of``).
    Returns int64 of t's shape. Compared in fp64 so that an integer timestep equal to a bound
    falls in the lower range whatever t's dtype.
    """
    b = torch.tensor([float(v) for v in bounds], dtype=torch.float64, device=t.device)
    return (t.detach().to(torch.float64).unsqueeze(-1) > b).sum(dim=-1)


def nsr_db(nsr: float) -> float:
    """A noise-to-signal ratio in dB of signal over noise: ``-10 log10(nsr)``; inf for 0, -inf for
    an infinite or NaN ratio."""
    return math.inf if nsr == 0 else (-10 * math.log10(nsr) if math.isfinite(nsr) else -math.inf)


def noise_to_signal(reference: Tensor, approx: Tensor) -> float:
    """``|ref - approx|^2 / |ref|^2`` in float64 (0 when they are equal, inf when only ref is 0)."""
    ref = reference.detach().to(torch.float64)
    err = (ref - approx.detach().to(torch.float64)).pow(2).sum().item()
    if err == 0:
        return 0.0
    sig = ref.pow(2).sum().item()
    return err / sig if sig > 0 else math.inf


def sqnr_db(reference: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(|ref|^2 / |ref - approx|^2)`` in dB."""
    nsr = noise_to_signal(reference, approx)
    if nsr == 0:
        return float("inf")
    return -10 * math.log10(nsr) if math.isfinite(nsr) else float("-inf")
