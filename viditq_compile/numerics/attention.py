"""Quantized attention, SageAttention-style: the reference every attention implementation is held to.

``attention_ref(q, k, v, scale)`` computes ``softmax(q kᵀ · scale) v`` as

1. **K smoothing** (``smooth_k``): ``k - mean_tokens(k)``, per batch, head and channel. Every
   score of a query row then changes by the same ``q · mean(k)``, which softmax ignores, so in
   exact arithmetic the output is unchanged; but K's channel offsets (DiT keys carry a large
   shared bias per channel) no longer eat the int8 range.
2. **Q and K to int8** (``quantize_token_blocks``): symmetric, one fp32 scale
   ``absmax / 127`` per block of ``block`` consecutive tokens (all head channels) of each
   batch and head; the last block may be shorter. ``block=1`` is per token.
3. **Q·Kᵀ exactly in int32** (``int_scores``), then ``s = acc · (q_scale · scale) · k_scale`` in
   fp32.
4. **Softmax in fp32**, flash-style: ``e = exp(s - rowmax(s))``, ``l = sum(e)`` (fp32).
5. **P·V in 16-bit**: ``P = e`` rounded to the 16-bit type (``pv_dtype``: the input's dtype when
   it is bf16/fp16, bf16 for fp32 inputs, whose range fp16 might not hold), ``V`` rounded to the
   same type, their products accumulated in fp32, divided by ``l`` and cast to the input's dtype.

A kernel (online softmax over K blocks) differs from this only in the order of fp32 operations
and in rounding the rescaled, not the final, ``e`` to 16 bits: ``attention_bound`` is its tolerance.

Layout: SDPA's, ``q [B, H, Lq, D]``, ``k [B, H, Lk, D]``, ``v [B, H, Lk, Dv]`` (any number of
leading dims, the same in all three). No mask, no causal masking, no dropout, no GQA:
``check_attention_args`` refuses them (a DiT's self and temporal attention use none).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["QMAX", "DEFAULT_BLOCK", "FLOAT_DTYPES", "pv_dtype", "empty_output", "smooth_k",
           "quantize_token_blocks",
           "expand_block_scales", "int_scores", "exact_fp32_max_d", "attention_ref", "attention_bound",
           "check_attention_args"]

QMAX = 127
DEFAULT_BLOCK = 128
"""Tokens per quantization block of Q and of K (SageAttention's per-block granularity)."""
SCALE_FLOOR = 1e-12
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def pv_dtype(dtype: torch.dtype) -> torch.dtype:
    """The 16-bit type P and V are rounded to for inputs of ``dtype``."""
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"quantized attention: inputs must be one of {FLOAT_DTYPES}, got {dtype}")
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def check_attention_args(q: Tensor, k: Tensor, v: Tensor, scale: float, block_q: int, block_k: int,
                         op: str = "quantized attention") -> None:
    """The operands every implementation accepts; ``ValueError`` naming the bad one."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{op}: {name} must be one of {FLOAT_DTYPES}, got {t.dtype}")
        if t.dim() < 3:
            raise ValueError(f"{op}: {name} must be [..., L, D] with at least one batch/head dim, got "
                             f"{tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{op}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{op}: q, k, v must share a device, got {q.device}, {k.device}, {v.device}")
    if not (q.dim() == k.dim() == v.dim()) or q.shape[:-2] != k.shape[:-2] or k.shape[:-2] != v.shape[:-2]:
        raise ValueError(f"{op}: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must share "
                         f"their leading (batch, head) dims (no broadcasting, no grouped-query heads)")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{op}: q has head dim {q.shape[-1]}, k has {k.shape[-1]}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"{op}: k has {k.shape[-2]} tokens, v has {v.shape[-2]}")
    if q.shape[-2] < 1 or k.shape[-2] < 1 or q.shape[-1] < 1 or v.shape[-1] < 1:
        raise ValueError(f"{op}: empty sequence or head dim: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{op}: scale must be a finite positive number, got {scale!r}")
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"{op}: {name} must be a positive int (tokens per scale), got {b!r}")


def empty_output(q: Tensor, dv: int) -> Tensor:
    """An uninitialised ``[..., Lq, dv]`` output in q's dtype, laid out as SDPA lays its output out:
    for ``[B, H, Lq, D]`` inputs, ``[B, Lq, H, dv]`` memory seen through ``transpose(1, 2)``, so the
    ``transpose(1, 2).reshape(B, Lq, H·dv)`` that follows every attention in a captured graph (traced as
    a ``view`` on SDPA's strides) stays a view; other ranks contiguous."""
    if q.dim() == 4:
        b, h, lq, _ = q.shape
        return q.new_empty((b, lq, h, dv)).transpose(1, 2)
    return q.new_empty((*q.shape[:-1], dv))


def smooth_k(k: Tensor) -> Tensor:
    """``k - k.mean(over tokens)`` in fp32, per leading index and channel. k: [..., Lk, D]."""
    kf = k.to(torch.float32)
    return kf - kf.mean(dim=-2, keepdim=True)


def quantize_token_blocks(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Symmetric int8 with one scale per ``block`` tokens.

    x: [..., L, D] float. Returns q: [..., L, D] int8 and scale: [..., ceil(L / block)] fp32
    (``absmax / 127`` of the block, floored at ``SCALE_FLOOR``).
    """
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"quantize_token_blocks: block must be a positive int, got {block!r}")
    xf = x.to(torch.float32)
    length = xf.shape[-2]
    nb = -(-length // block)
    pad = nb * block - length
    absx = xf.abs().amax(dim=-1)  # [..., L]
    if pad:
        absx = torch.nn.functional.pad(absx, (0, pad))
    scale = absx.reshape(*absx.shape[:-1], nb, block).amax(dim=-1).clamp_min(SCALE_FLOOR) / QMAX
    rows = expand_block_scales(scale, block, length)
    q = torch.clamp(torch.round(xf / rows.unsqueeze(-1)), -QMAX, QMAX).to(torch.int8)
    return q, scale


def expand_block_scales(scale: Tensor, block: int, length: int) -> Tensor:
    """[..., nb] block scales -> [..., length] one per token."""
    return scale.repeat_interleave(block, dim=-1)[..., :length]


def exact_fp32_max_d() -> int:
    """The largest head dim whose int8 dot products an fp32 GEMM sums exactly: every partial sum is
    an integer of magnitude at most ``D · 127²``, exact in fp32 while ``<= 2^24``."""
    return 2 ** 24 // QMAX ** 2


def int_scores(qq: Tensor, kq: Tensor) -> Tensor:
    """Exact ``qq @ kqᵀ`` in int32: qq [..., Lq, D] int8, kq [..., Lk, D] int8 -> [..., Lq, Lk] int32.
    (int64 matmul, float64 off the CPU; ``D · 127² < 2^31`` for any D below 133 000, checked.)"""
    if qq.shape[-1] * QMAX ** 2 >= 2 ** 31:
        raise OverflowError(f"head dim {qq.shape[-1]} overflows the int32 accumulator")
    if qq.device.type != "cpu":  # no int64 GEMM there; float64 sums of these integers are exact
        return (qq.to(torch.float64) @ kq.to(torch.float64).transpose(-1, -2)).to(torch.int32)
    return (qq.to(torch.int64) @ kq.to(torch.int64).transpose(-1, -2)).to(torch.int32)


def attention_ref(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, *,
                  block_q: int = DEFAULT_BLOCK, block_k: int = DEFAULT_BLOCK, smooth: bool = True) -> Tensor:
    """Quantized attention (the module docstring), [..., Lq, Dv] in q's dtype.

    scale: the score scale, ``1 / sqrt(D)`` by default (SDPA's). smooth: subtract K's token mean
    first (False only to measure what it buys).
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    check_attention_args(q, k, v, scale, block_q, block_k)
    pv = pv_dtype(q.dtype)
    qq, qs = quantize_token_blocks(q, block_q)
    kq, ks = quantize_token_blocks(smooth_k(k) if smooth else k, block_k)
    acc = int_scores(qq, kq)
    s = acc.to(torch.float32) * (expand_block_scales(qs, block_q, q.shape[-2]) * scale).unsqueeze(-1) \
        * expand_block_scales(ks, block_k, k.shape[-2]).unsqueeze(-2)
    e = torch.exp(s - s.amax(dim=-1, keepdim=True))
    denom = e.sum(dim=-1, keepdim=True)
    out = e.to(pv).to(torch.float32) @ v.to(pv).to(torch.float32)
    return (out / denom).to(q.dtype)


def attention_bound(v: Tensor) -> float:
    """Tolerance (absolute, per element) between ``attention_ref`` and an online-softmax kernel:
    the two round differently-rescaled ``e`` to 16 bits (relative 2^-8 for bf16), so outputs may
    differ by a few 16-bit ulps of ``max |v|``."""
    eps = torch.finfo(pv_dtype(v.dtype)).eps
    return float(4 * eps * v.detach().abs().amax().to(torch.float32).clamp_min(1e-30))
