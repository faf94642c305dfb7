"""How Inductor compiles the ``viditq`` ops.

On CPU, ``viditq.w8a8_linear`` is decomposed into the reference numerics around an extern
integer GEMM (``viditq.int8_mm``: oneDNN on a prepacked weight, ``kernels.onednn_int8``, where
it runs, else ``torch._int_mm``): Inductor then fuses the per-token quantization into the kernel that produces
the activation (LayerNorm, adaLN modulate, GELU) and the dequantizing epilogue into the kernel
that consumes the output (bias, gate, residual add), which is faster than calling the opaque op
(measured: 63 ms against 78-99 ms for the opaque op on an int8 MLP).
``viditq.balance``, ``viditq.quantize_act`` (and ``quantize_act_fp8``) and ``viditq.qlinear``
decompose the same way (an e4m3 ``qlinear``'s GEMM is an fp32 matmul of the upcast operands): the
balancing GEMMs, the quantization and the int4 unpacking become fusible ATen ops, and each
(group's) integer GEMM an extern ``torch._int_mm``. A grouped ``qlinear`` runs ``grouped_qlinear``
(the reference's group loop on a group-major copy of the weight, which the int4 unpack writes).

On CUDA (``GEMM_KERNEL_DEVICES``) the GEMM is the Triton kernel, which also does the dequantizing
epilogue, so ``qlinear`` / ``qlinear_fused`` stay opaque calls while ``quantize_act``, ``balance``
and the quantization half of ``w8a8_linear`` still decompose into ATen ops that Inductor fuses into
the kernel producing the activation (except a 16-bit ``quantize_act`` whose rotation the Triton
kernel holds in registers, ``config.capabilities.rotation_in_kernel``: that stays one opaque call);
``lowering.fuse_epilogues`` (run by the backend before Inductor) folds bias-activation-gate-residual
tails into ``qlinear_fused``. Other devices keep the opaque ops (with one warning per op and
device).

``viditq.qlinear_timestep`` has no decomposition on purpose: it picks its version from the
timestep's value, a data-dependent choice that inside the graph would need a recompile per range
(or ``torch.cond``), so Inductor calls it as one opaque fallback kernel and one compiled graph
serves every sampling step.

``install()`` registers this with Inductor's process-global decomposition table. It is
idempotent and called by the ``viditq`` backend and by ``QuantizedModel.compile``; importing
the package does not call it.
"""

from __future__ import annotations

import logging

import torch

from viditq_compile.config.capabilities import rotation_in_kernel
from viditq_compile.kernels import onednn_int8
from viditq_compile.numerics import fp8
from viditq_compile.numerics import quant as numerics
from viditq_compile.numerics.packing import unpack_int4
from viditq_compile.ops.library import balance_impl, qlinear_fused_impl, qlinear_impl
from viditq_compile.ops.schema import (
    BALANCE,
    INT8_MM,
    QLINEAR,
    QLINEAR_FUSED,
    QUANTIZE_ACT,
    QUANTIZE_ACT_FP8,
    W8A8_LINEAR,
    OpSchema,
)

log = logging.getLogger(__name__)
_installed = False

GEMM_KERNEL_DEVICES: frozenset[str] = frozenset({"cuda"})
"""Device types whose ``viditq`` GEMM ops run a kernel of their own (the Triton kernels of
``ops/cuda.py``, which also take the dequantizing epilogue): there ``qlinear`` and
``qlinear_fused`` stay opaque calls, ``w8a8_linear`` splits into fusible quantization + ``qlinear``,
and ``lowering.fuse_epilogues`` folds the ops after each GEMM into it. Tests add ``"cpu"`` to run
that route on the CPU implementations."""

_warned_devices: set[tuple[str, str]] = set()


def _decomposes(op: OpSchema, device: torch.device) -> bool:
    """True on CPU (the GEMM becomes ``torch._int_mm`` between fusible ATen ops); False on a
    device with a GEMM kernel (``GEMM_KERNEL_DEVICES``); elsewhere False after warning once per
    (op, device type) that the opaque op will run."""
    if device.type in GEMM_KERNEL_DEVICES:
        return False
    if device.type == "cpu":
        return True
    if (op.name, device.type) not in _warned_devices:
        _warned_devices.add((op.name, device.type))
        log.warning("%s on %s: no fused Inductor lowering for this device yet; the op runs "
                    "as an opaque call", op.display, device.type)
    return False


def _w8a8_linear_decomp(x, w_q, w_scale, w_zero, bias, act_bits=8):
    if _decomposes(W8A8_LINEAR, x.device):
        if _onednn_takes(8, 0, w_zero):
            xq, x_scale = numerics.quantize_act(x, None, [], None, act_bits)
            return cpu_qlinear(xq, x_scale, w_q, None, 8, w_scale, bias, x.dtype)
        return numerics.w8a8_linear(x, w_q, w_scale, w_zero, bias, act_bits,
                                    gemm=numerics.int_gemm_fast)
    if x.device.type in GEMM_KERNEL_DEVICES:
        # quantization as ATen ops (fused into the producer), the GEMM + epilogue as the kernel
        xq, x_scale = numerics.quantize_act(x, None, [], None, act_bits)
        return QLINEAR.overload(*QLINEAR.positional(
            xq=xq, x_scale=x_scale, w_q=w_q, w_scale=w_scale, w_zero=w_zero, bias=bias, weight_bits=8,
            group_size=0, out_dtype=x.dtype))
    return NotImplemented


def _balance_decomp(x, smooth, rotation):
    # pointwise + small GEMMs on every device: fusible into the producer wherever Inductor runs
    return balance_impl(x, smooth, rotation)


def _quantize_act_decomp(x, smooth, rotation, static_scale, act_bits=8):
    if x.device.type in GEMM_KERNEL_DEVICES and rotation_in_kernel(x, rotation, static_scale):
        # the Triton kernel smooths, rotates and quantizes reading x once; decomposed, the
        # rotation would be two extern GEMMs, each a round trip of the activation
        return NotImplemented
    # a row reduction and pointwise ops: Inductor fuses them into the kernel that produces x
    # (LayerNorm, adaLN modulate, GELU), so the activation is read once
    return numerics.quantize_act(x, smooth, rotation, static_scale, act_bits)


def _quantize_act_fp8_decomp(x, smooth, rotation):
    if x.device.type in GEMM_KERNEL_DEVICES and rotation_in_kernel(x, rotation, None):
        return NotImplemented  # as _quantize_act_decomp: the kernel holds the rotation
    return fp8.quantize_act_fp8(x, smooth, rotation)


def cpu_qlinear(xq, x_scale, w_q, w_zero, weight_bits, w_scale, bias, out_dtype):
    """``numerics.qlinear`` per channel as ``viditq.int8_mm`` (oneDNN, ``kernels.onednn_int8``) plus
    the epilogue as fusible ATen ops. ``w_q`` is the stored weight: int8 symmetric, or packed int4
    with or without a zero point, which the op unpacks (and subtracts the zero point from) once
    and keeps prepacked, instead of an unpack per call.

    A bf16 layer takes a bf16 product with the weight scale applied inside the GEMM, then the
    per-token scale and bias (``numerics.token_scale_epilogue``): one more rounding to bf16 than
    the reference, at most 2^-9 relative to the product, for half the bytes of an fp32 product
    (the MLP's fp32 / int32 product is over glibc's mmap ceiling and page-faults in on every
    call). Any other dtype takes the bare fp32 accumulator and ``numerics.dequantize_epilogue``:
    bit-exact with the reference (``tests/lowering/test_inductor.py``).
    """
    k, n = xq.shape[-1], w_q.shape[0]
    lead = xq.shape[:-1]
    xq2, xs2 = xq.reshape(-1, k), x_scale.reshape(-1, 1)
    if out_dtype == torch.bfloat16:
        y = INT8_MM.overload(xq2, w_q, w_zero, weight_bits, w_scale, out_dtype)
        out = numerics.token_scale_epilogue(y, xs2, bias, out_dtype)
    else:
        acc = INT8_MM.overload(xq2, w_q, w_zero, weight_bits, None, torch.float32)
        out = numerics.dequantize_epilogue(acc, xs2, w_scale, None, None, bias, out_dtype)
    return out.reshape(*lead, n)


def _onednn_takes(weight_bits: int, group_size: int, w_zero) -> bool:
    """Whether ``cpu_qlinear`` runs the layer: per channel, int8 symmetric or int4 (whose codes
    minus their zero point fit int8), and the oneDNN route here."""
    return not group_size and (weight_bits == 4 or w_zero is None) and onednn_int8.available()


def zero_point_qlinear(xq, x_scale, wq, w_scale, w_zero, bias, out_dtype):
    """``numerics.qlinear`` per channel with zero points (asymmetric int4 / int8 weights), the row
    sum of the activation kept in int32: the reference's ``xq.to(int32).sum()`` is int64, which
    makes the epilogue's ``acc - rowsum * zero`` an int64 loop. The values are the same (every
    int32 value of the layer fits int32: ``numerics.max_k_for_int32``), so the result is
    bit-exact (``tests/lowering/test_inductor.py``); ``numerics.dequantize_epilogue`` does the rest.
    """
    k, n = xq.shape[-1], wq.shape[0]
    lead = xq.shape[:-1]
    xq2 = xq.reshape(-1, k)
    acc = numerics.int_gemm_fast(xq2, wq)
    rowsum = xq2.sum(dim=-1, keepdim=True, dtype=torch.int32)
    out = numerics.dequantize_epilogue(acc, x_scale.reshape(-1, 1), w_scale, w_zero, rowsum, bias,
                                       out_dtype)
    return out.reshape(*lead, n)


def grouped_qlinear(xq, x_scale, wq, w_scale, w_zero, bias, group: int, out_dtype):
    """``numerics.qlinear`` for grouped weights with each group's weight block made contiguous
    first, as the CPU decomposition runs it (bit-exact with the reference: the same integer GEMMs
    and the same fp32 operations in the same order; ``tests/lowering/test_inductor.py``).

    ``wq [N, K] int8`` (unpacked) is copied once into group-major ``[K // g, N, g]``, so group j's
    GEMM reads a contiguous ``[N, g]`` block: CPU ``torch._int_mm`` on the strided column block
    ``wq[:, j*g:(j+1)*g]`` ran 4-6x slower (measured: [2048, 128] x [128, 3456], one thread).
    Under Inductor the copy is the int4 unpack's own kernel writing a different layout, so it
    costs nothing over the unpack the reference route already ran.
    """
    k, n = xq.shape[-1], wq.shape[0]
    lead = xq.shape[:-1]
    xq2, xs2 = xq.reshape(-1, k), x_scale.reshape(-1, 1)
    groups = k // group
    wg = wq.reshape(n, groups, group).permute(1, 0, 2).contiguous()
    # [G, N]: group j's scales / zero points as one contiguous row (a column of [N, G] is a
    # stride-G gather in every element of the epilogue)
    sg = w_scale.t().contiguous()
    zg = w_zero.t().contiguous() if w_zero is not None else None
    out = None
    for j in range(groups):
        xj = xq2[:, j * group:(j + 1) * group]
        acc = torch._int_mm(xj, wg[j].t())
        if zg is not None:
            # int32 throughout (the reference's int64 row sum holds the same values: the int32
            # range is the layer's K limit, numerics.max_k_for_int32), so the epilogue vectorizes
            acc = acc - xj.sum(dim=-1, keepdim=True, dtype=torch.int32) * zg[j]
        term = acc.to(torch.float32) * sg[j]
        out = term if out is None else out + term
    out = out * xs2
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype).reshape(*lead, n)


def _qlinear_decomp(xq, x_scale, w_q, w_scale, w_zero, bias, weight_bits, group_size, out_dtype):
    if not _decomposes(QLINEAR, xq.device):
        return NotImplemented
    if fp8.is_fp8(w_q):
        return qlinear_impl(xq, x_scale, w_q, w_scale, w_zero, bias, weight_bits, group_size, out_dtype)
    if _onednn_takes(weight_bits, group_size, w_zero):
        # the op gets the graph's own weight constant (not an unpacked copy), so its unpacked,
        # prepacked int8 copy is made once and found again on every call
        return cpu_qlinear(xq, x_scale, w_q, w_zero, weight_bits, w_scale, bias, out_dtype)
    # the reference unpack: one pointwise kernel on CPU (a cat of the two int8 halves would be an
    # ATen fallback, Inductor's CPU cat does not generate int8 code)
    wq = unpack_int4(w_q) if weight_bits == 4 else w_q
    if group_size:
        # grouped weights: the reference's group loop with contiguous weight blocks
        return grouped_qlinear(xq, x_scale, wq, w_scale, w_zero, bias, group_size, out_dtype)
    if w_zero is not None:
        return zero_point_qlinear(xq, x_scale, wq, w_scale, w_zero, bias, out_dtype)
    return numerics.qlinear(xq, x_scale, wq, w_scale, w_zero, bias, None, out_dtype,
                            gemm=numerics.int_gemm_fast)


def _qlinear_fused_decomp(xq, x_scale, w_q, w_scale, w_zero, bias, weight_bits, group_size, out_dtype,
                          activation, gate, residual, packed_act):
    if not _decomposes(QLINEAR_FUSED, xq.device):
        return NotImplemented
    return qlinear_fused_impl(xq, x_scale, w_q, w_scale, w_zero, bias, weight_bits, group_size,
                              out_dtype, activation, gate, residual, packed_act)


def install() -> None:
    """Register the Inductor decompositions of the ``viditq`` ops (idempotent)."""
    global _installed
    if _installed:
        return
    from torch._inductor import decomposition
    from torch._inductor.decomposition import register_decomposition

    from viditq_compile.ops import library as ops  # noqa: F401  (the ops must exist before they get a decomposition)

    reason = onednn_int8.unavailable_reason()  # decided here, outside any tracing (it runs a self-test)
    if reason is not None:  # the slower integer route; the report says so too
        log.warning("CPU int8 GEMMs run torch._int_mm, not oneDNN: %s", reason)
    register_decomposition(W8A8_LINEAR.overload)(_w8a8_linear_decomp)
    register_decomposition(BALANCE.overload)(_balance_decomp)
    register_decomposition(QUANTIZE_ACT.overload)(_quantize_act_decomp)
    register_decomposition(QUANTIZE_ACT_FP8.overload)(_quantize_act_fp8_decomp)
    register_decomposition(QLINEAR.overload)(_qlinear_decomp)
    register_decomposition(QLINEAR_FUSED.overload)(_qlinear_fused_decomp)
    # Where a decomposition declines (NotImplemented: the GEMM kernel runs), Inductor needs a
    # fallback lowering; the one it would make on the fly refuses ops that have a decomposition.
    from torch._inductor.lowering import make_fallback

    for op in (W8A8_LINEAR, QUANTIZE_ACT, QUANTIZE_ACT_FP8, QLINEAR, QLINEAR_FUSED):
        make_fallback(op.overload, warn=False, override_decomp=True)
    # Inductor memoizes its table merged with the random-op decompositions on the first compile
    # in the process (functools.cache); drop that copy so a compile that ran before install()
    # does not hide these decompositions from every later one.
    merged = getattr(decomposition, "fast_random_decomps", None)
    if merged is not None and hasattr(merged, "cache_clear"):
        merged.cache_clear()
    _installed = True
    log.debug("viditq Inductor decompositions installed")
