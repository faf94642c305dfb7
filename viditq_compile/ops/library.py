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
``qlinear`` (int8 or packed int4 weights, per channel or grouped); ``qlinear_timestep`` (a
layer whose widths change with the diffusion timestep: one ``quantize_act`` + ``qlinear``
version per timestep range, picked at run time from the timestep tensor, so one graph serves
every sampling step); ``qlinear_fused`` (``qlinear`` plus its activation / gate / residual
tail and optionally packed 4-bit activations; only compiled CUDA graphs hold it).
Each checks its operands (``ValueError`` naming the bad one) and computes with ``numerics`` plus
``torch._int_mm``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from viditq_compile.numerics import quant as numerics
from viditq_compile.numerics.packing import unpack_int4


def _check_w8a8_args(x: Tensor, w_q: Tensor, w_scale: Tensor, w_zero: Tensor | None,
                     bias: Tensor | None, act_bits: int) -> None:
    if not x.is_floating_point():
        raise ValueError(f"viditq.w8a8_linear: x must be floating point, got {x.dtype}")
    if w_q.dtype != torch.int8 or w_q.dim() != 2:
        raise ValueError(f"viditq.w8a8_linear: w_q must be a 2-D int8 tensor [N, K], got "
                         f"{w_q.dtype} {tuple(w_q.shape)}")
    n, k = w_q.shape
    if x.shape[-1] != k:
        raise ValueError(f"viditq.w8a8_linear: x has {x.shape[-1]} input features, weight "
                         f"expects K={k}")
    if w_scale.shape != (n,) or w_scale.dtype != torch.float32:
        raise ValueError(f"viditq.w8a8_linear: w_scale must be fp32 [{n}], got {w_scale.dtype} "
                         f"{tuple(w_scale.shape)}")
    if w_zero is not None and (w_zero.shape != (n,) or w_zero.dtype != torch.int32):
        raise ValueError(f"viditq.w8a8_linear: w_zero must be int32 [{n}], got {w_zero.dtype} "
                         f"{tuple(w_zero.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"viditq.w8a8_linear: bias must be [{n}], got {tuple(bias.shape)}")
    if act_bits not in numerics.SUPPORTED_ACT_BITS:
        raise ValueError(f"viditq.w8a8_linear: act_bits={act_bits} is not supported "
                         f"(supported: {numerics.SUPPORTED_ACT_BITS})")


@torch.library.custom_op("viditq::w8a8_linear", mutates_args=())
def w8a8_linear(x: Tensor, w_q: Tensor, w_scale: Tensor, w_zero: Tensor | None,
                bias: Tensor | None, act_bits: int = 8) -> Tensor:
    """Quantized linear layer with int8 per-channel weights and dynamic per-token activations.

    x: [..., K] fp32/bf16/fp16; w_q: [N, K] int8 row-major; w_scale: [N] fp32;
    w_zero: [N] int32 or None (symmetric weights); bias: [N] or None.
    Returns [..., N] in x's dtype. Numerics: ``numerics.w8a8_linear``.
    """
    _check_w8a8_args(x, w_q, w_scale, w_zero, bias, act_bits)
    return numerics.w8a8_linear(x, w_q, w_scale, w_zero, bias, act_bits,
                                gemm=numerics.int_gemm_fast)


@w8a8_linear.register_fake
def _w8a8_linear_fake(x, w_q, w_scale, w_zero, bias, act_bits=8):
    torch._check(x.shape[-1] == w_q.shape[1],
                 lambda: f"viditq.w8a8_linear: x has {x.shape[-1]} features, K={w_q.shape[1]}")
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))


def _check_balance_args(op: str, x: Tensor, smooth: Tensor | None, rotation: list[Tensor]) -> None:
    if not x.is_floating_point() or x.dim() == 0:
        raise ValueError(f"viditq.{op}: x must be a floating point tensor [..., K], got {x.dtype} "
                         f"{tuple(x.shape)}")
    k = x.shape[-1]
    if smooth is not None and (smooth.shape != (k,) or smooth.dtype != torch.float32):
        raise ValueError(f"viditq.{op}: smooth must be fp32 [{k}], got {smooth.dtype} "
                         f"{tuple(smooth.shape)}")
    size = 1
    for i, r in enumerate(rotation):
        if r.dim() != 2 or r.shape[0] != r.shape[1] or r.dtype != torch.float32:
            raise ValueError(f"viditq.{op}: rotation[{i}] must be a square fp32 matrix, got "
                             f"{r.dtype} {tuple(r.shape)}")
        size *= r.shape[0]
    if rotation and size != k:
        raise ValueError(f"viditq.{op}: rotation factors multiply to {size}, x has K={k}")


def _balance_impl(x: Tensor, smooth: Tensor | None, rotation: list[Tensor]) -> Tensor:
    out = numerics.balance_activation(x, smooth, rotation).to(x.dtype)
    return out.clone() if out is x else out  # an op's output must not alias its input


@torch.library.custom_op("viditq::balance", mutates_args=())
def balance(x: Tensor, smooth: Tensor | None, rotation: list[Tensor]) -> Tensor:
    """The activation side of channel balancing, ``(x * smooth) @ kron(*rotation)``.

    x: [..., K] fp32/bf16/fp16; smooth: [K] fp32 or None; rotation: ``kron_factors``-style
    square fp32 factors whose orders multiply to K, or ``[]``. Computed in fp32
    (``numerics.balance_activation``), returned as [..., K] in x's dtype.
    """
    _check_balance_args("balance", x, smooth, rotation)
    return _balance_impl(x, smooth, rotation)


@balance.register_fake
def _balance_fake(x, smooth, rotation):
    return torch.empty_like(x)


@torch.library.custom_op("viditq::quantize_act", mutates_args=())
def quantize_act(x: Tensor, smooth: Tensor | None, rotation: list[Tensor], static_scale: Tensor | None,
                 act_bits: int = 8) -> tuple[Tensor, Tensor]:
    """Balance and quantize an activation (``numerics.quantize_act``).

    x: [..., K] fp32/bf16/fp16; smooth, rotation: as in ``viditq.balance``; static_scale: 0-d
    fp32 (static per-tensor) or None (dynamic per token). Returns q: [..., K] int8 and
    scale: [..., 1] fp32.
    """
    _check_quantize_act_args(x, smooth, rotation, static_scale, act_bits)
    return numerics.quantize_act(x, smooth, rotation, static_scale, act_bits)


def _check_quantize_act_args(x: Tensor, smooth: Tensor | None, rotation: list[Tensor],
                             static_scale: Tensor | None, act_bits: int) -> None:
    _check_balance_args("quantize_act", x, smooth, rotation)
    if static_scale is not None and (static_scale.dim() != 0 or static_scale.dtype != torch.float32):
        raise ValueError(f"viditq.quantize_act: static_scale must be a 0-d fp32 tensor, got "
                         f"{static_scale.dtype} {tuple(static_scale.shape)}")
    if act_bits not in numerics.SUPPORTED_ACT_BITS:
        raise ValueError(f"viditq.quantize_act: act_bits={act_bits} is not supported "
                         f"(supported: {numerics.SUPPORTED_ACT_BITS})")


@quantize_act.register_fake
def _quantize_act_fake(x, smooth, rotation, static_scale, act_bits=8):
    return (x.new_empty(x.shape, dtype=torch.int8),
            x.new_empty((*x.shape[:-1], 1), dtype=torch.float32))


def _check_qlinear_args(xq: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor,
                        w_zero: Tensor | None, bias: Tensor | None, weight_bits: int,
                        group_size: int, out_dtype: torch.dtype) -> None:
    if xq.dtype != torch.int8 or xq.dim() == 0:
        raise ValueError(f"viditq.qlinear: xq must be an int8 tensor [..., K], got {xq.dtype} "
                         f"{tuple(xq.shape)}")
    if x_scale.dtype != torch.float32 or x_scale.shape != (*xq.shape[:-1], 1):
        raise ValueError(f"viditq.qlinear: x_scale must be fp32 {(*xq.shape[:-1], 1)}, got "
                         f"{x_scale.dtype} {tuple(x_scale.shape)}")
    _check_qweight_args("viditq.qlinear", xq.shape[-1], w_q, w_scale, w_zero, bias, weight_bits,
                        group_size, out_dtype)


def _check_qweight_args(where: str, k: int, w_q: Tensor, w_scale: Tensor, w_zero: Tensor | None,
                        bias: Tensor | None, weight_bits: int, group_size: int,
                        out_dtype: torch.dtype) -> None:
    """The weight-side operands of ``qlinear`` for an activation of K=k; ``where`` prefixes the
    ``ValueError`` (op name, and the version for ``qlinear_timestep``)."""
    def fail(msg: str) -> None:
        raise ValueError(f"{where}: {msg}")

    if weight_bits not in numerics.SUPPORTED_WEIGHT_BITS:
        fail(f"weight_bits={weight_bits} is not supported (supported: {numerics.SUPPORTED_WEIGHT_BITS})")
    if weight_bits == 4:
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


def _qlinear_impl(xq: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, w_zero: Tensor | None,
                  bias: Tensor | None, weight_bits: int, group_size: int,
                  out_dtype: torch.dtype) -> Tensor:
    wq = unpack_int4(w_q) if weight_bits == 4 else w_q
    return numerics.qlinear(xq, x_scale, wq, w_scale, w_zero, bias, group_size or None, out_dtype,
                            gemm=numerics.int_gemm_fast)


@torch.library.custom_op("viditq::qlinear", mutates_args=())
def qlinear(xq: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, w_zero: Tensor | None,
            bias: Tensor | None, weight_bits: int, group_size: int, out_dtype: torch.dtype) -> Tensor:
    """Linear layer on a quantized activation: integer GEMM(s) + dequantizing epilogue.

    xq: [..., K] int8; x_scale: [..., 1] fp32 (``viditq.quantize_act``'s outputs);
    w_q: [N, K] int8 (weight_bits=8) or [N, K/2] uint8 packed by ``kernels.packing.pack_int4``
    (weight_bits=4); group_size: 0 (per channel, w_scale [N] fp32) or g dividing K (w_scale
    [N, K/g] fp32); w_zero: int32 of w_scale's shape, or None (symmetric); bias: [N] float or None.
    Returns [..., N] of out_dtype. Numerics: ``numerics.qlinear``.
    """
    _check_qlinear_args(xq, x_scale, w_q, w_scale, w_zero, bias, weight_bits, group_size, out_dtype)
    return _qlinear_impl(xq, x_scale, w_q, w_scale, w_zero, bias, weight_bits, group_size, out_dtype)


@qlinear.register_fake
def _qlinear_fake(xq, x_scale, w_q, w_scale, w_zero, bias, weight_bits, group_size, out_dtype):
    return xq.new_empty((*xq.shape[:-1], w_q.shape[0]), dtype=out_dtype)


def _check_qlinear_fused_args(xq: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor,
                              w_zero: Tensor | None, bias: Tensor | None, weight_bits: int,
                              group_size: int, out_dtype: torch.dtype, activation: str,
                              gate: Tensor | None, residual: Tensor | None, packed_act: bool) -> None:
    op = "viditq.qlinear_fused"
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
    elif xq.dtype != torch.int8 or xq.dim() == 0:
        raise ValueError(f"{op}: xq must be an int8 tensor [..., K], got {xq.dtype} {tuple(xq.shape)}")
    if x_scale.dtype != torch.float32 or x_scale.shape != (*xq.shape[:-1], 1):
        raise ValueError(f"{op}: x_scale must be fp32 {(*xq.shape[:-1], 1)}, got {x_scale.dtype} "
                         f"{tuple(x_scale.shape)}")
    _check_qweight_args(op, k, w_q, w_scale, w_zero, bias, weight_bits, group_size, out_dtype)
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


def _qlinear_fused_impl(xq, x_scale, w_q, w_scale, w_zero, bias, weight_bits, group_size, out_dtype,
                        activation, gate, residual, packed_act):
    xq = unpack_int4(xq) if packed_act else xq
    y = _qlinear_impl(xq, x_scale, w_q, w_scale, w_zero, bias, weight_bits, group_size, torch.float32)
    return numerics.epilogue(y, activation, gate, residual).to(out_dtype)


@torch.library.custom_op("viditq::qlinear_fused", mutates_args=())
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
    _check_qlinear_fused_args(xq, x_scale, w_q, w_scale, w_zero, bias, weight_bits, group_size,
                              out_dtype, activation, gate, residual, packed_act)
    return _qlinear_fused_impl(xq, x_scale, w_q, w_scale, w_zero, bias, weight_bits, group_size,
                               out_dtype, activation, gate, residual, packed_act)


@qlinear_fused.register_fake
def _qlinear_fused_fake(xq, x_scale, w_q, w_scale, w_zero, bias, weight_bits, group_size, out_dtype,
                        activation, gate, residual, packed_act):
    return xq.new_empty((*xq.shape[:-1], w_q.shape[0]), dtype=out_dtype)


def _check_qlinear_timestep_args(x: Tensor, smooth: Tensor | None, rotation: list[Tensor],
                                 timestep: Tensor, bounds: list[float], w_q: list[Tensor],
                                 w_scale: list[Tensor], w_zero: list[Tensor | None],
                                 bias: Tensor | None, weight_bits: list[int], act_bits: list[int],
                                 group_size: int, out_dtype: torch.dtype) -> None:
    op = "viditq.qlinear_timestep"
    _check_balance_args("qlinear_timestep", x, smooth, rotation)
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
        _check_qweight_args(where, x.shape[-1], w_q[i], w_scale[i], w_zero[i], bias,
                            weight_bits[i], group_size, out_dtype)
        if w_q[i].shape[0] != w_q[0].shape[0]:
            raise ValueError(f"{where}: w_q has N={w_q[i].shape[0]} output features, version 0 "
                             f"has N={w_q[0].shape[0]}")


def _qlinear_timestep_impl(x, smooth, rotation, timestep, bounds, w_q, w_scale, w_zero, bias,
                           weight_bits, act_bits, group_size, out_dtype,
                           quantize=numerics.quantize_act, linear=None):
    """``quantize`` / ``linear``: the activation quantization and quantized linear to run each
    version with (the CPU reference by default; the CUDA registration passes its kernels)."""
    linear = linear or _qlinear_impl

    def version(i: int, rows: Tensor) -> Tensor:
        xq, x_scale = quantize(rows, smooth, rotation, None, act_bits[i])
        return linear(xq, x_scale, w_q[i], w_scale[i], w_zero[i], bias, weight_bits[i],
                      group_size, out_dtype)

    ranges = numerics.timestep_range(timestep, bounds).reshape(-1)
    present = torch.unique(ranges).tolist()  # the one host sync: which versions run
    if len(present) <= 1:
        return version(present[0] if present else 0, x)
    if x.dim() < 2 or x.shape[0] != ranges.numel():
        raise ValueError(f"viditq.qlinear_timestep: timestep {tuple(timestep.shape)} spans "
                         f"{len(present)} ranges, so each batch row needs its own, but x is "
                         f"{tuple(x.shape)} (its first dimension must be B={ranges.numel()})")
    out = x.new_empty((*x.shape[:-1], w_q[0].shape[0]), dtype=out_dtype)
    for i in present:
        rows = (ranges == i).nonzero().squeeze(1).to(x.device)
        out.index_copy_(0, rows, version(i, x.index_select(0, rows)))
    return out


@torch.library.custom_op("viditq::qlinear_timestep", mutates_args=())
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
    _check_qlinear_timestep_args(x, smooth, rotation, timestep, bounds, w_q, w_scale, w_zero, bias,
                                 weight_bits, act_bits, group_size, out_dtype)
    return _qlinear_timestep_impl(x, smooth, rotation, timestep, bounds, w_q, w_scale, w_zero,
                                  bias, weight_bits, act_bits, group_size, out_dtype)


@qlinear_timestep.register_fake
def _qlinear_timestep_fake(x, smooth, rotation, timestep, bounds, w_q, w_scale, w_zero, bias,
                           weight_bits, act_bits, group_size, out_dtype):
    return x.new_empty((*x.shape[:-1], w_q[0].shape[0]), dtype=out_dtype)
