"""Triton GEMM for ``viditq.qlinear`` / ``qlinear_fused``: int8 (or packed int4) activations x int8 /
packed-int4 weights, fused epilogue.

``qlinear_triton`` computes what ``numerics.qlinear`` then ``numerics.epilogue`` compute (the
reference, side by side):

- per channel (``group_size=0``): ``acc = xq @ wq.T`` in int32 (``tl.dot(int8, int8) -> int32``),
  ``acc -= rowsum(xq) * zero`` (asymmetric weights; the row sums come from ``activation_rowsums``,
  one small kernel per call, so that N-tiles do not each sum the same rows again), then
  ``acc.float() * x_scale * w_scale + bias`` left to right in fp32;
- grouped (``group_size=g``): per group ``j`` in order an int32 accumulator ``acc_j`` with its own
  zero correction (rowsum over the group's K), ``out += acc_j.float() * w_scale[:, j]`` into an fp32
  accumulator at the group's end, then ``out * x_scale + bias``;
- then, in fp32, an optional activation (``"gelu_tanh"`` or ``"silu"``, after the bias), ``* gate``
  (broadcast along rows: ``[N]``, ``[B, 1, N]`` for ``[B, T, N]``, or per row) and ``+ residual``,
  and one cast to ``out_dtype`` (fp32, bf16 or fp16).

With ``packed_act`` the activations arrive packed two per byte (W4A4) and are unpacked in
registers like the weights.

4-bit weights stay packed two per byte and are unpacked in registers, so the dot runs on int8
tensor cores. Per channel and in groups that are multiples of 128 the kernel reads them in the split
layout (``split_int4``: per 128-wide K chunk, byte j holds K index j in its low nibble and j + 64 in
its high one), made once per weight tensor when the CUDA op first sees it (``split_int4_cached``):
each K step masks out ``16 x`` either half of the chunk as a k-contiguous int8 tile (four bytes per
register op) and the int32 sum is shifted back by 4 at the end (exact while K <=
``capabilities.INT4_SPLIT_MAX_K``). Other groups read ``numerics.packing``'s layout (byte j: K
indices 2j, 2j+1) with sign-extending shifts and an interleave. The program order is grouped
(``GROUP_M`` M-tiles per band, ``_tile``) for L2 reuse, and zero points' activation row sums come
from ``activation_rowsums``, once per call.

Tolerances (what ``tests/kernels/test_int_gemm.py`` checks):

- the integer part is exact: with unit scales, no bias and fp32 output the result equals the
  reference exactly (both are the fp32 image of the same int32);
- fp32 output: the epilogue does the reference's fp32 operations in the reference's order. Under
  ``TRITON_INTERPRET=1`` (numpy, no FMA contraction) it is bit-exact for per-channel and grouped
  weights (measured: max |diff| = 0). On GPU the compiler may contract ``out + acc_j * s`` into an
  FMA (one rounding instead of two), so grouped fp32 output may differ by a few ulps per group;
- bf16/fp16 output: the cast of the same fp32 value, so within one rounding of the output dtype
  (bit-exact when the fp32 value is);
- gate and residual: the reference's fp32 multiply and add, bit-exact under the interpreter; against
  the unfused ops in a 16-bit model (which round after each op) the fused tail is closer to exact;
- activations: ``gelu_tanh`` uses ``tanh(|u|) = (1 - e) / (1 + e)`` with ``e = exp(-2|u|)``, and
  ``silu`` is ``x * sigmoid(x)`` from ``exp(-|x|)`` (neither overflows); measured max |diff| 2.4e-7
  on pre-activations up to |3| (tested with rtol = atol = 2e-6, fp32) against
  ``torch.nn.functional.gelu(approximate="tanh")`` / ``silu`` of the reference's fp32 output.

Limits: K must be a multiple of 16 (at most ``INT4_SPLIT_MAX_K`` for int4 weights in the split
layout) and, when grouped, the group a multiple of 32 dividing K
(``supports`` says whether a shape is taken; ``qlinear_triton`` raises ``ValueError`` naming the
rule otherwise). CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1`` set before this module is
imported (then one fixed block config is used instead of autotuning; slow, for tests only).
"""

from __future__ import annotations

import math
import os
import weakref

import torch
import triton
import triton.language as tl
from torch import Tensor

from viditq_compile.config.capabilities import (
    INT4_SPLIT_CHUNK,
    K_MULTIPLE,  # noqa: F401
    int4_split_applies,
)
from viditq_compile.config.capabilities import unsupported_reason as _unsupported_reason
from viditq_compile.kernels.epilogue import store_epilogue, tail_operands
from viditq_compile.kernels.launch import device_guard
from viditq_compile.numerics import quant as numerics
from viditq_compile.numerics.contracts import check_qlinear_fused_args
from viditq_compile.numerics.packing import pack_int4_values, unpack_int4

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE = os.environ.get("VIDITQ_AUTOTUNE", "1") != "0"
"""``VIDITQ_AUTOTUNE=0`` (read at import): launch the first config the pruning keeps instead of
autotuning over all of them, one compile per specialization (tests on a GPU: ``make gpu-check``
runs the CUDA tests so)."""

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), for DiT shapes: M (tokens x batch) 256..65536,
# K/N in {1152, 3072, 4608, 12288, 15360} (all multiples of 128). Large M wants the 128x256 / 256x128
# tiles; M <= 1024 the 64-wide ones so that enough programs fill the SMs. BLOCK_K = 128 halves the
# K steps' fixed cost (pointer updates, masks, barriers, the wgmma waits): measured on sm_90 (triton
# 3.9, ``scripts/aot_stats.py``) 128x256x128 issues 3472 MACs per SASS instruction against 2819 for
# 128x256x64 (W8A8), and 64x256x128 is the best grouped tile; 144 KiB shared at 3 stages (sm_90 has
# 227, and sm_80 prunes the 128-register accumulators).
QLINEAR_CONFIGS = [
    (128, 256, 128, 8, 3),
    (256, 128, 128, 8, 3),
    (64, 256, 128, 8, 3),
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (128, 128, 128, 8, 3),
    (128, 128, 64, 4, 4),
    (64, 256, 64, 4, 4),
    (128, 64, 128, 4, 4),
    (64, 128, 128, 4, 4),
    (64, 64, 128, 4, 4),
]
GROUP_M = 8
"""M-tiles per band of the grouped program order (``_tile``): 8 bands of 128 rows share each weight
column's tiles in L2 (the tutorial's choice)."""
# Under TRITON_INTERPRET=1 (CPU tests): one config, big blocks (the interpreter's cost is per program).
INTERPRET_CONFIG = (32, 64, 32)

ACTIVATIONS = numerics.EPILOGUE_ACTIVATIONS
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # fp64: exact cast of fp32


@triton.jit
def _nibbles_x16(p, UNPACK_ASM: tl.constexpr):
    """16 x the low and the high signed nibble of each int8 of ``p``, as int8 (16 x [-8, 7] =
    [-128, 112], exact): ``(p << 4) & 0xF0`` and ``p & 0xF0``. With UNPACK_ASM, on four bytes per
    32-bit register at once (``shl.b32`` + ``and.b32`` and one ``and.b32``: the bits a byte's high
    nibble shifts into its neighbour are masked off); else the same per byte (the interpreter)."""
    if UNPACK_ASM:
        lo = tl.inline_asm_elementwise("{ .reg .b32 t; shl.b32 t, $1, 4; and.b32 $0, t, 0xF0F0F0F0; }", "=r,r",
                                       [p], dtype=tl.int8, is_pure=True, pack=4)
        hi = tl.inline_asm_elementwise("and.b32 $0, $1, 0xF0F0F0F0;", "=r,r", [p], dtype=tl.int8,
                                       is_pure=True, pack=4)
    else:
        lo = (p << 4) & -16
        hi = p & -16
    return lo, hi


@triton.jit
def _act_half(x_ptrs, mask_m, offs, k_left, ACT_PACKED: tl.constexpr, BLOCK_M: tl.constexpr,
              HALF: tl.constexpr):
    """The [BLOCK_M, HALF] int8 activation tile at x_ptrs (HALF/2 bytes unpacked when ACT_PACKED),
    masked to ``k_left`` K columns (``offs``: the tile's column, or byte, offsets)."""
    if ACT_PACKED:
        pa = tl.load(x_ptrs, mask=mask_m[:, None] & (offs < k_left // 2)[None, :], other=0)
        pa = pa.to(tl.int8, bitcast=True)
        return tl.reshape(tl.join((pa << 4) >> 4, pa >> 4), (BLOCK_M, HALF))
    else:
        return tl.load(x_ptrs, mask=mask_m[:, None] & (offs < k_left)[None, :], other=0)


@triton.jit
def _split_step(acc, x_ptrs, w_ptrs, mask_m, mask_n, offs_kx, k_left, stride_xk, stride_wk,
                ACT_PACKED: tl.constexpr, UNPACK_ASM: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """One BLOCK_K step on int4 weights in the split layout (``split_int4``; BLOCK_K = its chunk):
    the [BLOCK_K/2, BLOCK_N] byte tile gives, one mask each, 16 x the chunk's first half (low
    nibbles) and second half (high nibbles), each a k-contiguous int8 dot operand, against the
    activations' two halves: acc gains 16 x the int32 product (the caller shifts it back). The
    weights are padded to whole chunks (no K mask); the activations are masked to ``k_left``."""
    tl.static_assert(BLOCK_K == 128, "the split int4 layout steps K by its 128-wide chunk")
    HALF: tl.constexpr = BLOCK_K // 2
    STEP: tl.constexpr = HALF // 2 if ACT_PACKED else HALF  # x elements (bytes) per half
    a_lo = _act_half(x_ptrs, mask_m, offs_kx, k_left, ACT_PACKED, BLOCK_M, HALF)
    a_hi = _act_half(x_ptrs + STEP * stride_xk, mask_m, offs_kx + STEP, k_left, ACT_PACKED, BLOCK_M, HALF)
    p = tl.load(w_ptrs, mask=mask_n[None, :], other=0).to(tl.int8, bitcast=True)
    lo, hi = _nibbles_x16(p, UNPACK_ASM)
    acc += tl.dot(a_lo, lo, out_dtype=tl.int32)
    acc += tl.dot(a_hi, hi, out_dtype=tl.int32)
    return acc, x_ptrs + 2 * STEP * stride_xk, w_ptrs + HALF * stride_wk


@triton.jit
def _dot_step(acc, x_ptrs, w_ptrs, mask_m, mask_n, offs_k, offs_kh, k_left, stride_xk, stride_wk,
              WEIGHT_BITS: tl.constexpr, ACT_PACKED: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """One BLOCK_K step: load the activation tile (packed int4 unpacked in registers when
    ACT_PACKED) and the weight tile (likewise for 4-bit weights), low nibble first along K,
    masked to the ``k_left`` columns left; accumulate the int32 product; advance both pointers."""
    if ACT_PACKED:
        pa = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_kh < k_left // 2)[None, :], other=0)
        pa = pa.to(tl.int8, bitcast=True)
        a = tl.reshape(tl.join((pa << 4) >> 4, pa >> 4), (BLOCK_M, BLOCK_K))  # [BM, BK/2, 2] -> [BM, BK]
        x_ptrs += (BLOCK_K // 2) * stride_xk
    else:
        a = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k < k_left)[None, :], other=0)
        x_ptrs += BLOCK_K * stride_xk
    if WEIGHT_BITS == 4:
        p = tl.load(w_ptrs, mask=(offs_kh < k_left // 2)[:, None] & mask_n[None, :], other=0)
        p = p.to(tl.int8, bitcast=True)
        b = tl.reshape(tl.permute(tl.join((p << 4) >> 4, p >> 4), (0, 2, 1)), (BLOCK_K, BLOCK_N))
        w_ptrs += (BLOCK_K // 2) * stride_wk
    else:
        b = tl.load(w_ptrs, mask=(offs_k < k_left)[:, None] & mask_n[None, :], other=0)
        w_ptrs += BLOCK_K * stride_wk
    acc += tl.dot(a, b, out_dtype=tl.int32)
    return acc, x_ptrs, w_ptrs


@triton.jit
def _tile(pid, M, N, GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` in grouped order: programs ``GROUP_M * n_tiles`` apart
    start a new band of ``GROUP_M`` M-tiles (the last band may be narrower), and inside a band the
    M index runs fastest."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    in_band = GROUP_M * num_pid_n
    first_m = (pid // in_band) * GROUP_M
    band_m = min(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % in_band) % band_m, (pid % in_band) // band_m


@triton.jit
def _qlinear_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, wz_ptr, rs_ptr, b_ptr, g_ptr, r_ptr, out_ptr,
    M, N, K, M_BUCKET, ROWS_PER_GATE,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_rsm, stride_b, stride_gm, stride_gn,
    stride_rm, stride_rn, stride_om, stride_on,
    WEIGHT_BITS: tl.constexpr, ACT_PACKED: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
    W_SPLIT: tl.constexpr, UNPACK_ASM: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_GATE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[M, N] = epilogue(x[M, K] int8 @ w[N, K].T), one [BLOCK_M, BLOCK_N] tile per program.

    A 1-D grid of ``cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N)`` programs in grouped order (the Triton
    matmul tutorial's L2 swizzle): consecutive programs walk ``GROUP_M`` M-tiles down one N column
    before the next, so the weight tiles of a column and the activation rows of the group stay in L2
    while the programs running at once read them (``_tile``).

    x: [M, K] int8 or [M, K/2] uint8 packed int4 (ACT_PACKED); xs: [M] fp32; w: [N, K] int8
    (WEIGHT_BITS=8) or [N, K/2] uint8 packed int4 (WEIGHT_BITS=4, stride_wk counts bytes); ws: [N]
    fp32 (GROUP=0) or [N, K/GROUP] fp32, wz: int32 of ws's shape and strides (HAS_ZERO); rs: [M, 1]
    (GROUP=0) or [M, K/GROUP] int32, the activations' row sums per group (``activation_rowsums``,
    HAS_ZERO: computed once per call, not by every N-tile); b: [N]
    float, stride stride_b (HAS_BIAS); g: [M / ROWS_PER_GATE, N] float, row m reads gate row m // ROWS_PER_GATE
    (HAS_GATE); r: [M, N] float (HAS_RESIDUAL); out: [M, N] fp32/bf16/fp16.
    Epilogue after the dequantization, in fp32: bias, ACTIVATION, * gate, + residual, one cast.
    GROUP > 0 needs BLOCK_K | GROUP | K; GROUP = 0 masks the K tail.
    Row offsets (``m * stride_xm``, ``n * stride_wn``, ``m * stride_om``, ...) are int64: M·K, N·K
    or M·N may pass 2^31 (a 65536-token batch at K = 15360 does); offsets inside a row stay int32.
    """
    pid_m, pid_n = _tile(tl.program_id(0), M, N, GROUP_M, BLOCK_M, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows_m = offs_m.to(tl.int64)  # row offsets in int64 (M·K, N·K, M·N may pass 2^31)
    rows_n = offs_n.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_kh = tl.arange(0, BLOCK_K // 2)
    offs_kq = tl.arange(0, BLOCK_K // 4)
    if W_SPLIT:
        offs_kx = offs_kq if ACT_PACKED else offs_kh  # one half of the step's activations
        x_ptrs = x_ptr + rows_m[:, None] * stride_xm + offs_kx[None, :] * stride_xk
    elif ACT_PACKED:
        x_ptrs = x_ptr + rows_m[:, None] * stride_xm + offs_kh[None, :] * stride_xk
    else:
        x_ptrs = x_ptr + rows_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    if WEIGHT_BITS == 4:
        w_ptrs = w_ptr + offs_kh[:, None] * stride_wk + rows_n[None, :] * stride_wn
    else:
        w_ptrs = w_ptr + offs_k[:, None] * stride_wk + rows_n[None, :] * stride_wn

    if GROUP == 0:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            if W_SPLIT:
                acc, x_ptrs, w_ptrs = _split_step(acc, x_ptrs, w_ptrs, mask_m, mask_n, offs_kx, K - k0, stride_xk,
                                                  stride_wk, ACT_PACKED, UNPACK_ASM, BLOCK_M, BLOCK_K)
            else:
                acc, x_ptrs, w_ptrs = _dot_step(acc, x_ptrs, w_ptrs, mask_m, mask_n, offs_k, offs_kh, K - k0,
                                                stride_xk, stride_wk, WEIGHT_BITS, ACT_PACKED, BLOCK_M, BLOCK_K,
                                                BLOCK_N)
        if W_SPLIT:
            acc = acc >> 4  # exact: every term is 16 x an int4 x int8 product (INT4_SPLIT_MAX_K)
        if HAS_ZERO:
            rowsum = tl.load(rs_ptr + rows_m * stride_rsm, mask=mask_m, other=0)
            zero = tl.load(wz_ptr + offs_n * stride_sn, mask=mask_n, other=0)
            acc -= rowsum[:, None] * zero[None, :]
        xs = tl.load(xs_ptr + offs_m, mask=mask_m, other=0.0)
        ws = tl.load(ws_ptr + offs_n * stride_sn, mask=mask_n, other=0.0)
        out = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    else:
        out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g in range(0, K // GROUP):
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            for _ in range(0, GROUP // BLOCK_K):
                # BLOCK_K divides GROUP divides K: no K tail to mask
                if W_SPLIT:
                    acc, x_ptrs, w_ptrs = _split_step(acc, x_ptrs, w_ptrs, mask_m, mask_n, offs_kx, BLOCK_K,
                                                      stride_xk, stride_wk, ACT_PACKED, UNPACK_ASM, BLOCK_M,
                                                      BLOCK_K)
                else:
                    acc, x_ptrs, w_ptrs = _dot_step(acc, x_ptrs, w_ptrs, mask_m, mask_n, offs_k, offs_kh, BLOCK_K,
                                                    stride_xk, stride_wk, WEIGHT_BITS, ACT_PACKED, BLOCK_M,
                                                    BLOCK_K, BLOCK_N)
            if W_SPLIT:
                acc = acc >> 4
            if HAS_ZERO:
                rowsum = tl.load(rs_ptr + rows_m * stride_rsm + g, mask=mask_m, other=0)
                zero = tl.load(wz_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0)
                acc -= rowsum[:, None] * zero[None, :]
            ws = tl.load(ws_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0.0)
            out += acc.to(tl.float32) * ws[None, :]
        xs = tl.load(xs_ptr + offs_m, mask=mask_m, other=0.0)
        out = out * xs[:, None]

    store_epilogue(out, offs_m, offs_n, mask_m, mask_n, b_ptr, g_ptr, r_ptr, out_ptr, ROWS_PER_GATE, stride_b,
                   stride_gm, stride_gn, stride_rm, stride_rn, stride_om, stride_on, HAS_BIAS, ACTIVATION, HAS_GATE,
                   HAS_RESIDUAL)


@triton.jit
def _rowsum_kernel(x_ptr, out_ptr, SEG, stride_xm, stride_xk, stride_om,
                   ACT_PACKED: tl.constexpr, BLOCK: tl.constexpr):
    """out[m, s] = sum(x[m, s*SEG : (s+1)*SEG]) in int32, one (row, segment) per program; x int8,
    or uint8 packed two int4 per byte (ACT_PACKED: SEG/2 bytes, both nibbles sign-extended)."""
    row = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    if ACT_PACKED:
        n = SEG // 2
    else:
        n = SEG
    base = x_ptr + row * stride_xm + (seg * n).to(tl.int64) * stride_xk
    for c0 in range(0, n, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        v = tl.load(base + offs * stride_xk, mask=offs < n, other=0)
        if ACT_PACKED:
            p = v.to(tl.int8, bitcast=True)
            acc += ((p << 4) >> 4).to(tl.int32) + (p >> 4).to(tl.int32)
        else:
            acc += v.to(tl.int32)
    tl.store(out_ptr + row * stride_om + seg, tl.sum(acc, axis=0))


def activation_rowsums(x2: Tensor, seg: int, packed: bool = False) -> Tensor:
    """The int32 sums of the activations' rows over consecutive ``seg``-wide K segments: [M, K/seg]
    (``seg = K``: [M, 1]; ``seg = group_size``: one per weight group), what the zero-point
    correction ``acc -= rowsum * zero`` needs. x2: [M, K] int8, or [M, K/2] uint8 packed int4
    (``packed``; ``kernels.packing`` layout, both nibbles signed). One Triton launch, exact (integer
    sums, |sum| <= 128 * K < 2^31). Raises ``ValueError`` for a bad operand."""
    if x2.dim() != 2 or x2.dtype != (torch.uint8 if packed else torch.int8):
        raise ValueError(f"activation_rowsums: x2 must be 2-D {'uint8 (packed)' if packed else 'int8'}, "
                         f"got {x2.dtype} {tuple(x2.shape)}")
    k = x2.shape[1] * (2 if packed else 1)
    if seg < 1 or k % seg or (packed and seg % 2):
        raise ValueError(f"activation_rowsums: seg={seg} must be a positive{' even' if packed else ''} "
                         f"divisor of K={k}")
    if x2.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"activation_rowsums: needs a CUDA tensor (got {x2.device}) or TRITON_INTERPRET=1")
    m = x2.shape[0]
    out = torch.empty((m, k // seg), dtype=torch.int32, device=x2.device)
    if m == 0 or k == 0:
        return out.zero_()
    with device_guard(x2.device):
        _rowsum_kernel[(m, k // seg)](x2, out, seg, x2.stride(0), x2.stride(1), out.stride(0),
                                      ACT_PACKED=packed, **rowsum_launch_config(seg, packed))
    return out


def rowsum_launch_config(seg: int, packed: bool) -> dict:
    """``BLOCK`` (elements a program sums per step, at most 1024) and ``num_warps`` of
    ``_rowsum_kernel`` for ``seg``-wide segments (shared with ``kernels.aot``)."""
    block = min(triton.next_power_of_2(seg // 2 if packed else seg), 1024)
    return dict(BLOCK=block, num_warps=4 if block >= 512 else 1)


def split_int4(w_packed: Tensor) -> Tensor:
    """4-bit weights from ``numerics.packing``'s layout ([N, K/2] uint8, byte j = K indices 2j, 2j+1)
    to the kernel's split layout: K zero-padded to a multiple of ``INT4_SPLIT_CHUNK`` (128) and byte
    ``c*64 + j`` of a row holding K index ``c*128 + j`` in its low nibble and ``c*128 + 64 + j`` in
    its high one ([N, ceil(K/128)*64] uint8). One K step of the kernel reads a chunk's 64 bytes and
    gets each half of the chunk's weights, a k-contiguous int8 tile, with one mask (``_nibbles_x16``)
    instead of an interleave. Pure torch, any device; ``unsplit_int4`` inverts it. Raises
    ``ValueError`` for a non-uint8 or non-2-D tensor."""
    if not isinstance(w_packed, Tensor) or w_packed.dtype != torch.uint8 or w_packed.dim() != 2:
        raise ValueError(f"split_int4: w_packed must be a 2-D uint8 tensor (pack_int4's layout), got "
                         f"{getattr(w_packed, 'dtype', type(w_packed).__name__)} "
                         f"{tuple(getattr(w_packed, 'shape', ()))}")
    n, k = w_packed.shape[0], 2 * w_packed.shape[1]
    chunk = INT4_SPLIT_CHUNK
    kpad = -(-k // chunk) * chunk
    q = torch.nn.functional.pad(unpack_int4(w_packed), (0, kpad - k)).view(n, kpad // chunk, 2, chunk // 2)
    lo, hi = q[:, :, 0].to(torch.int16), q[:, :, 1].to(torch.int16)
    return ((lo & 0xF) | ((hi & 0xF) << 4)).to(torch.uint8).reshape(n, kpad // 2)


def unsplit_int4(w_split: Tensor, k: int) -> Tensor:
    """``split_int4``'s inverse: the first ``k`` K indices back in ``numerics.packing``'s layout
    ([N, k/2] uint8). Raises ``ValueError`` for a bad tensor or a ``k`` the tensor does not hold."""
    if not isinstance(w_split, Tensor) or w_split.dtype != torch.uint8 or w_split.dim() != 2:
        raise ValueError(f"unsplit_int4: w_split must be a 2-D uint8 tensor, got "
                         f"{getattr(w_split, 'dtype', type(w_split).__name__)}")
    chunk = INT4_SPLIT_CHUNK
    n, kpad = w_split.shape[0], 2 * w_split.shape[1]
    if kpad % chunk or k % 2 or not kpad - chunk < k <= kpad:
        raise ValueError(f"unsplit_int4: k={k} does not fit a split layout of {kpad} padded K indices")
    v = w_split.view(torch.int8).view(n, kpad // chunk, 1, chunk // 2)
    q = torch.cat(((v << 4) >> 4, v >> 4), dim=2).reshape(n, kpad)[:, :k]
    return pack_int4_values(q)


_SPLIT_CACHE: dict[int, tuple[weakref.ref, int, int, Tensor]] = {}


def split_int4_cached(w_packed: Tensor) -> Tensor:
    """``split_int4(w_packed)``, computed once per weight tensor: the first call (the CUDA op's
    first launch with this weight) stores it beside the weight until the weight is freed; later
    calls with the same tensor object, unchanged since (its data pointer and version counter), reuse
    it. The split copy takes as much memory as the packed weight. A new tensor object holding the
    same weight, or an in-place change, transforms again."""
    key = id(w_packed)
    hit = _SPLIT_CACHE.get(key)
    stamp = (w_packed.data_ptr(), w_packed._version)
    if hit is not None and hit[0]() is w_packed and hit[1:3] == stamp:
        return hit[3]
    out = split_int4(w_packed)
    if hit is None or hit[0]() is not w_packed:
        weakref.finalize(w_packed, _SPLIT_CACHE.pop, key, None)
    _SPLIT_CACHE[key] = (weakref.ref(w_packed), *stamp, out)
    return out


def _block_k_for(block_k: int, group: int) -> int:
    """The largest BLOCK_K <= block_k dividing the group (group a multiple of 16)."""
    return math.gcd(block_k, group) if group else block_k


def tile_fits(block_m: int, block_n: int, num_warps: int, group: int, zero: bool, arch: int,
              packed_act: bool = False) -> bool:
    """Whether a config leaves the K loop room in a thread's 255 registers, so that nothing
    spills to local memory inside it (``tests/kernels/test_aot_compile.py`` compiles every config
    the pruning keeps, for sm_90 and sm_80, and checks it):

    - one int32 accumulator of ``BLOCK_M * BLOCK_N / (32 * num_warps)`` registers per thread;
      Hopper's wgmma keeps 128 of them beside the K loop's pointers, sm_80's ``mma.sync`` (operand
      fragments in registers too) 64;
    - grouped weights hold two (the group's int32 sum and the fp32 total): at most 64 registers
      each and BLOCK_M <= 64;
    - zero points cost the loop nothing since their row sums come from ``activation_rowsums``
      (summed in the loop they made the 64-wide N tiles spill with grouped weights, and the
      128 x 64 tile on sm_80; measured clean since, triton 3.9);
    - packed activations (W4A4) with grouped weights and zero points on sm_80: 8 warps only
      (measured: 64 x 128 at 4 warps spills 11 local loads / stores in the group loop)."""
    acc = block_m * block_n // (32 * num_warps)
    if group:
        if packed_act and zero and arch < 90 and num_warps < 8:
            return False
        return block_m <= 64 and acc <= 64
    return acc <= (128 if arch >= 90 else 64)


def prune_configs(configs, group: int, arch: int, zero: bool = False, split: bool = False,
                  packed_act: bool = False) -> list:
    """The configs autotuning compiles for ``group`` (zero points, packed activations) on ``sm_<arch>``: BLOCK_K
    shrunk to divide the group, tiles that would spill in the K loop dropped (``tile_fits``),
    duplicates dropped; with ``split`` (int4 weights in the split layout) only BLOCK_K = its chunk."""
    seen, pruned = set(), []
    for cfg in configs:
        kw = dict(cfg.kwargs, BLOCK_K=_block_k_for(cfg.kwargs["BLOCK_K"], group))
        if split and kw["BLOCK_K"] != INT4_SPLIT_CHUNK:
            continue
        if not tile_fits(kw["BLOCK_M"], kw["BLOCK_N"], cfg.num_warps, group, zero, arch, packed_act):
            continue
        key = (tuple(sorted(kw.items())), cfg.num_warps, cfg.num_stages)
        if key not in seen:
            seen.add(key)
            pruned.append(triton.Config(kw, num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    return pruned


def _prune_configs(configs, nargs, **kwargs):
    """``early_config_prune`` of the autotuner: ``prune_configs`` for the launch's group and the
    compute capability of the device holding x (sm_90 when x is not on a CUDA device); only the
    first with ``VIDITQ_AUTOTUNE=0``."""
    x = nargs.get("x_ptr") if nargs else None
    arch = 90
    if isinstance(x, Tensor) and x.device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(x.device)
        arch = 10 * major + minor
    pruned = prune_configs(configs, kwargs.get("GROUP", 0), arch, bool(kwargs.get("HAS_ZERO", False)),
                           bool(kwargs.get("W_SPLIT", False)), bool(kwargs.get("ACT_PACKED", False)))
    return pruned if AUTOTUNE else pruned[:1]


if INTERPRET:
    _launch_kernel = None
else:
    _launch_kernel = triton.autotune(
        configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                 for bm, bn, bk, w, s in QLINEAR_CONFIGS],
        key=["M_BUCKET", "N", "K", "WEIGHT_BITS", "ACT_PACKED", "GROUP", "HAS_ZERO"],
        prune_configs_by={"early_config_prune": _prune_configs},
    )(_qlinear_kernel)


def supports(m: int, n: int, k: int, weight_bits: int, group_size: int) -> bool:
    """Whether ``qlinear_triton`` takes this shape (else route to ``numerics.qlinear``)."""
    return _unsupported_reason(m, n, k, weight_bits, group_size) is None


def qlinear_triton(xq: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, w_zero: Tensor | None,
                   bias: Tensor | None, weight_bits: int, group_size: int, out_dtype: torch.dtype,
                   activation: str = "none", gate: Tensor | None = None, residual: Tensor | None = None,
                   packed_act: bool = False) -> Tensor:
    """``numerics.qlinear`` then ``numerics.epilogue`` as one Triton kernel launch.

    xq: [..., K] int8, or [..., K/2] uint8 packed int4 with ``packed_act``; x_scale: [..., 1] fp32;
    w_q: [N, K] int8 (weight_bits=8) or [N, K/2] uint8 packed by ``pack_int4`` (weight_bits=4);
    w_scale: [N] fp32 (group_size=0) or [N, K/group_size] fp32; w_zero: int32 of w_scale's shape or
    None (symmetric); bias: [N] float or None; out_dtype: fp32/bf16/fp16 (or fp64, the fp32 result
    widened); activation: "none", "gelu_tanh" or "silu" (after the bias); gate: float broadcast
    along the rows (``numerics.epilogue_gate_rows``: [N], [B, 1, N] for [B, T, N], or the
    output's shape) or None; residual: float of the output's shape or None.
    Returns [..., N] of out_dtype. Raises ``ValueError`` for operands ``viditq.qlinear_fused``
    refuses and for shapes this kernel does not take (see ``supports``).
    """
    check_qlinear_fused_args(xq, x_scale, w_q, w_scale, w_zero, bias, weight_bits, group_size, out_dtype,
                             activation, gate, residual, packed_act)
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"qlinear_triton: out_dtype={out_dtype} (supported: {OUT_DTYPES})")
    n = w_q.shape[0]
    k = w_q.shape[1] * (2 if weight_bits == 4 else 1)
    lead = xq.shape[:-1]
    x2 = xq.reshape(-1, xq.shape[-1])
    m = x2.shape[0]
    reason = _unsupported_reason(m, n, k, weight_bits, group_size)
    if reason is not None:
        raise ValueError(f"qlinear_triton: unsupported shape: {reason}; use numerics.qlinear")
    operands = [xq, x_scale, w_q, w_scale] + [t for t in (w_zero, bias, gate, residual) if t is not None]
    if any(t.device != xq.device for t in operands):
        raise ValueError("qlinear_triton: all operands must be on one device, got "
                         f"{sorted({str(t.device) for t in operands})}")
    if xq.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"qlinear_triton: needs CUDA tensors (got {xq.device}) or TRITON_INTERPRET=1 "
                         "set before importing viditq_compile.kernels.int_gemm")
    out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m == 0:
        return out.reshape(*lead, n)
    rowsum = activation_rowsums(x2, group_size or k, packed_act) if w_zero is not None else None
    w_kernel = split_int4_cached(w_q) if int4_split_applies(weight_bits, group_size) else w_q
    args, flags = kernel_args(x2, x_scale, w_kernel, w_scale, w_zero, bias, gate, residual, out, weight_bits,
                              group_size, activation, packed_act, lead, rowsum)
    with device_guard(xq.device):
        if INTERPRET:
            bm, bn, bk = INTERPRET_CONFIG
            bk = INT4_SPLIT_CHUNK if flags["W_SPLIT"] else _block_k_for(bk, group_size)
            grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
            _qlinear_kernel[grid](*args, **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        else:
            def tuned_grid(meta):
                return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
            _launch_kernel[tuned_grid](*args, **flags)  # type: ignore[index]  # set when not INTERPRET
    return out.reshape(*lead, n)


def kernel_args(x2: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, w_zero: Tensor | None,
                bias: Tensor | None, gate: Tensor | None, residual: Tensor | None, out: Tensor,
                weight_bits: int, group_size: int, activation: str, packed_act: bool,
                lead: tuple[int, ...], rowsum: Tensor | None = None) -> tuple[tuple, dict]:
    """The positional arguments and constexpr flags of ``_qlinear_kernel`` (block sizes aside) for
    checked operands: x2 the activations flattened to 2-D, out the [M, N] output, ``lead`` the
    activations' leading dims, ``rowsum`` the [M, K/group] (or [M, 1]) int32 row sums of x2
    (``activation_rowsums``; required with w_zero), w_q the weights as the kernel reads them: in
    the split layout (``split_int4``) where ``int4_split_applies``. Shared by the launch and by
    ``kernels.aot`` (which compiles the same specialization for a GPU target, from meta tensors)."""
    if (w_zero is None) != (rowsum is None):
        raise ValueError("kernel_args: rowsum (activation_rowsums) is needed exactly when w_zero is given, got "
                         f"w_zero {'None' if w_zero is None else 'set'}, rowsum "
                         f"{'None' if rowsum is None else tuple(rowsum.shape)}")
    m, n = out.shape
    k = x2.shape[1] * (2 if packed_act else 1)
    split = int4_split_applies(weight_bits, group_size)
    want = -(-k // INT4_SPLIT_CHUNK) * INT4_SPLIT_CHUNK // 2 if split else k // 2 if weight_bits == 4 else k
    if tuple(w_q.shape) != (n, want):
        raise ValueError(f"kernel_args: weights of shape {tuple(w_q.shape)} for N={n}, K={k}, W{weight_bits} "
                         f"group {group_size}: expected {(n, want)}{' (split_int4 layout)' if split else ''}")
    xs = x_scale.reshape(-1).contiguous()
    ws = w_scale.contiguous()
    wz = w_zero.contiguous() if w_zero is not None else ws  # dummy pointers for absent operands
    stride_sg = ws.stride(1) if group_size else 0
    b, stride_b, rows_per_gate, g2, stride_g, r2, stride_r = tail_operands(bias, gate, residual, out, lead, ws)
    rs, stride_rsm = (rowsum, rowsum.stride(0)) if rowsum is not None else (ws, 0)
    args = (x2, xs, w_q, ws, wz, rs, b, g2, r2, out, m, n, k, triton.next_power_of_2(max(min(m, 65536), 16)),
            rows_per_gate, x2.stride(0), x2.stride(1), w_q.stride(0), w_q.stride(1), ws.stride(0), stride_sg,
            stride_rsm, stride_b, *stride_g, *stride_r, out.stride(0), out.stride(1))
    flags = dict(GROUP_M=GROUP_M, WEIGHT_BITS=weight_bits, ACT_PACKED=packed_act, GROUP=group_size,
                 HAS_ZERO=w_zero is not None, W_SPLIT=split, UNPACK_ASM=not INTERPRET,
                 HAS_BIAS=bias is not None, ACTIVATION=activation, HAS_GATE=gate is not None,
                 HAS_RESIDUAL=residual is not None)
    return args, flags
