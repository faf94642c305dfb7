"""The operand contracts of the ``viditq`` ops: what each op accepts, checked before it computes.

``check_<op>_args`` raises ``ValueError`` naming the op and the bad operand. The ops' CPU
implementations and fakes (``ops/library.py``), their CUDA registrations (``ops/cuda.py``) and the
Triton kernels' wrappers (``kernels/``) all call these, so every route refuses the same operands
with the same message.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from viditq_compile.numerics import fp8
from viditq_compile.numerics import quant as numerics
from viditq_compile.ops import schema

__all__ = ["check_w8a8_args", "check_balance_args", "check_quantize_act_args",
           "check_quantize_act_fp8_args", "check_qlinear_args",
           "check_qweight_args", "check_qlinear_fused_args", "check_qlinear_timestep_args"]


def check_w8a8_args(x: Tensor, w_q: Tensor, w_scale: Tensor, w_zero: Tensor | None,
                    bias: Tensor | None, act_bits: int) -> None:
    """``viditq.w8a8_linear``'s operands."""
    op = schema.W8A8_LINEAR.display
    if not x.is_floating_point():
        raise ValueError(f"{op}: x must be floating point, got {x.dtype}")
    if w_q.dtype != torch.int8 or w_q.dim() != 2:
        raise ValueError(f"{op}: w_q must be a 2-D int8 tensor [N, K], got "
                         f"{w_q.dtype} {tuple(w_q.shape)}")
    n, k = w_q.shape
    if x.shape[-1] != k:
        raise ValueError(f"{op}: x has {x.shape[-1]} input features, weight "
                         f"expects K={k}")
    if w_scale.shape != (n,) or w_scale.dtype != torch.float32:
        raise ValueError(f"{op}: w_scale must be fp32 [{n}], got {w_scale.dtype} "
                         f"{tuple(w_scale.shape)}")
    if w_zero is not None and (w_zero.shape != (n,) or w_zero.dtype != torch.int32):
        raise ValueError(f"{op}: w_zero must be int32 [{n}], got {w_zero.dtype} "
                         f"{tuple(w_zero.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"{op}: bias must be [{n}], got {tuple(bias.shape)}")
    if act_bits not in numerics.SUPPORTED_ACT_BITS:
        raise ValueError(f"{op}: act_bits={act_bits} is not supported "
                         f"(supported: {numerics.SUPPORTED_ACT_BITS})")


def check_balance_args(x: Tensor, smooth: Tensor | None, rotation: list[Tensor],
                       op: schema.OpSchema = schema.BALANCE) -> None:
    """``viditq.balance``'s operands, and the balancing operands of ``op`` (``quantize_act``,
    ``qlinear_timestep``), which the messages name."""
    where = op.display
    if not x.is_floating_point() or x.dim() == 0:
        raise ValueError(f"{where}: x must be a floating point tensor [..., K], got {x.dtype} "
                         f"{tuple(x.shape)}")
    k = x.shape[-1]
    if smooth is not None and (smooth.shape != (k,) or smooth.dtype != torch.float32):
        raise ValueError(f"{where}: smooth must be fp32 [{k}], got {smooth.dtype} "
                         f"{tuple(smooth.shape)}")
    size = 1
    for i, r in enumerate(rotation):
        if r.dim() != 2 or r.shape[0] != r.shape[1] or r.dtype != torch.float32:
            raise ValueError(f"{where}: rotation[{i}] must be a square fp32 matrix, got "
                             f"{r.dtype} {tuple(r.shape)}")
        size *= r.shape[0]
    if rotation and size != k:
        raise ValueError(f"{where}: rotation factors multiply to {size}, x has K={k}")


def check_quantize_act_args(x: Tensor, smooth: Tensor | None, rotation: list[Tensor],
                            static_scale: Tensor | None, act_bits: int) -> None:
    """``viditq.quantize_act``'s operands."""
    op = schema.QUANTIZE_ACT.display
    check_balance_args(x, smooth, rotation, schema.QUANTIZE_ACT)
    if static_scale is not None and (static_scale.dim() != 0 or static_scale.dtype != torch.float32):
        raise ValueError(f"{op}: static_scale must be a 0-d fp32 tensor, got "
                         f"{static_scale.dtype} {tuple(static_scale.shape)}")
    if act_bits not in numerics.SUPPORTED_ACT_BITS:
        raise ValueError(f"{op}: act_bits={act_bits} is not supported "
                         f"(supported: {numerics.SUPPORTED_ACT_BITS})")


def check_quantize_act_fp8_args(x: Tensor, smooth: Tensor | None, rotation: list[Tensor]) -> None:
    """``viditq.quantize_act_fp8``'s operands: those of the balancing."""
    check_balance_args(x, smooth, rotation, schema.QUANTIZE_ACT_FP8)


def _act_dtype_ok(xq: Tensor, w_q: Tensor) -> bool:
    """int8 activations with integer weights, e4m3 with e4m3 (``numerics.fp8``)."""
    return xq.dtype == (fp8.E4M3 if fp8.is_fp8(w_q) else torch.int8)


def check_qlinear_args(xq: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor,
                       w_zero: Tensor | None, bias: Tensor | None, weight_bits: int,
                       group_size: int, out_dtype: torch.dtype) -> None:
    """``viditq.qlinear``'s operands."""
    op = schema.QLINEAR.display
    if not _act_dtype_ok(xq, w_q) or xq.dim() == 0:
        want = "an e4m3 tensor [..., K] (the weight is e4m3)" if fp8.is_fp8(w_q) else \
            "an int8 tensor [..., K]"
        raise ValueError(f"{op}: xq must be {want}, got {xq.dtype} {tuple(xq.shape)}")
    if x_scale.dtype != torch.float32 or x_scale.shape != (*xq.shape[:-1], 1):
        raise ValueError(f"{op}: x_scale must be fp32 {(*xq.shape[:-1], 1)}, got "
                         f"{x_scale.dtype} {tuple(x_scale.shape)}")
    check_qweight_args(op, xq.shape[-1], w_q, w_scale, w_zero, bias, weight_bits, group_size,
                       out_dtype)


def check_int8_mm_args(xq: Tensor, w_q: Tensor, w_zero: Tensor | None, weight_bits: int,
                       w_scale: Tensor | None, out_dtype: torch.dtype) -> None:
    """``viditq.int8_mm``'s operands."""
    op = schema.INT8_MM.display
    if xq.dtype != torch.int8 or xq.dim() != 2:
        raise ValueError(f"{op}: xq must be an int8 tensor [M, K], got {xq.dtype} {tuple(xq.shape)}")
    k = xq.shape[1]
    if weight_bits == 8:
        if w_q.dtype != torch.int8 or w_q.dim() != 2 or w_q.shape[1] != k:
            raise ValueError(f"{op}: w_q for 8-bit weights must be int8 [N, K={k}], got "
                             f"{w_q.dtype} {tuple(w_q.shape)}")
        if w_zero is not None:
            raise ValueError(f"{op}: 8-bit weights must be symmetric here (w_zero None): their codes "
                             f"minus a zero point can leave int8")
    elif weight_bits == 4:
        if w_q.dtype != torch.uint8 or w_q.dim() != 2 or w_q.shape[1] * 2 != k:
            raise ValueError(f"{op}: w_q for 4-bit weights must be packed uint8 [N, K/2] with K={k}, "
                             f"got {w_q.dtype} {tuple(w_q.shape)}")
    else:
        raise ValueError(f"{op}: weight_bits={weight_bits} (supported: 4, 8)")
    n = w_q.shape[0]
    if w_zero is not None and (w_zero.dtype != torch.int32 or tuple(w_zero.shape) != (n,)):
        raise ValueError(f"{op}: w_zero must be None or int32 [{n}], got {w_zero.dtype} "
                         f"{tuple(w_zero.shape)}")
    if w_scale is not None and (w_scale.dtype != torch.float32 or tuple(w_scale.shape) != (n,)):
        raise ValueError(f"{op}: w_scale must be None or fp32 [{n}], got "
                         f"{w_scale.dtype} {tuple(w_scale.shape)}")
    if out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{op}: out_dtype={out_dtype} (supported: fp32, bf16, fp16)")
    if w_scale is None and out_dtype != torch.float32:
        raise ValueError(f"{op}: out_dtype={out_dtype} without w_scale would round the integer "
                         f"accumulator itself to 16 bits; use fp32 or pass w_scale")


def check_qweight_args(where: str, k: int, w_q: Tensor, w_scale: Tensor, w_zero: Tensor | None,
                       bias: Tensor | None, weight_bits: int, group_size: int,
                       out_dtype: torch.dtype) -> None:
    """The weight-side operands of ``qlinear`` for an activation of K=k; ``where`` prefixes the
    ``ValueError`` (op name, and the version for ``qlinear_timestep``)."""
    def fail(msg: str) -> None:
        raise ValueError(f"{where}: {msg}")

    if weight_bits not in numerics.SUPPORTED_WEIGHT_BITS:
        fail(f"weight_bits={weight_bits} is not supported (supported: {numerics.SUPPORTED_WEIGHT_BITS})")
    if fp8.is_fp8(w_q):
        if weight_bits != 8 or w_q.dim() != 2 or w_q.shape[1] != k or group_size or w_zero is not None:
            fail(f"e4m3 weights must be [N, K={k}] with weight_bits=8, group_size=0 and no w_zero, got "
                 f"{tuple(w_q.shape)}, weight_bits={weight_bits}, group_size={group_size}, "
                 f"w_zero {'given' if w_zero is not None else 'None'}")
    elif weight_bits == 4:
        if w_q.dtype != torch.uint8 or w_q.dim() != 2 or k % 2 or w_q.shape[1] * 2 != k:
            fail(f"w_q for 4-bit weights must be packed uint8 [N, K/2] with K={k} even, got "
                 f"{w_q.dtype} {tuple(w_q.shape)}")
    elif w_q.dtype != torch.int8 or w_q.dim() != 2 or w_q.shape[1] != k:
        fail(f"w_q for 8-bit weights must be int8 [N, K={k}], got {w_q.dtype} {tuple(w_q.shape)}")
    n = w_q.shape[0]
    if group_size < 0 or (group_size and k % group_size):
        fail(f"group_size={group_size} must be 0 (per channel) or a positive divisor of K={k}")
    scale_shape = (n, k // group_size) if group_size else (n,)
    if w_scale.dtype != torch.float32 or w_scale.shape != scale_shape:
        fail(f"w_scale must be fp32 {scale_shape}, got {w_scale.dtype} {tuple(w_scale.shape)}")
    if w_zero is not None and (w_zero.dtype != torch.int32 or w_zero.shape != scale_shape):
        fail(f"w_zero must be int32 {scale_shape}, got {w_zero.dtype} {tuple(w_zero.shape)}")
    if bias is not None and (bias.shape != (n,) or not bias.is_floating_point()):
        fail(f"bias must be a float [{n}], got {bias.dtype} {tuple(bias.shape)}")
    if not out_dtype.is_floating_point:
        fail(f"out_dtype must be a float dtype, got {out_dtype}")


def check_qlinear_fused_args(xq: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor,
                             w_zero: Tensor | None, bias: Tensor | None, weight_bits: int,
                             group_size: int, out_dtype: torch.dtype, activation: str,
                             gate: Tensor | None, residual: Tensor | None, packed_act: bool) -> None:
    """``viditq.qlinear_fused``'s operands (also what ``kernels.int_gemm.qlinear_triton`` takes)."""
    op = schema.QLINEAR_FUSED.display
    if weight_bits not in numerics.SUPPORTED_WEIGHT_BITS:
        raise ValueError(f"{op}: weight_bits={weight_bits} is not supported (supported: "
                         f"{numerics.SUPPORTED_WEIGHT_BITS})")
    if w_q.dim() != 2:
        raise ValueError(f"{op}: w_q must be 2-D, got {tuple(w_q.shape)}")
    k = w_q.shape[1] * (2 if weight_bits == 4 else 1)
    if packed_act:
        if xq.dtype != torch.uint8 or xq.dim() == 0 or xq.shape[-1] * 2 != k:
            raise ValueError(f"{op}: packed_act=True needs xq as packed int4 uint8 [..., K/2] with "
                             f"K={k} (the weight's), got {xq.dtype} {tuple(xq.shape)}")
    elif not _act_dtype_ok(xq, w_q) or xq.dim() == 0:
        want = "an e4m3 tensor [..., K] (the weight is e4m3)" if fp8.is_fp8(w_q) else \
            "an int8 tensor [..., K]"
        raise ValueError(f"{op}: xq must be {want}, got {xq.dtype} {tuple(xq.shape)}")
    if x_scale.dtype != torch.float32 or x_scale.shape != (*xq.shape[:-1], 1):
        raise ValueError(f"{op}: x_scale must be fp32 {(*xq.shape[:-1], 1)}, got {x_scale.dtype} "
                         f"{tuple(x_scale.shape)}")
    check_qweight_args(op, k, w_q, w_scale, w_zero, bias, weight_bits, group_size, out_dtype)
    if activation not in numerics.EPILOGUE_ACTIVATIONS:
        raise ValueError(f"{op}: activation={activation!r} is not supported (supported: "
                         f"{numerics.EPILOGUE_ACTIVATIONS})")
    out_shape = (*xq.shape[:-1], w_q.shape[0])
    if gate is not None:
        if not gate.is_floating_point():
            raise ValueError(f"{op}: gate must be a float tensor, got {gate.dtype}")
        try:
            numerics.epilogue_gate_rows(out_shape, gate.shape)
        except ValueError as e:
            raise ValueError(f"{op}: {e}") from None
    if residual is not None and (not residual.is_floating_point()
                                 or tuple(residual.shape) != out_shape):
        raise ValueError(f"{op}: residual must be a float tensor of the output's shape {out_shape}, "
                         f"got {residual.dtype} {tuple(residual.shape)}")


def check_qlinear_timestep_args(x: Tensor, smooth: Tensor | None, rotation: list[Tensor],
                                timestep: Tensor, bounds: list[float], w_q: list[Tensor],
                                w_scale: list[Tensor], w_zero: list[Tensor | None],
                                bias: Tensor | None, weight_bits: list[int], act_bits: list[int],
                                group_size: int, out_dtype: torch.dtype) -> None:
    """``viditq.qlinear_timestep``'s operands."""
    op = schema.QLINEAR_TIMESTEP.display
    check_balance_args(x, smooth, rotation, schema.QLINEAR_TIMESTEP)
    if timestep.dim() > 1 or timestep.dtype == torch.bool or timestep.is_complex():
        raise ValueError(f"{op}: timestep must be a real 0-d or [B] tensor, got {timestep.dtype} "
                         f"{tuple(timestep.shape)}")
    if any(not math.isfinite(b) for b in bounds) or list(bounds) != sorted(set(bounds)):
        raise ValueError(f"{op}: bounds must be strictly ascending finite numbers, got {list(bounds)}")
    versions = len(bounds) + 1
    for name, seq in (("w_q", w_q), ("w_scale", w_scale), ("w_zero", w_zero),
                      ("weight_bits", weight_bits), ("act_bits", act_bits)):
        if len(seq) != versions:
            raise ValueError(f"{op}: {name} has {len(seq)} entries; {len(bounds)} bounds make "
                             f"{versions} timestep ranges, one version each")
    for i in range(versions):
        where = f"{op} (version {i})"
        if act_bits[i] not in numerics.SUPPORTED_ACT_BITS:
            raise ValueError(f"{where}: act_bits={act_bits[i]} is not supported (supported: "
                             f"{numerics.SUPPORTED_ACT_BITS})")
        if fp8.is_fp8(w_q[i]):
            raise ValueError(f"{where}: e4m3 weights have no timestep-dependent op (an fp8 layer "
                             f"has one format at every timestep)")
        check_qweight_args(where, x.shape[-1], w_q[i], w_scale[i], w_zero[i], bias,
                           weight_bits[i], group_size, out_dtype)
        if w_q[i].shape[0] != w_q[0].shape[0]:
            raise ValueError(f"{where}: w_q has N={w_q[i].shape[0]} output features, version 0 "
                             f"has N={w_q[0].shape[0]}")
