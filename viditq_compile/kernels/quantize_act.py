"""Triton activation quantization for ``viditq.quantize_act``: kernel, checked wrapper, reference.

- ``_quantize_rows_kernel``: one program per row of x flattened to ``[M, K]``. It multiplies the
  optional smoothing vector in, takes the row absmax, derives the scale, writes the int8 row and
  optionally the int32 row sum of the quantized values (asymmetric-weight GEMMs need it).
- ``quantize_act_triton``: checks arguments (``numerics.contracts.check_quantize_act_args``), applies the
  rotation in torch, allocates and launches.
- ``quantize_act_ref``: the reference, ``numerics.quantize_act`` (plus the row sum).

Numerics follow ``numerics.quantize_per_token`` / ``quantize_per_tensor`` step by step in fp32:
``a = x * smooth``; ``scale = max(absmax(a), SCALE_FLOOR) / qmax`` (dynamic) or
``max(static_scale, SCALE_FLOOR)`` (static); ``q = clamp(round_half_even(a / scale), qmin, qmax)``.
Both divisions use ``tl.math.div_rn`` (IEEE round-to-nearest, as torch's fp32 division) and the
rounding is implemented exactly (Triton has no round-half-to-even builtin), so q and scale equal
the reference bit for bit. A row holding NaN gets a NaN scale and one holding Inf an Inf scale
(as the reference); the q values of such a row are unspecified (float -> int8 of NaN).

Rotation: for 16-bit activations with dynamic scales and ``kron_factors`` orders that suit
tensor-core dots (``rotation_in_kernel``: DiT widths 1152 = 36 x 32, 3072 = 48 x 64, 4608 = 72 x 64,
12288 = 96 x 128, 15360 = 120 x 128), ``_quantize_rotated_row_kernel`` smooths, rotates (two dots on
the exact ±1 factors, the non-power-of-two order padded with zero rows) and quantizes one row in
registers, reading the activation once; like the reference it first multiplies the row by the
power of two ``numerics.rotation_prescale`` picks (so the ±1 sums cannot overflow 16 bits), and
the normalisation ``1/sqrt(K)`` and ``1/p`` go into the scale. Bit-exact under the interpreter;
on GPU the dot's summation order may move a rotated value across a 16-bit rounding, so q may
differ by one step on rare entries. Otherwise (fp32, static scales, small factors) the factors
are applied before the kernel with the reference's own torch code (``numerics.rotate_16bit`` /
``balance_activation``); smoothing then happens in torch before it, as the
reference order requires, and without a rotation it is fused into the kernel.

Blocking along K: the kernel makes two passes over its row in chunks of ``BLOCK_K`` (a power of
two, ``min(next_pow2(K), MAX_BLOCK_K)``, tails masked): pass 1 takes the absmax, pass 2 re-reads,
quantizes and stores. The second read of one row (at most 15360 * 4 bytes for DiT widths) hits
cache; capping ``BLOCK_K`` keeps the per-thread register tile small for any K.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from viditq_compile.config.capabilities import rotation_in_kernel  # noqa: F401  (re-exported: the route's rule)
from viditq_compile.kernels.launch import device_guard
from viditq_compile.numerics import quant as numerics
from viditq_compile.numerics.contracts import check_quantize_act_args
from viditq_compile.ops.schema import QUANTIZE_ACT

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_BLOCK_K = 2048
"""Largest K chunk one program holds at a time: K=1152 is one chunk, K=4608 three, 15360 eight."""


@triton.jit
def _max_propagate_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _round_half_even(v):
    """Round fp32 ``v`` to the nearest integer, ties to even (``torch.round``); exact for all v:
    ``v - floor(v)`` is exact in fp32, unlike the ``floor(v + 0.5)`` shortcut."""
    r = tl.floor(v)
    d = v - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, r + 1.0, r)


@triton.jit
def _load_balanced(x_row_ptr, smooth_ptr, offs, K, stride_xk, HAS_SMOOTH: tl.constexpr):
    """fp32 chunk ``x[row, offs] * smooth[offs]`` (0 past K)."""
    mask = offs < K
    a = tl.load(x_row_ptr + offs * stride_xk, mask=mask, other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        a = a * tl.load(smooth_ptr + offs, mask=mask, other=0.0)
    return a


@triton.jit
def _quantize_rows_kernel(
    x_ptr, smooth_ptr, static_scale_ptr, q_ptr, scale_ptr, rowsum_ptr,
    K, stride_xm, stride_xk, stride_qm,
    QMIN: tl.constexpr, QMAX: tl.constexpr, SCALE_FLOOR: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, STATIC_SCALE: tl.constexpr, WITH_ROWSUM: tl.constexpr,
    PACK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Quantize one row per program (grid ``(M,)``).

    x: [M, K] fp32/bf16/fp16, strides (stride_xm, stride_xk); smooth: [K] fp32 (read when
    HAS_SMOOTH); static_scale: 0-d fp32 (read when STATIC_SCALE). Writes q: [M, K] int8 with
    row stride stride_qm (or, with PACK, [M, K/2] uint8 holding two 4-bit values per byte, low
    nibble first: ``kernels.packing`` layout), scale: [M] fp32, rowsum: [M] int32 (when WITH_ROWSUM).
    """
    row = tl.program_id(0).to(tl.int64)
    x_row_ptr = x_ptr + row * stride_xm
    q_row_ptr = q_ptr + row * stride_qm
    offs0 = tl.arange(0, BLOCK_K)

    if STATIC_SCALE:
        scale = _max_propagate_nan(tl.load(static_scale_ptr).to(tl.float32), SCALE_FLOOR)
    else:
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = _load_balanced(x_row_ptr, smooth_ptr, k0 + offs0, K, stride_xk, HAS_SMOOTH)
            amax = _max_propagate_nan(amax, tl.abs(a))
        row_amax = tl.reduce(amax, 0, _max_propagate_nan)
        scale = tl.math.div_rn(_max_propagate_nan(row_amax, SCALE_FLOOR), QMAX + 0.0)
    tl.store(scale_ptr + row, scale)

    rowsum = tl.zeros([BLOCK_K], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + offs0
        mask = offs < K
        a = _load_balanced(x_row_ptr, smooth_ptr, offs, K, stride_xk, HAS_SMOOTH)
        v = tl.math.div_rn(a, scale)
        # Clamping to [QMIN - 1, QMAX + 1] first keeps v small for the rounding and changes no
        # result: rounding is monotone and the bounds are integers.
        v = tl.minimum(tl.maximum(v, QMIN - 1.0), QMAX + 1.0)
        v = tl.minimum(tl.maximum(_round_half_even(v), QMIN + 0.0), QMAX + 0.0)
        q = v.to(tl.int8)
        if PACK:
            lo, hi = tl.split(tl.reshape(q.to(tl.int32), (BLOCK_K // 2, 2)))
            packed = ((lo & 0xF) | ((hi & 0xF) << 4)).to(tl.uint8)
            offs_h = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            tl.store(q_row_ptr + offs_h, packed, mask=offs_h < K // 2)
        else:
            tl.store(q_row_ptr + offs, q, mask=mask)
        if WITH_ROWSUM:
            rowsum += tl.where(mask, q.to(tl.int32), 0)
    if WITH_ROWSUM:
        tl.store(rowsum_ptr + row, tl.sum(rowsum, axis=0))


@triton.jit
def _round_16(y, dtype: tl.constexpr, EMULATE: tl.constexpr):
    """fp32 ``y`` rounded to ``dtype`` (bf16/fp16), as fp32. ``EMULATE`` (the interpreter, whose
    fp32 -> bf16 cast truncates) rounds to nearest even on the bits instead."""
    if EMULATE and dtype == tl.bfloat16:
        u = y.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.to(tl.float32, bitcast=True)
    return y.to(dtype).to(tl.float32)


@triton.jit
def _quantize_rotated_row_kernel(
    x_ptr, smooth_ptr, f0_ptr, f1_ptr, q_ptr, scale_ptr, rowsum_ptr,
    stride_xm, stride_xk, stride_qm,
    QMIN: tl.constexpr, QMAX: tl.constexpr, SCALE_FLOOR: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, WITH_ROWSUM: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    HEADROOM: tl.constexpr, A: tl.constexpr, A_PAD: tl.constexpr, B: tl.constexpr,
):
    """Smooth, rotate and quantize one 16-bit row per program (grid ``(M,)``), the rotation in
    registers: the row viewed as ``X [A, B]`` becomes ``F0ᵀ X F1`` (``x @ kron(F0, F1)``), two
    tensor-core dots on the ±1 factors with fp32 accumulation, each product rounded to x's dtype as
    the reference's 16-bit GEMMs round it. ``A`` (any order, padded to the power of two ``A_PAD``
    with zero rows) and ``B`` (a power of two) are ``kron_factors``' orders; f0: [A, A], f1:
    [B, B] of x's dtype holding ±1. Before the dots the smoothed row is multiplied by the power of
    two ``p`` of ``numerics.rotation_prescale`` (HEADROOM: ``numerics.rotation_headroom``), so no
    16-bit product overflows; the scale is divided by it again (exact). Writes q: [M, K] int8,
    scale: [M] fp32 (without the factors' ``1/sqrt(A·B)``, which the wrapper multiplies in),
    rowsum: [M] int32 (WITH_ROWSUM).
    DOT_IN_FP32 (the interpreter, whose bf16 dot and bf16 cast are wrong) widens the dot operands
    to fp32 first (the same exact ±1 products and fp32 accumulation) and rounds on the bits.
    """
    row = tl.program_id(0).to(tl.int64)
    offs_a = tl.arange(0, A_PAD)
    offs_b = tl.arange(0, B)
    mask_a = offs_a < A
    idx = offs_a[:, None] * B + offs_b[None, :]
    dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_xm + idx * stride_xk, mask=mask_a[:, None], other=0.0)
    x = x.to(tl.float32)
    if HAS_SMOOTH:
        sm = _round_16(tl.load(smooth_ptr + idx, mask=mask_a[:, None], other=0.0), dtype, DOT_IN_FP32)
        x = _round_16(x * sm, dtype, DOT_IN_FP32)
    # numerics.rotation_prescale on the fp32 bits of the row's absmax (padded rows are 0)
    amax_x = tl.reduce(tl.reduce(tl.abs(x), 1, _max_propagate_nan), 0, _max_propagate_nan)
    biased = (amax_x.to(tl.int32, bitcast=True) >> 23) & 0xFF
    shift = tl.where(biased == 255, 0, tl.maximum(biased - (126 + HEADROOM), 0))
    inv_p = ((127 + shift) << 23).to(tl.float32, bitcast=True)  # 1 / p, exact
    x = _round_16(x * ((127 - shift) << 23).to(tl.float32, bitcast=True), dtype, DOT_IN_FP32)
    f1 = tl.load(f1_ptr + offs_b[:, None] * B + offs_b[None, :])
    if DOT_IN_FP32:
        x = x.to(tl.float32)
        f1 = f1.to(tl.float32)
    else:
        x = x.to(dtype)
    y = _round_16(tl.dot(x, f1, out_dtype=tl.float32), dtype, DOT_IN_FP32)
    # f0t[i, j] = F0[j, i], zero outside [A, A]: the padded rows of the result stay 0
    f0t = tl.load(f0_ptr + offs_a[None, :] * A + offs_a[:, None], mask=mask_a[:, None] & mask_a[None, :],
                  other=0.0)
    if DOT_IN_FP32:
        f0t = f0t.to(tl.float32)
    else:
        y = y.to(dtype)
    y = _round_16(tl.dot(f0t, y, out_dtype=tl.float32), dtype, DOT_IN_FP32)

    amax = tl.reduce(tl.reduce(tl.abs(y), 1, _max_propagate_nan), 0, _max_propagate_nan)
    scale = tl.math.div_rn(_max_propagate_nan(amax, SCALE_FLOOR), QMAX + 0.0)
    tl.store(scale_ptr + row, scale * inv_p)
    v = tl.math.div_rn(y, scale)
    v = tl.minimum(tl.maximum(v, QMIN - 1.0), QMAX + 1.0)
    v = tl.minimum(tl.maximum(_round_half_even(v), QMIN + 0.0), QMAX + 0.0)
    q = v.to(tl.int8)
    tl.store(q_ptr + row * stride_qm + idx, q, mask=mask_a[:, None])
    if WITH_ROWSUM:
        tl.store(rowsum_ptr + row, tl.sum(tl.sum(tl.where(mask_a[:, None], q.to(tl.int32), 0), axis=1), axis=0))


def _block_k(k: int, block_k: int | None) -> int:
    if block_k is None:
        return min(triton.next_power_of_2(k), MAX_BLOCK_K)
    if block_k <= 0 or block_k & (block_k - 1):
        raise ValueError(f"quantize_act_triton: block_k must be a power of two, got {block_k}")
    return block_k


def quantize_act_triton(x: Tensor, smooth: Tensor | None, rotation: list[Tensor],
                        static_scale: Tensor | None, act_bits: int = 8, with_rowsum: bool = False,
                        block_k: int | None = None, pack: bool = False) -> tuple[Tensor, ...]:
    """Balance and quantize an activation with the Triton kernel (``numerics.quantize_act``).

    x: [..., K] fp32/bf16/fp16, any strides; smooth: [K] fp32 or None; rotation: square fp32
    ``kron_factors``-style factors whose orders multiply to K, or ``[]``; static_scale: 0-d fp32
    (static per-tensor) or None (dynamic per token); act_bits in ``numerics.SUPPORTED_ACT_BITS``
    (4-bit values are stored in int8). All tensors on one device (CUDA, or CPU under
    ``TRITON_INTERPRET=1``). ``block_k``: K chunk of the kernel, a power of two (default
    ``min(next_pow2(K), MAX_BLOCK_K)``). ``pack``: with act_bits=4 and K even, store q packed two
    values per byte (``kernels.packing.pack_int4`` layout, uint8 [..., K/2]): half the bytes for a
    W4A4 GEMM (``qlinear_triton(..., packed_act=True)``) to read.

    Returns q: [..., K] int8 contiguous (uint8 [..., K/2] with ``pack``), scale: [..., 1] fp32, and with ``with_rowsum``
    rowsum: [..., 1] int32 (``q.sum(-1)``).
    """
    check_quantize_act_args(x, smooth, rotation, static_scale, act_bits)
    k = x.shape[-1]
    if k == 0:
        raise ValueError(f"{QUANTIZE_ACT.display}: x must have K >= 1")
    others = [t for t in (smooth, static_scale, *rotation) if t is not None]
    if any(t.device != x.device for t in others):
        raise ValueError(f"{QUANTIZE_ACT.display}: all tensors must be on x's device {x.device}, got "
                         f"{[str(t.device) for t in others]}")
    if pack and (act_bits != 4 or k % 2):
        raise ValueError(f"quantize_act_triton: pack=True needs act_bits=4 and an even K, got "
                         f"act_bits={act_bits}, K={k}")
    qmin, qmax = numerics.qrange(act_bits)
    bk = _block_k(k, block_k)
    if pack and bk < 2:
        raise ValueError(f"quantize_act_triton: pack=True needs block_k >= 2, got {bk}")

    if rotation and not pack and block_k is None and rotation_in_kernel(x, rotation, static_scale):
        return _quantize_rotated(x, smooth, rotation, act_bits, with_rowsum)
    # Rotation in torch with the reference's own code (numerics.quantize_act's two routes).
    unscale = None
    if rotation:
        if static_scale is None and x.dtype in (torch.bfloat16, torch.float16):
            x, unscale = numerics.rotate_16bit(x, smooth, rotation)
        else:
            x = numerics.balance_activation(x, smooth, rotation)
        smooth = None

    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    q = torch.empty((m, k // 2), dtype=torch.uint8, device=x.device) if pack else \
        torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    rowsum = torch.empty((m,), dtype=torch.int32, device=x.device) if with_rowsum else scale
    if m > 0:
        with device_guard(x.device):
            _quantize_rows_kernel[(m,)](
                x2, smooth if smooth is not None else x2, static_scale if static_scale is not None else x2,
                q, scale, rowsum,
                k, x2.stride(0), x2.stride(1), q.stride(0),
                QMIN=qmin, QMAX=qmax, SCALE_FLOOR=numerics.SCALE_FLOOR,
                HAS_SMOOTH=smooth is not None, STATIC_SCALE=static_scale is not None,
                WITH_ROWSUM=with_rowsum, PACK=pack, BLOCK_K=bk, num_warps=min(max(bk // 256, 1), 8),
            )
    scale = scale.reshape(*lead, 1)
    if unscale is not None:
        scale = scale * unscale  # the rotation ran prescaled, on the unnormalised ±1 factors
    out = (q.reshape(*lead, q.shape[-1]), scale)
    return (*out, rowsum.reshape(*lead, 1)) if with_rowsum else out


def _quantize_rotated(x: Tensor, smooth: Tensor | None, rotation: list[Tensor], act_bits: int,
                      with_rowsum: bool) -> tuple[Tensor, ...]:
    k = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    a, b = (int(r.shape[0]) for r in rotation)
    signs = [torch.sign(r).to(x.dtype).contiguous() for r in rotation]  # exact ±1 in 16 bits
    norm = torch.ones((), dtype=torch.float32, device=x.device)
    for r in rotation:
        norm = norm * r[0, 0].abs().to(torch.float32)
    qmin, qmax = numerics.qrange(act_bits)
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    rowsum = torch.empty((m,), dtype=torch.int32, device=x.device) if with_rowsum else scale
    a_pad = triton.next_power_of_2(a)
    if m > 0:
        with device_guard(x.device):
            _quantize_rotated_row_kernel[(m,)](
                x2, smooth if smooth is not None else x2, signs[0], signs[1], q, scale, rowsum,
                x2.stride(0), x2.stride(1), q.stride(0),
                QMIN=qmin, QMAX=qmax, SCALE_FLOOR=numerics.SCALE_FLOOR,
                HAS_SMOOTH=smooth is not None, WITH_ROWSUM=with_rowsum, DOT_IN_FP32=INTERPRET,
                HEADROOM=numerics.rotation_headroom(x.dtype, k), A=a, A_PAD=a_pad, B=b,
                num_warps=8 if a_pad * b >= 8192 else 4,
            )
    out = (q.reshape(*lead, k), (scale * norm).reshape(*lead, 1))
    return (*out, rowsum.reshape(*lead, 1)) if with_rowsum else out


def quantize_act_ref(x: Tensor, smooth: Tensor | None, rotation: list[Tensor],
                     static_scale: Tensor | None, act_bits: int = 8,
                     with_rowsum: bool = False) -> tuple[Tensor, ...]:
    """Pure-torch reference of ``quantize_act_triton``: ``numerics.quantize_act`` plus the row
    sum ``q.sum(-1, keepdim=True)`` as int32."""
    q, scale = numerics.quantize_act(x, smooth, rotation, static_scale, act_bits)
    if with_rowsum:
        return q, scale, q.sum(-1, keepdim=True, dtype=torch.int32)
    return q, scale
