"""SageAttention-style quantized attention as a flash-style Triton kernel (``numerics.attention``).

The wrapper (``attention_triton``) quantizes in ATen ops, as the reference does: K mean-subtracted
over tokens, Q and K to int8 with one scale per block of tokens (``numerics.attention``), the
scales expanded to one per row of Q (times ``scale · log2 e``) and one per row of K, V rounded to
the 16-bit P·V type. The kernel (``_attention_kernel``, grid ``(ceil(Lq / BLOCK_M), B·H)``) holds a
``[BLOCK_M, D]`` int8 Q tile and walks K / V in ``BLOCK_N`` tiles with an online softmax:

- ``s = tl.dot(q, kᵀ) -> int32`` (int8 tensor cores: ``wgmma`` on sm_90, ``mma`` on sm_80),
  exactly the reference's integer scores; ``s · q_scale · k_scale`` in fp32;
- running row max ``m`` and sum ``l`` in fp32, ``p = exp2(s - m)``, the accumulator rescaled by
  ``exp2(m_old - m)``;
- ``acc += tl.dot(p.to(16-bit), v)`` with fp32 accumulation; ``out = acc / l``, cast once.

It differs from ``attention_ref`` only in the fp32 operation order and in which rescaled ``p`` is
rounded to 16 bits (``numerics.attention.attention_bound``). The head dim is padded to a power of
two (at least 32, an int8 MMA's K) with masked loads: D = 72 (PixArt) computes 128 channels.

Under ``TRITON_INTERPRET=1`` (CPU tests) ``DOT_IN_FP32`` widens the P·V operands to fp32 after
rounding P to bf16 on the bits (the interpreter's bf16 dot and cast are wrong): the same products,
as the GPU's 16-bit MMA forms them exactly in fp32.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from viditq_compile.kernels.launch import device_guard
from viditq_compile.numerics import attention as attn
from viditq_compile.ops.schema import ATTENTION

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634

ATTENTION_CONFIGS: tuple[tuple[int, int, int, int], ...] = (
    # (BLOCK_M, BLOCK_N, num_warps, num_stages)
    (128, 64, 8, 2),  # head dims up to 128 (every DiT's)
    (64, 32, 4, 2),   # head dims 129-256
)
"""Tile configs by head dim; the accumulator ``[BLOCK_M, Dv]`` fp32 and the scores ``[BLOCK_M,
BLOCK_N]`` must stay in registers (``tests/kernels/test_attention.py`` checks no spill in the K loop)."""
INTERPRET_CONFIG = (32, 32, 4, 1)
MAX_HEAD_DIM = 256


def config_for(d: int, dv: int) -> tuple[int, int, int, int]:
    """The tile config for head dims ``d`` (Q·K) and ``dv`` (V)."""
    if INTERPRET:
        return INTERPRET_CONFIG
    return ATTENTION_CONFIGS[0] if max(d, dv) <= 128 else ATTENTION_CONFIGS[1]


def unsupported_reason(q: Tensor, k: Tensor, v: Tensor) -> str | None:
    """Why the kernel does not take these operands (head dims above ``MAX_HEAD_DIM``), or None."""
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return f"head dims {q.shape[-1]} / {v.shape[-1]} exceed the kernel's {MAX_HEAD_DIM}"
    return None


def _pow2(n: int, least: int) -> int:
    return max(least, 1 << (n - 1).bit_length())


@triton.jit
def _round_bf16(y):
    """fp32 ``y`` rounded to nearest even bf16, as fp32 (the interpreter's cast truncates)."""
    u = y.to(tl.uint32, bitcast=True)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.to(tl.float32, bitcast=True)


@triton.jit
def _attention_kernel(
    q_ptr, qs_ptr, k_ptr, ks_ptr, v_ptr, o_ptr,
    LQ, LK, D, DV, DV_OUT, HEADS,
    stride_qb, stride_qm, stride_kb, stride_kn, stride_vb, stride_vn, stride_ob, stride_oh, stride_om,
    stride_qsb, stride_ksb,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, PV_BF16: tl.constexpr,
):
    """One ``[BLOCK_M, Dv]`` output tile of one batch x head slice (module docstring).

    q: [BH, LQ, D] int8; qs: [BH, LQ] fp32 (Q's scale per row, times ``scale · log2 e``);
    k: [BH, LK, D] int8; ks: [BH, LK] fp32; v: [BH, LK, DV] bf16/fp16; o: [B, HEADS, LQ, DV_OUT]
    with any strides but a contiguous last dim (SDPA's layout; any float dtype; DV_OUT <= DV: v's
    columns past DV_OUT are the zero padding of ``prepare``).
    Channels are contiguous (stride 1) in q, k, v and o.
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    offs_dv = tl.arange(0, HEAD_DV)
    offs_n0 = tl.arange(0, BLOCK_N)
    row_ok = offs_m < LQ
    q = tl.load(q_ptr + bh * stride_qb + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0)
    qs = tl.load(qs_ptr + bh * stride_qsb + offs_m, mask=row_ok, other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DV), dtype=tl.float32)
    for start in range(0, LK, BLOCK_N):
        offs_n = start + offs_n0
        col_ok = offs_n < LK
        kt = tl.load(k_ptr + bh * stride_kb + offs_n[None, :] * stride_kn + offs_d[:, None],
                     mask=col_ok[None, :] & (offs_d[:, None] < D), other=0)
        ks = tl.load(ks_ptr + bh * stride_ksb + offs_n, mask=col_ok, other=0.0)
        s = tl.dot(q, kt, out_dtype=tl.int32).to(tl.float32) * qs[:, None] * ks[None, :]
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + bh * stride_vb + offs_n[:, None] * stride_vn + offs_dv[None, :],
                    mask=col_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        if DOT_IN_FP32:
            pr = _round_bf16(p) if PV_BF16 else p.to(tl.float16).to(tl.float32)
            pv = tl.dot(pr, v.to(tl.float32))
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    out = acc / l_i[:, None]
    o_base = o_ptr + (bh // HEADS) * stride_ob + (bh % HEADS) * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_om + offs_dv[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV_OUT))


def prepare(q: Tensor, k: Tensor, v: Tensor, scale: float, block_q: int, block_k: int):
    """The kernel's operands from the op's: ``(q8, q_row_scale, k8, k_row_scale, v16, out)``, each
    flattened to ``[B·H, L, ·]`` (``numerics.attention``'s quantization, in ATen ops)."""
    lq, lk, d, dv = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    qq, qs = attn.quantize_token_blocks(q, block_q)
    kq, ks = attn.quantize_token_blocks(attn.smooth_k(k), block_k)
    q_rows = attn.expand_block_scales(qs, block_q, lq) * (scale * LOG2E)
    k_rows = attn.expand_block_scales(ks, block_k, lk)
    v16 = v.to(attn.pv_dtype(v.dtype))
    out = attn.empty_output(q, dv)
    return (_rows16(qq, lq, d), q_rows.reshape(-1, lq).contiguous(), _rows16(kq, lk, d),
            k_rows.reshape(-1, lk).contiguous(), _rows16(v16, lk, dv), out)


def _rows16(t: Tensor, length: int, width: int) -> Tensor:
    """``t`` as a contiguous ``[B·H, length, width]`` whose row stride is a multiple of 16 (zero
    columns appended): the launcher's divisibility hint then lets each K / V tile load as
    asynchronous 16-byte copies into shared memory (D = 72 without it: row-by-row loads through
    registers, 64 shared stores per K step on sm_90)."""
    t = t.reshape(-1, length, width)
    pad = -width % 16
    if pad:
        return torch.nn.functional.pad(t, (0, pad))
    return t.contiguous()


def kernel_args(q8, qs, k8, ks, v16, out):
    """``(grid, args, kwargs)`` of the launch on ``prepare``'s operands (``out``: [..., LQ, DV], its
    leading dims seen as [B, H]); the AOT test compiles with exactly these."""
    bh, lq = qs.shape
    lk, dv = ks.shape[1], out.shape[-1]
    d = k8.shape[2]  # padded to a multiple of 16 by ``prepare`` (zero columns add nothing to Q·Kᵀ)
    block_m, block_n, warps, stages = config_for(d, dv)
    o = out if out.dim() == 4 else out.reshape(1, bh, lq, dv)  # [B, H, LQ, DV], SDPA's strides
    args = (q8, qs, k8, ks, v16, o, lq, lk, d, v16.shape[2], dv, o.shape[1],
            q8.stride(0), q8.stride(1), k8.stride(0), k8.stride(1), v16.stride(0), v16.stride(1),
            o.stride(0), o.stride(1), o.stride(2), qs.stride(0), ks.stride(0))
    kwargs = dict(BLOCK_M=block_m, BLOCK_N=block_n, HEAD_D=_pow2(d, 32), HEAD_DV=_pow2(v16.shape[2], 16),
                  DOT_IN_FP32=INTERPRET, PV_BF16=v16.dtype == torch.bfloat16, num_warps=warps,
                  num_stages=stages)
    grid = (triton.cdiv(lq, block_m), bh)
    return grid, args, kwargs


def attention_triton(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, block_q: int = attn.DEFAULT_BLOCK,
                     block_k: int = attn.DEFAULT_BLOCK) -> Tensor:
    """``viditq.attention`` on CUDA (or on CPU tensors under ``TRITON_INTERPRET=1``).

    q: [..., Lq, D], k: [..., Lk, D], v: [..., Lk, Dv] fp32/bf16/fp16 as ``numerics.attention``;
    returns [..., Lq, Dv] in q's dtype, within ``attention_bound`` of ``attention_ref``.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    attn.check_attention_args(q, k, v, scale, block_q, block_k, ATTENTION.display)
    if q.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"attention_triton: tensors on {q.device}; the kernel runs on CUDA (or on CPU "
                         f"with TRITON_INTERPRET=1 set before import)")
    why = unsupported_reason(q, k, v)
    if why is not None:
        raise ValueError(f"attention_triton: {why}")
    operands = prepare(q, k, v, scale, block_q, block_k)
    grid, args, kwargs = kernel_args(*operands)
    with device_guard(q.device):
        _attention_kernel[grid](*args, **kwargs)
    return operands[-1]


def build(arch: int, lq: int = 4096, lk: int = 4096, d: int = 72, dv: int = 72, heads: int = 32,
          dtype: torch.dtype = torch.bfloat16):
    """The kernel compiled ahead of time for ``sm_<arch>`` (``kernels.aot``) with a launch's
    specialization at these sizes (default: PixArt-Σ at 1024 px, 2 x 16 heads of 72 over 4096
    tokens); meta tensors, nothing runs."""
    from viditq_compile.kernels import aot

    meta = torch.device("meta")
    d16, dv16 = d + -d % 16, dv + -dv % 16
    q8 = torch.empty(heads, lq, d16, dtype=torch.int8, device=meta)
    k8 = torch.empty(heads, lk, d16, dtype=torch.int8, device=meta)
    qs, ks = torch.empty(heads, lq, device=meta), torch.empty(heads, lk, device=meta)
    v16 = torch.empty(heads, lk, dv16, dtype=attn.pv_dtype(dtype), device=meta)
    out = torch.empty(2, lq, heads // 2, dv, dtype=dtype, device=meta).transpose(1, 2)  # SDPA's layout
    _, args, kwargs = kernel_args(q8, qs, k8, ks, v16, out)
    kwargs = {**kwargs, "DOT_IN_FP32": False}
    return aot._compile(_attention_kernel, args, kwargs, arch)
