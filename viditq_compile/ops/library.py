"""``torch.ops.viditq.*``: the custom ops a quantized program is made of.

Importing this module defines the ops (schema, fake implementation for tracing, CPU
implementation). It must be imported before ``torch.export.load`` of a quantized program;
``import viditq_compile`` does that. Registration with Inductor is separate and explicit
(``viditq_compile.lowering.inductor.install``).

Each op is opaque to ``torch.export`` so the saved program is portable: the same op runs on any
device that has an implementation.

Ops: ``w8a8_linear`` (quantize + GEMM + epilogue in one call, per-channel int8 weights);
``balance`` (the activation side of channel balancing, for programs that stay in floating
point); ``quantize_act`` (balance + per-token or static per-tensor quantization) followed by
``qlinear`` (int8 or packed int4 weights, per channel or grouped; or, after ``quantize_act_fp8``,
e4m3 operands with fp32 accumulation: ``numerics.fp8``); ``qlinear_timestep`` (a
layer whose widths change with the diffusion timestep: one ``quantize_act`` + ``qlinear``
version per timestep range, picked at run time from the timestep tensor, so one graph serves
every sampling step); ``qlinear_fused`` (``qlinear`` plus its activation / gate / residual
tail and optionally packed 4-bit activations; only compiled CUDA graphs hold it); ``attention``
(SageAttention-style quantized attention: ``numerics.attention``); ``int8_mm`` (the integer
GEMM with a float product, which the CPU decompositions call: oneDNN where it runs).
Each checks its operands (``numerics.contracts``: ``ValueError`` naming the bad one) and computes
with ``numerics`` plus ``torch._int_mm``. Names and argument lists come from ``ops.schema``.

``*_impl``: the unchecked CPU computations, which the Inductor decompositions
(``lowering/inductor.py``) and the CUDA registrations (``ops/cuda.py``) reuse.
"""

from __future__ import annotations

import torch
from torch import Tensor

from viditq_compile.numerics import attention as attn
from viditq_compile.numerics import fp8
from viditq_compile.numerics import quant as numerics
from viditq_compile.numerics.contracts import (
    check_balance_args,
    check_int8_mm_args,
    check_qlinear_args,
    check_qlinear_fused_args,
    check_qlinear_timestep_args,
    check_quantize_act_args,
    check_quantize_act_fp8_args,
    check_w8a8_args,
)
from viditq_compile.numerics.packing import unpack_int4
from viditq_compile.ops.schema import (
    ATTENTION,
    BALANCE,
    INT8_MM,
    QLINEAR,
    QLINEAR_FUSED,
    QLINEAR_TIMESTEP,
    QUANTIZE_ACT,
    QUANTIZE_ACT_FP8,
    W8A8_LINEAR,
    OpSchema,
)


def _define(op: OpSchema):
    """``torch.library.custom_op`` for ``op``, with its name and schema from ``ops.schema``
    (the Python signature below each definition must agree: ``tests/ops/test_schema.py``)."""
    return torch.library.custom_op(op.qualname, mutates_args=(), schema=op.signature)


@_define(W8A8_LINEAR)
def w8a8_linear(x: Tensor, w_q: Tensor, w_scale: Tensor, w_zero: Tensor | None,
                bias: Tensor | None, act_bits: int = 8) -> Tensor:
    """Quantized linear layer with int8 per-channel weights and dynamic per-token activations.

    x: [..., K] fp32/bf16/fp16; w_q: [N, K] int8 row-major; w_scale: [N] fp32;
    w_zero: [N] int32 or None (symmetric weights); bias: [N] or None.
    Returns [..., N] in x's dtype. Numerics: ``numerics.w8a8_linear``.
    """
    check_w8a8_args(x, w_q, w_scale, w_zero, bias, act_bits)
    return numerics.w8a8_linear(x, w_q, w_scale, w_zero, bias, act_bits,
                                gemm=numerics.int_gemm_fast)


@w8a8_linear.register_fake
def _w8a8_linear_fake(x, w_q, w_scale, w_zero, bias, act_bits=8):
    torch._check(x.shape[-1] == w_q.shape[1],
                 lambda: f"{W8A8_LINEAR.display}: x has {x.shape[-1]} features, K={w_q.shape[1]}")
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))


def balance_impl(x: Tensor, smooth: Tensor | None, rotation: list[Tensor]) -> Tensor:
    """``viditq.balance`` on checked operands."""
    out = numerics.balance_activation(x, smooth, rotation).to(x.dtype)
    return out.clone() if out is x else out  # an op's output must not alias its input


@_define(BALANCE)
def balance(x: Tensor, smooth: Tensor | None, rotation: list[Tensor]) -> Tensor:
    """The activation side of channel balancing, ``(x * smooth) @ kron(*rotation)``.

    x: [..., K] fp32/bf16/fp16; smooth: [K] fp32 or None; rotation: ``kron_factors``-style
    square fp32 factors whose orders multiply to K, or ``[]``. Computed in fp32
    (``numerics.balance_activation``), returned as [..., K] in x's dtype.
    """
    check_balance_args(x, smooth, rotation)
    return balance_impl(x, smooth, rotation)


@balance.register_fake
def _balance_fake(x, smooth, rotation):
    return torch.empty_like(x)


@_define(QUANTIZE_ACT)
def quantize_act(x: Tensor, smooth: Tensor | None, rotation: list[Tensor], static_scale: Tensor | None,
                 act_bits: int = 8) -> tuple[Tensor, Tensor]:
    """Balance and quantize an activation (``numerics.quantize_act``).

    x: [..., K] fp32/bf16/fp16; smooth, rotation: as in ``viditq.balance``; static_scale: 0-d
    fp32 (static per-tensor) or None (dynamic per token). Returns q: [..., K] int8 and
    scale: [..., 1] fp32.
    """
    check_quantize_act_args(x, smooth, rotation, static_scale, act_bits)
    return numerics.quantize_act(x, smooth, rotation, static_scale, act_bits)


@quantize_act.register_fake
def _quantize_act_fake(x, smooth, rotation, static_scale, act_bits=8):
    return (x.new_empty(x.shape, dtype=torch.int8),
            x.new_empty((*x.shape[:-1], 1), dtype=torch.float32))


@_define(QUANTIZE_ACT_FP8)
def quantize_act_fp8(x: Tensor, smooth: Tensor | None, rotation: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Balance and quantize an activation to e4m3 per token (``numerics.fp8.quantize_act_fp8``).

    x: [..., K] fp32/bf16/fp16; smooth, rotation: as in ``viditq.balance``. Returns
    q: [..., K] float8_e4m3fn and scale: [..., 1] fp32.
    """
    check_quantize_act_fp8_args(x, smooth, rotation)
    return fp8.quantize_act_fp8(x, smooth, rotation)


@quantize_act_fp8.register_fake
def _quantize_act_fp8_fake(x, smooth, rotation):
    return (x.new_empty(x.shape, dtype=fp8.E4M3),
            x.new_empty((*x.shape[:-1], 1), dtype=torch.float32))


def qlinear_impl(xq: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, w_zero: Tensor | None,
                 bias: Tensor | None, weight_bits: int, group_size: int,
                 out_dtype: torch.dtype) -> Tensor:
    """``viditq.qlinear`` on checked operands (e4m3 operands: the fp32 GEMM of ``numerics.fp8``)."""
    wq = unpack_int4(w_q) if weight_bits == 4 else w_q
    gemm = fp8.fp8_gemm_fast if fp8.is_fp8(w_q) else numerics.int_gemm_fast
    return numerics.qlinear(xq, x_scale, wq, w_scale, w_zero, bias, group_size or None, out_dtype,
                            gemm=gemm)


@_define(QLINEAR)
def qlinear(xq: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, w_zero: Tensor | None,
            bias: Tensor | None, weight_bits: int, group_size: int, out_dtype: torch.dtype) -> Tensor:
    """Linear layer on a quantized activation: integer GEMM(s) + dequantizing epilogue.

    xq: [..., K] int8; x_scale: [..., 1] fp32 (``viditq.quantize_act``'s outputs);
    w_q: [N, K] int8 (weight_bits=8) or [N, K/2] uint8 packed by ``kernels.packing.pack_int4``
    (weight_bits=4); group_size: 0 (per channel, w_scale [N] fp32) or g dividing K (w_scale
    [N, K/g] fp32); w_zero: int32 of w_scale's shape, or None (symmetric); bias: [N] float or None.
    Returns [..., N] of out_dtype. Numerics: ``numerics.qlinear``.
    """
    check_qlinear_args(xq, x_scale, w_q, w_scale, w_zero, bias, weight_bits, group_size, out_dtype)
    return qlinear_impl(xq, x_scale, w_q, w_scale, w_zero, bias, weight_bits, group_size, out_dtype)


@qlinear.register_fake
def _qlinear_fake(xq, x_scale, w_q, w_scale, w_zero, bias, weight_bits, group_size, out_dtype):
    return xq.new_empty((*xq.shape[:-1], w_q.shape[0]), dtype=out_dtype)


def qlinear_fused_impl(xq, x_scale, w_q, w_scale, w_zero, bias, weight_bits, group_size, out_dtype,
                       activation, gate, residual, packed_act):
    """``viditq.qlinear_fused`` on checked operands."""
    xq = unpack_int4(xq) if packed_act else xq
    y = qlinear_impl(xq, x_scale, w_q, w_scale, w_zero, bias, weight_bits, group_size, torch.float32)
    return numerics.epilogue(y, activation, gate, residual).to(out_dtype)


@_define(QLINEAR_FUSED)
def qlinear_fused(xq: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, w_zero: Tensor | None,
                  bias: Tensor | None, weight_bits: int, group_size: int, out_dtype: torch.dtype,
                  activation: str, gate: Tensor | None, residual: Tensor | None,
                  packed_act: bool) -> Tensor:
    """``viditq.qlinear`` with the pointwise tail that follows it in a DiT block absorbed:
    ``act(qlinear(...)) * gate + residual`` computed in fp32 and cast once to out_dtype
    (``numerics.epilogue``).

    Only compiled graphs hold it: ``lowering.fuse_epilogues`` rewrites ``qlinear`` (and
    ``w8a8_linear``) with the ops after it on the devices whose GEMM kernel runs the epilogue
    (CUDA); exported programs keep the plain ops. Operands as ``viditq.qlinear``, plus
    activation (``"none"``, ``"gelu_tanh"``, ``"silu"``), gate (float, ``[N]``, ``[B, 1, N]``
    against ``[B, T, N]``, or the output's shape; or None), residual (float of the output's
    shape, or None) and packed_act (xq holds 4-bit activations packed two per byte as uint8
    ``[..., K/2]``, ``kernels.packing`` layout).
    """
    check_qlinear_fused_args(xq, x_scale, w_q, w_scale, w_zero, bias, weight_bits, group_size,
                             out_dtype, activation, gate, residual, packed_act)
    return qlinear_fused_impl(xq, x_scale, w_q, w_scale, w_zero, bias, weight_bits, group_size,
                              out_dtype, activation, gate, residual, packed_act)


@qlinear_fused.register_fake
def _qlinear_fused_fake(xq, x_scale, w_q, w_scale, w_zero, bias, weight_bits, group_size, out_dtype,
                        activation, gate, residual, packed_act):
    return xq.new_empty((*xq.shape[:-1], w_q.shape[0]), dtype=out_dtype)


def qlinear_timestep_impl(x, smooth, rotation, timestep, bounds, w_q, w_scale, w_zero, bias,
                          weight_bits, act_bits, group_size, out_dtype,
                          quantize=numerics.quantize_act, linear=None):
    """``viditq.qlinear_timestep`` on checked operands. ``quantize`` / ``linear``: the activation
    quantization and quantized linear to run each version with (the CPU reference by default; the
    CUDA registration passes its kernels)."""
    linear = linear or qlinear_impl

    def version(i: int, rows: Tensor) -> Tensor:
        xq, x_scale = quantize(rows, smooth, rotation, None, act_bits[i])
        return linear(xq, x_scale, w_q[i], w_scale[i], w_zero[i], bias, weight_bits[i],
                      group_size, out_dtype)

    ranges = numerics.timestep_range(timestep, bounds).reshape(-1)
    present = torch.unique(ranges).tolist()  # the one host sync: which versions run
    if len(present) <= 1:
        return version(present[0] if present else 0, x)
    if x.dim() < 2 or x.shape[0] != ranges.numel():
        raise ValueError(f"{QLINEAR_TIMESTEP.display}: timestep {tuple(timestep.shape)} spans "
                         f"{len(present)} ranges, so each batch row needs its own, but x is "
                         f"{tuple(x.shape)} (its first dimension must be B={ranges.numel()})")
    out = x.new_empty((*x.shape[:-1], w_q[0].shape[0]), dtype=out_dtype)
    for i in present:
        rows = (ranges == i).nonzero().squeeze(1).to(x.device)
        out.index_copy_(0, rows, version(i, x.index_select(0, rows)))
    return out


@_define(QLINEAR_TIMESTEP)
def qlinear_timestep(x: Tensor, smooth: Tensor | None, rotation: list[Tensor], timestep: Tensor,
                     bounds: list[float], w_q: list[Tensor], w_scale: list[Tensor],
                     w_zero: list[Tensor | None], bias: Tensor | None, weight_bits: list[int],
                     act_bits: list[int], group_size: int, out_dtype: torch.dtype) -> Tensor:
    """A linear layer whose widths change with the diffusion timestep: one version per range.

    x: [..., K] fp32/bf16/fp16; smooth, rotation: as in ``viditq.quantize_act`` (shared by every
    version); timestep: 0-d or [B], any real dtype; bounds: ascending interior boundaries of
    the ``len(bounds) + 1`` ranges (``numerics.timestep_range``). Per version ``i``: w_q[i],
    w_scale[i], w_zero[i] (None: symmetric), weight_bits[i] as in ``viditq.qlinear``, and
    act_bits[i]; bias: [N] float or None; group_size as in ``qlinear``, the same for every
    version. Returns [..., N] of out_dtype.

    Version ``i`` is ``quantize_act(x, smooth, rotation, None, act_bits[i])`` then ``qlinear``
    with its weights. When every timestep falls in one range that version runs on all of x;
    otherwise x must be [B, ...] and each row runs its own range's version.
    """
    check_qlinear_timestep_args(x, smooth, rotation, timestep, bounds, w_q, w_scale, w_zero, bias,
                                weight_bits, act_bits, group_size, out_dtype)
    return qlinear_timestep_impl(x, smooth, rotation, timestep, bounds, w_q, w_scale, w_zero,
                                 bias, weight_bits, act_bits, group_size, out_dtype)


@qlinear_timestep.register_fake
def _qlinear_timestep_fake(x, smooth, rotation, timestep, bounds, w_q, w_scale, w_zero, bias,
                           weight_bits, act_bits, group_size, out_dtype):
    return x.new_empty((*x.shape[:-1], w_q[0].shape[0]), dtype=out_dtype)


ATTENTION_CHUNK_ELEMENTS = 1 << 24
"""Scores the CPU implementation holds at once (64 MiB of fp32): query rows are processed in chunks
of at most this many ``rows x Lk`` elements over all batch x head slices."""


def attention_impl(q: Tensor, k: Tensor, v: Tensor, scale: float, block_q: int, block_k: int,
                   chunk_rows: int | None = None) -> Tensor:
    """``viditq.attention`` on checked operands, on CPU (and any device without a kernel).

    The integer Q·Kᵀ runs as an fp32 batched GEMM of the int8-valued operands: exact (every partial
    sum is an integer below 2^24) for head dims up to ``numerics.attention.exact_fp32_max_d()``
    (1040; DiT heads are 64-128), one batched BLAS call where ``torch._int_mm`` (2-D only) would be
    one call per batch x head; larger head dims take the exact int64 ``int_scores``. Query rows
    run in chunks (``chunk_rows``, by default ``ATTENTION_CHUNK_ELEMENTS`` scores at a time) since
    softmax is row-wise; each chunk's operations are the reference's, so with one chunk the result
    is the reference's bit for bit, and with several only P·V's fp32 summation order may differ.
    """
    lq, lk = q.shape[-2], k.shape[-2]
    pv = attn.pv_dtype(q.dtype)
    qq, qs = attn.quantize_token_blocks(q, block_q)
    kq, ks = attn.quantize_token_blocks(attn.smooth_k(k), block_k)
    q_rows = (attn.expand_block_scales(qs, block_q, lq) * scale).unsqueeze(-1)
    k_cols = attn.expand_block_scales(ks, block_k, lk).unsqueeze(-2)
    exact_fp32 = q.shape[-1] <= attn.exact_fp32_max_d()
    kt = kq.to(torch.float32).transpose(-1, -2) if exact_fp32 else None
    vp = v.to(pv).to(torch.float32)
    slices = max(1, q[..., 0, 0].numel())
    rows = chunk_rows or max(1, ATTENTION_CHUNK_ELEMENTS // (slices * lk))
    out = attn.empty_output(q, v.shape[-1])
    for start in range(0, lq, rows):
        sl = slice(start, min(lq, start + rows))
        if kt is not None:
            acc = qq[..., sl, :].to(torch.float32) @ kt
        else:
            acc = attn.int_scores(qq[..., sl, :], kq).to(torch.float32)
        s = acc * q_rows[..., sl, :] * k_cols
        e = torch.exp(s - s.amax(dim=-1, keepdim=True))
        denom = e.sum(dim=-1, keepdim=True)
        out[..., sl, :] = ((e.to(pv).to(torch.float32) @ vp) / denom).to(q.dtype)
    return out


@_define(ATTENTION)
def attention(q: Tensor, k: Tensor, v: Tensor, scale: float, block_q: int = 128, block_k: int = 128) -> Tensor:
    """SageAttention-style quantized attention, ``softmax(q kᵀ · scale) v`` (``numerics.attention``).

    q: [..., Lq, D], k: [..., Lk, D], v: [..., Lk, Dv], fp32/bf16/fp16 (one dtype), SDPA's layout
    with the same leading (batch, head) dims; scale: the score scale (SDPA's default is
    ``1 / sqrt(D)``); block_q / block_k: tokens per int8 scale of Q / of K (1: per token). K is
    mean-subtracted over tokens, Q·Kᵀ is exact int32, softmax fp32, P·V 16-bit with fp32
    accumulation. Returns [..., Lq, Dv] in q's dtype, with SDPA's strides
    (``numerics.attention.empty_output``). No mask, causal masking, dropout or GQA.
    """
    attn.check_attention_args(q, k, v, scale, block_q, block_k, ATTENTION.display)
    return attention_impl(q, k, v, scale, block_q, block_k)


@attention.register_fake
def _attention_fake(q, k, v, scale, block_q=128, block_k=128):
    torch._check(q.shape[-1] == k.shape[-1],
                 lambda: f"{ATTENTION.display}: q head dim {q.shape[-1]} != k head dim {k.shape[-1]}")
    torch._check(k.shape[-2] == v.shape[-2],
                 lambda: f"{ATTENTION.display}: k has {k.shape[-2]} tokens, v has {v.shape[-2]}")
    return attn.empty_output(q, v.shape[-1])


def int8_weight(w_q: Tensor, w_zero: Tensor | None, weight_bits: int) -> Tensor:
    """The int8 [N, K] weight ``viditq.int8_mm`` multiplies by: unpacked (4-bit) and with the zero
    point subtracted (``numerics.zero_adjusted_weight``)."""
    wq = unpack_int4(w_q) if weight_bits == 4 else w_q
    return numerics.zero_adjusted_weight(wq, w_zero)


def int8_mm_impl(xq: Tensor, w_q: Tensor, w_zero: Tensor | None, weight_bits: int, w_scale: Tensor | None,
                 out_dtype: torch.dtype) -> Tensor:
    """``viditq.int8_mm`` on checked operands: oneDNN (``kernels.onednn_int8``, which keeps the
    unpacked, prepacked weight between calls) on a CPU where its self-test passed and the product
    dtype is one it writes, else ``torch._int_mm`` on ``int8_weight``; the same values either way
    (``numerics.int8_mm``)."""
    from viditq_compile.kernels import onednn_int8

    if xq.device.type == "cpu" and out_dtype in onednn_int8.OUT_DTYPES and onednn_int8.available():
        return onednn_int8.int8_mm(xq.contiguous(), w_q, w_scale, out_dtype,
                                   prepare=lambda: int8_weight(w_q, w_zero, weight_bits).contiguous(),
                                   also=w_zero)
    return numerics.int8_mm(xq, int8_weight(w_q, w_zero, weight_bits), w_scale, out_dtype,
                            gemm=numerics.int_gemm_fast)


@_define(INT8_MM)
def int8_mm(xq: Tensor, w_q: Tensor, w_zero: Tensor | None, weight_bits: int, w_scale: Tensor | None,
            out_dtype: torch.dtype) -> Tensor:
    """The integer GEMM with a float product, ``(xq @ Wᵀ).float() [* w_scale]`` cast to
    ``out_dtype``, W the int8 weight of ``int8_weight`` (``numerics.int8_mm``).

    xq: [M, K] int8; w_q: [N, K] int8 (weight_bits 8, symmetric: w_zero None) or packed uint8
    [N, K/2] (weight_bits 4); w_zero: [N] int32 or None; w_scale: [N] fp32 or None (then out_dtype
    must be fp32: the bare accumulator, exact below 2^24); out_dtype: fp32, bf16 or fp16. Returns
    [M, N]. The CPU decompositions of the linear ops call it with the per-token scale and bias after.
    """
    check_int8_mm_args(xq, w_q, w_zero, weight_bits, w_scale, out_dtype)
    return int8_mm_impl(xq, w_q, w_zero, weight_bits, w_scale, out_dtype)


@int8_mm.register_fake
def _int8_mm_fake(xq, w_q, w_zero, weight_bits, w_scale, out_dtype):
    k = w_q.shape[1] * (2 if weight_bits == 4 else 1)
    torch._check(xq.shape[-1] == k, lambda: f"{INT8_MM.display}: xq has {xq.shape[-1]} features, K={k}")
    return xq.new_empty((xq.shape[0], w_q.shape[0]), dtype=out_dtype)
