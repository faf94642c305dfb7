"""The fused GEMM tail every quantized GEMM kernel shares: bias, activation, gate, residual, one
cast and the store, in fp32 after the dequantization (``numerics.quant.epilogue`` is the
reference; its order and formulas are the ones below).

``store_epilogue`` is a ``@triton.jit`` helper, inlined into the kernel that calls it, so that the
int8 / int4 GEMM (``kernels.int_gemm``), the e4m3 GEMM and the epilogue that follows cuBLAS'
``torch._int_mm`` compute one tail, not three copies of it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import triton
import triton.language as tl
from torch import Tensor

from viditq_compile.numerics import quant as numerics

_SQRT_2_OVER_PI = tl.constexpr(math.sqrt(2.0 / math.pi))  # gelu_tanh


class TailOperands(NamedTuple):
    """``store_epilogue``'s host-side operands: pointers (a dummy where the operand is absent, with
    stride 0) and strides."""

    bias: Tensor
    stride_b: int
    rows_per_gate: int
    gate: Tensor
    stride_g: tuple[int, int]
    residual: Tensor
    stride_r: tuple[int, int]


def tail_operands(bias: Tensor | None, gate: Tensor | None, residual: Tensor | None, out: Tensor,
                  lead: tuple[int, ...], dummy: Tensor) -> TailOperands:
    """The tail's operands for an [M, N] ``out`` whose rows are the activations' leading dims
    ``lead``, for checked bias / gate / residual: the gate as a 2-D view of its broadcast shape
    (its strides say where rows lie, ``numerics.epilogue_gate_rows`` how many output rows share
    one), the residual as [M, N]. ``dummy`` stands in for absent operands."""
    m, n = out.shape
    b, stride_b = (bias, bias.stride(0)) if bias is not None else (dummy, 0)
    rows_per_gate, g2, stride_g = 1, dummy, (0, 0)
    if gate is not None:
        rows_per_gate = numerics.epilogue_gate_rows((*lead, n), gate.shape)
        g2 = gate.reshape(-1, n)
        stride_g = (g2.stride(0), g2.stride(1))
    r2, stride_r = dummy, (0, 0)
    if residual is not None:
        r2 = residual.reshape(m, n)
        stride_r = (r2.stride(0), r2.stride(1))
    return TailOperands(b, stride_b, rows_per_gate, g2, stride_g, r2, stride_r)


@triton.jit
def store_epilogue(out, offs_m, offs_n, mask_m, mask_n, b_ptr, g_ptr, r_ptr, out_ptr, ROWS_PER_GATE, stride_b,
                   stride_gm, stride_gn, stride_rm, stride_rn, stride_om, stride_on,
                   HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_GATE: tl.constexpr,
                   HAS_RESIDUAL: tl.constexpr):
    """Store ``epilogue(out)`` for one [BLOCK_M, BLOCK_N] fp32 tile at rows ``offs_m``, columns
    ``offs_n`` of out_ptr (its element type is the output dtype).

    b: [N] float at stride stride_b (HAS_BIAS); ACTIVATION: "none", "gelu_tanh" or "silu" (after
    the bias); g: float, row m reads gate row ``m // ROWS_PER_GATE`` (HAS_GATE); r: [M, N] float
    (HAS_RESIDUAL). Row offsets are int64 (M·N may pass 2^31).

    ``gelu_tanh`` uses ``tanh(|u|) = (1 - e) / (1 + e)`` with ``e = exp(-2|u|)`` and ``silu`` is
    ``x * sigmoid(x)`` from ``exp(-|x|)``: neither overflows."""
    rows_m = offs_m.to(tl.int64)
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_n * stride_b, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION == "gelu_tanh":
        u = _SQRT_2_OVER_PI * (out + 0.044715 * out * out * out)
        e = tl.exp(-2.0 * tl.abs(u))
        t = (1.0 - e) / (1.0 + e)
        out = 0.5 * out * (1.0 + tl.where(u < 0, -t, t))
    elif ACTIVATION == "silu":
        e = tl.exp(-tl.abs(out))
        out = out * tl.where(out < 0, e, 1.0) / (1.0 + e)
    mask_mn = mask_m[:, None] & mask_n[None, :]
    if HAS_GATE:
        g_rows = (offs_m // ROWS_PER_GATE).to(tl.int64)
        gate = tl.load(g_ptr + g_rows[:, None] * stride_gm + offs_n[None, :] * stride_gn, mask=mask_mn, other=0.0)
        out = out * gate.to(tl.float32)
    if HAS_RESIDUAL:
        res = tl.load(r_ptr + rows_m[:, None] * stride_rm + offs_n[None, :] * stride_rn, mask=mask_mn, other=0.0)
        out = out + res.to(tl.float32)
    out_ptrs = out_ptr + rows_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_mn)
