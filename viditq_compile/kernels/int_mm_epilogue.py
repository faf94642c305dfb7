"""The epilogue after cuBLAS' ``torch._int_mm``: a Triton kernel that reads the int32 [M, N] product
and writes what ``kernels.int_gemm``'s fused epilogue writes, and ``int_mm_qlinear``, the whole
route (``torch._int_mm`` then this kernel) that ``kernels.gemm_choice`` weighs against the Triton GEMM.

``int_mm_epilogue_triton`` computes what ``numerics.quant.dequantize_epilogue`` then
``numerics.quant.epilogue`` compute (the reference, side by side):

- ``acc -= x_rowsum * zero`` in int32 (asymmetric weights; ``x_rowsum`` is the per-token sum of
  the int8 activations, ``int_mm_qlinear`` computes it in torch);
- ``acc.float() * x_scale * w_scale`` left to right in fp32;
- then ``kernels.epilogue.store_epilogue``: bias, optional ``"gelu_tanh"`` / ``"silu"``, ``* gate``
  (``[N]``, ``[B, 1, N]`` for ``[B, T, N]``, or per row), ``+ residual``, one cast to ``out_dtype``.

Tolerances (what ``tests/kernels/test_int_mm_epilogue.py`` checks): the integer part is exact
(``torch._int_mm`` is an int32 GEMM, bit-exact with ``numerics.int_gemm_ref``); the float part does
the reference's fp32 operations in its order, bit-exact under ``TRITON_INTERPRET=1`` (no FMA
contraction; ptxas may contract ``acc * xs * ws + bias`` on a GPU: 1 ulp); the activations within
2e-6 (fp32) of torch's ``gelu(approximate="tanh")`` / ``silu``, as for the Triton GEMM.

Which calls may take this route: ``gemm_choice.int_mm_unsupported_reason`` (int8 x int8, per
channel, M > 16, K and N multiples of 8). CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1``
set before this module is imported (one fixed block config then; ``torch._int_mm`` runs on the CPU).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from viditq_compile.kernels.epilogue import store_epilogue, tail_operands
from viditq_compile.kernels.gemm_choice import int_mm_unsupported_reason
from viditq_compile.kernels.launch import device_guard
from viditq_compile.numerics import quant as numerics
from viditq_compile.numerics.contracts import check_qlinear_fused_args

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE = os.environ.get("VIDITQ_AUTOTUNE", "1") != "0"
"""``VIDITQ_AUTOTUNE=0`` (read at import): the first config only, no autotuning."""

# (BLOCK_M, BLOCK_N, num_warps): a pointwise pass over [M, N] (int32 in, 16-bit out, optional
# residual), bandwidth-bound; 16-byte vector loads want BLOCK_N >= 128 with rows contiguous.
EPILOGUE_CONFIGS = [
    (64, 128, 4),
    (32, 256, 4),
    (128, 128, 8),
    (64, 256, 8),
    (16, 256, 4),
]
INTERPRET_CONFIG = (16, 32)
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # fp64: exact cast of fp32


@triton.jit
def _int_mm_epilogue_kernel(
    acc_ptr, xs_ptr, ws_ptr, wz_ptr, rs_ptr, b_ptr, g_ptr, r_ptr, out_ptr,
    M, N, M_BUCKET, ROWS_PER_GATE,
    stride_am, stride_an, stride_b, stride_gm, stride_gn, stride_rm, stride_rn, stride_om, stride_on,
    HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_GATE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[M, N] = epilogue(acc[M, N]), one [BLOCK_M, BLOCK_N] tile per program.

    acc: [M, N] int32 (``torch._int_mm``'s result); xs: [M] fp32; ws: [N] fp32, wz: [N] int32 and
    rs: [M] int32 (HAS_ZERO: the zero points and the activations' row sums); b: [N] float
    (HAS_BIAS); g: [M / ROWS_PER_GATE, N] float (HAS_GATE); r: [M, N] float (HAS_RESIDUAL);
    out: [M, N] fp32/bf16/fp16. Row offsets are int64 (M·N may pass 2^31)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows_m = offs_m.to(tl.int64)
    mask_mn = mask_m[:, None] & mask_n[None, :]
    acc = tl.load(acc_ptr + rows_m[:, None] * stride_am + offs_n[None, :] * stride_an, mask=mask_mn, other=0)
    if HAS_ZERO:
        rowsum = tl.load(rs_ptr + offs_m, mask=mask_m, other=0)
        zero = tl.load(wz_ptr + offs_n, mask=mask_n, other=0)
        acc -= rowsum[:, None] * zero[None, :]
    xs = tl.load(xs_ptr + offs_m, mask=mask_m, other=0.0)
    ws = tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0)
    out = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    store_epilogue(out, offs_m, offs_n, mask_m, mask_n, b_ptr, g_ptr, r_ptr, out_ptr, ROWS_PER_GATE, stride_b,
                   stride_gm, stride_gn, stride_rm, stride_rn, stride_om, stride_on, HAS_BIAS, ACTIVATION, HAS_GATE,
                   HAS_RESIDUAL)


def autotune_configs() -> list:
    """``EPILOGUE_CONFIGS`` as ``triton.Config`` objects."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w) for bm, bn, w in EPILOGUE_CONFIGS]


def _prune_configs(configs, nargs, **kwargs):
    return configs if AUTOTUNE else configs[:1]


if INTERPRET:
    _launch_kernel = None
else:
    _launch_kernel = triton.autotune(
        configs=autotune_configs(),
        key=["M_BUCKET", "N", "HAS_ZERO", "HAS_BIAS", "ACTIVATION", "HAS_GATE", "HAS_RESIDUAL"],
        prune_configs_by={"early_config_prune": _prune_configs},
    )(_int_mm_epilogue_kernel)


def int_mm_epilogue_triton(acc: Tensor, x_scale: Tensor, w_scale: Tensor, w_zero: Tensor | None,
                           x_rowsum: Tensor | None, bias: Tensor | None, out_dtype: torch.dtype,
                           activation: str = "none", gate: Tensor | None = None,
                           residual: Tensor | None = None, lead: tuple[int, ...] | None = None) -> Tensor:
    """``numerics.dequantize_epilogue`` then ``numerics.epilogue`` and the cast, as one kernel.

    acc: [M, N] int32; x_scale: M fp32 values (any shape, e.g. [..., 1]); w_scale: [N] fp32;
    w_zero: [N] int32 or None (symmetric); x_rowsum: M int32 values, given exactly when w_zero
    is; bias: [N] float or None; out_dtype: fp32/bf16/fp16 (or fp64, the fp32 value widened); activation: one of
    ``numerics.EPILOGUE_ACTIVATIONS``; gate: float broadcast along the rows of ``(*lead, N)``
    (``numerics.epilogue_gate_rows``) or None; residual: float ``(*lead, N)`` or None; lead: the
    leading dims of the output (default ``(M,)``, their product must be M).
    Returns ``(*lead, N)`` of out_dtype. Raises ``ValueError`` naming the bad operand."""
    op = "int_mm_epilogue_triton"
    if acc.dtype != torch.int32 or acc.dim() != 2:
        raise ValueError(f"{op}: acc must be int32 [M, N], got {acc.dtype} {tuple(acc.shape)}")
    m, n = acc.shape
    lead = (m,) if lead is None else tuple(lead)
    if _prod(lead) != m:
        raise ValueError(f"{op}: lead={lead} has {_prod(lead)} rows, acc has M={m}")
    if x_scale.dtype != torch.float32 or x_scale.numel() != m:
        raise ValueError(f"{op}: x_scale must hold M={m} fp32 values, got {x_scale.dtype} {tuple(x_scale.shape)}")
    if w_scale.dtype != torch.float32 or tuple(w_scale.shape) != (n,):
        raise ValueError(f"{op}: w_scale must be fp32 [N={n}], got {w_scale.dtype} {tuple(w_scale.shape)}")
    if (w_zero is None) != (x_rowsum is None):
        raise ValueError(f"{op}: w_zero and x_rowsum come together (zero-point correction), got "
                         f"w_zero={'None' if w_zero is None else 'a tensor'}, "
                         f"x_rowsum={'None' if x_rowsum is None else 'a tensor'}")
    if w_zero is not None and (w_zero.dtype != torch.int32 or tuple(w_zero.shape) != (n,)):
        raise ValueError(f"{op}: w_zero must be int32 [N={n}], got {w_zero.dtype} {tuple(w_zero.shape)}")
    if x_rowsum is not None and (x_rowsum.dtype != torch.int32 or x_rowsum.numel() != m):
        raise ValueError(f"{op}: x_rowsum must hold M={m} int32 values, got {x_rowsum.dtype} "
                         f"{tuple(x_rowsum.shape)}")
    if bias is not None and (not bias.is_floating_point() or tuple(bias.shape) != (n,)):
        raise ValueError(f"{op}: bias must be a float [N={n}], got {bias.dtype} {tuple(bias.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"{op}: out_dtype={out_dtype} (supported: {OUT_DTYPES})")
    if activation not in numerics.EPILOGUE_ACTIVATIONS:
        raise ValueError(f"{op}: activation={activation!r} (supported: {numerics.EPILOGUE_ACTIVATIONS})")
    if gate is not None:
        if not gate.is_floating_point():
            raise ValueError(f"{op}: gate must be a float tensor, got {gate.dtype}")
        numerics.epilogue_gate_rows((*lead, n), gate.shape)  # raises naming the shapes
    if residual is not None and (not residual.is_floating_point() or tuple(residual.shape) != (*lead, n)):
        raise ValueError(f"{op}: residual must be a float tensor of shape {(*lead, n)}, got {residual.dtype} "
                         f"{tuple(residual.shape)}")
    operands = [acc, x_scale, w_scale] + [t for t in (w_zero, x_rowsum, bias, gate, residual) if t is not None]
    if any(t.device != acc.device for t in operands):
        raise ValueError(f"{op}: all operands must be on one device, got {sorted({str(t.device) for t in operands})}")
    if acc.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"{op}: needs CUDA tensors (got {acc.device}) or TRITON_INTERPRET=1 set before "
                         "importing viditq_compile.kernels.int_mm_epilogue")
    out = torch.empty((m, n), dtype=out_dtype, device=acc.device)
    if m == 0:
        return out.reshape(*lead, n)
    args, flags = kernel_args(acc, x_scale, w_scale, w_zero, x_rowsum, bias, gate, residual, out, activation, lead)
    with device_guard(acc.device):
        if INTERPRET:
            bm, bn = INTERPRET_CONFIG
            _int_mm_epilogue_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](*args, **flags, BLOCK_M=bm, BLOCK_N=bn)
        else:
            def grid(meta):
                return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))
            _launch_kernel[grid](*args, **flags)  # type: ignore[index]  # set when not INTERPRET
    return out.reshape(*lead, n)


def _prod(dims) -> int:
    p = 1
    for d in dims:
        p *= int(d)
    return p


def kernel_args(acc: Tensor, x_scale: Tensor, w_scale: Tensor, w_zero: Tensor | None, x_rowsum: Tensor | None,
                bias: Tensor | None, gate: Tensor | None, residual: Tensor | None, out: Tensor, activation: str,
                lead: tuple[int, ...]) -> tuple[tuple, dict]:
    """The positional arguments and constexpr flags of ``_int_mm_epilogue_kernel`` (block sizes
    aside) for checked operands; shared by the launch and ``kernels.aot`` (meta tensors)."""
    m, n = out.shape
    xs = x_scale.reshape(-1).contiguous()
    ws = w_scale.contiguous()
    wz = w_zero.contiguous() if w_zero is not None else ws  # dummy pointers for absent operands
    rs = x_rowsum.reshape(-1).contiguous() if x_rowsum is not None else xs
    b, stride_b, rows_per_gate, g2, stride_g, r2, stride_r = tail_operands(bias, gate, residual, out, lead, ws)
    args = (acc, xs, ws, wz, rs, b, g2, r2, out, m, n, triton.next_power_of_2(max(min(m, 65536), 16)),
            rows_per_gate, acc.stride(0), acc.stride(1), stride_b, *stride_g, *stride_r, out.stride(0),
            out.stride(1))
    flags = dict(HAS_ZERO=w_zero is not None, HAS_BIAS=bias is not None, ACTIVATION=activation,
                 HAS_GATE=gate is not None, HAS_RESIDUAL=residual is not None)
    return args, flags


def int_mm_qlinear(xq: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, w_zero: Tensor | None,
                   bias: Tensor | None, out_dtype: torch.dtype, activation: str = "none",
                   gate: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
    """W8A8 ``viditq.qlinear_fused`` (per channel, int8 activations) as ``torch._int_mm`` (cuBLASLt's
    int8 GEMM, int32 out) then ``int_mm_epilogue_triton``.

    xq: [..., K] int8; x_scale: [..., 1] fp32; w_q: [N, K] int8 (row-major: ``w_q.t()`` is the
    column-major [K, N] cuBLASLt wants); w_scale: [N] fp32; w_zero: [N] int32 or None; bias,
    activation, gate, residual as ``int_gemm.qlinear_triton``. Returns [..., N] of out_dtype.
    Raises ``ValueError`` for operands ``viditq.qlinear_fused`` refuses and for calls
    ``torch._int_mm`` cannot take (``gemm_choice.int_mm_unsupported_reason``)."""
    check_qlinear_fused_args(xq, x_scale, w_q, w_scale, w_zero, bias, 8, 0, out_dtype, activation, gate,
                             residual, False)
    n, k = w_q.shape
    lead = tuple(xq.shape[:-1])
    x2 = xq.reshape(-1, k)
    m = x2.shape[0]
    reason = int_mm_unsupported_reason(m, n, k, 8, 0, fp8=xq.dtype != torch.int8)
    if reason is not None:
        raise ValueError(f"int_mm_qlinear: {reason}")
    acc = torch._int_mm(x2, w_q.t())
    rowsum = x2.sum(dim=-1, dtype=torch.int32) if w_zero is not None else None
    return int_mm_epilogue_triton(acc, x_scale, w_scale, w_zero, rowsum, bias, out_dtype, activation, gate,
                                  residual, lead)
