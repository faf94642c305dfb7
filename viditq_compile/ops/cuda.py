"""CUDA implementations of the ``viditq`` ops: the Triton kernels.

``torch.library.register_kernel(..., "cuda")`` gives each op a CUDA kernel next to its CPU
implementation, so an exported program is unchanged (same ops, any device) and Inductor, which
keeps the ops opaque off the CPU (``lowering/inductor.py``), calls these kernels:

- ``viditq.quantize_act``: ``kernels.quantize_act.quantize_act_triton`` (per-token absmax, scale,
  int8/int4 values; the Hadamard rotation runs in torch before it);
- ``viditq.qlinear``: ``kernels.int_gemm.qlinear_triton`` (int8 tensor-core GEMM, int4 weights
  unpacked in registers, scales, zero points, bias in the epilogue); for W8A8 per channel, where
  ``torch._int_mm`` takes the shape, cuBLAS' int8 GEMM + ``kernels.int_mm_epilogue`` instead when
  it times faster for the shape bucket (``kernels.gemm_choice``; ``VIDITQ_GEMM_ROUTE`` forces
  either; ``routes()`` lists what each bucket ran and why);
- ``viditq.qlinear`` / ``qlinear_fused`` on e4m3 operands: ``kernels.fp8_gemm.fp8_qlinear_triton``
  (e4m3 tensor-core GEMM, fp32 accumulation, the same fused epilogue) on compute capability 8.9+,
  the reference elsewhere (sm_80 has no e4m3 tensor cores; logged, in ``fallbacks()``);
- ``viditq.qlinear_fused``: the same GEMM with the activation / gate / residual epilogue and
  optionally packed 4-bit activations (only compiled graphs hold it: ``lowering/fuse_epilogues.py``);
- ``viditq.w8a8_linear`` and ``viditq.qlinear_timestep``: quantization + GEMM composed (4-bit
  activations travel packed two per byte between the two kernels).

A shape a kernel cannot take (``int_gemm.supports``: e.g. a K that is not a multiple of 16)
runs the reference numerics on the GPU instead, with an exact float64 integer GEMM; each such
(op, shape) is logged once and listed by ``fallbacks()``.

Registration is cheap and imports no Triton: the kernel modules are imported on the first CUDA
call (``TRITON_INTERPRET`` must be decided before they are imported).
"""

from __future__ import annotations

import logging

import torch

from viditq_compile.config.capabilities import fp8_unsupported_reason
from viditq_compile.numerics import fp8
from viditq_compile.numerics import quant as numerics
from viditq_compile.numerics.contracts import (
    check_qlinear_args,
    check_qlinear_fused_args,
    check_qlinear_timestep_args,
    check_w8a8_args,
)
from viditq_compile.numerics.packing import unpack_int4
from viditq_compile.ops import library as ops
from viditq_compile.ops.schema import (
    QLINEAR,
    QLINEAR_FUSED,
    QLINEAR_TIMESTEP,
    QUANTIZE_ACT,
    W8A8_LINEAR,
)

log = logging.getLogger(__name__)

_FALLBACKS: dict[tuple, str] = {}


def fallbacks() -> dict[tuple, str]:
    """``(op, M, N, K, weight_bits, group) -> reason`` of every CUDA call that ran the reference
    path instead of a Triton kernel, in this process."""
    return dict(_FALLBACKS)


def qlinear_cuda(xq, x_scale, w_q, w_scale, w_zero, bias, weight_bits, group_size, out_dtype,
                 activation="none", gate=None, residual=None, packed_act=False):
    from viditq_compile.kernels import int_gemm

    n = w_q.shape[0]
    k = w_q.shape[1] * (2 if weight_bits == 4 else 1)
    m = x_scale.numel()
    if fp8.is_fp8(w_q):
        return _fp8_linear(xq, x_scale, w_q, w_scale, bias, out_dtype, activation, gate, residual)
    if int_gemm.supports(m, n, k, weight_bits, group_size):
        def triton_route():
            return int_gemm.qlinear_triton(xq, x_scale, w_q, w_scale, w_zero, bias, weight_bits, group_size,
                                           out_dtype, activation, gate, residual, packed_act)

        def int_mm_route():
            from viditq_compile.kernels import int_mm_epilogue

            return int_mm_epilogue.int_mm_qlinear(xq, x_scale, w_q, w_scale, w_zero, bias, out_dtype, activation,
                                                  gate, residual)

        choice = _gemm_route(m, n, k, xq, w_zero, bias, weight_bits, group_size, out_dtype, activation, gate,
                             residual, packed_act, {"triton": triton_route, "int_mm": int_mm_route})
        return int_mm_route() if choice.route == "int_mm" else triton_route()
    key = (QLINEAR.name, m, n, k, weight_bits, group_size)
    if key not in _FALLBACKS:
        _FALLBACKS[key] = "shape not supported by the Triton GEMM"
        log.warning("%s on CUDA: M=%d N=%d K=%d W%d group %d runs the reference path "
                    "(shape not supported by the Triton GEMM)", QLINEAR.display, m, n, k, weight_bits,
                    group_size)
    xq = unpack_int4(xq) if packed_act else xq
    wq = unpack_int4(w_q) if weight_bits == 4 else w_q
    y = numerics.qlinear(xq, x_scale, wq, w_scale, w_zero, bias, group_size or None, torch.float32,
                         gemm=numerics.int_gemm_float64)
    return numerics.epilogue(y, activation, gate, residual).to(out_dtype)


def _gemm_route(m, n, k, xq, w_zero, bias, weight_bits, group_size, out_dtype, activation, gate, residual,
                packed_act, run):
    """``kernels.gemm_choice.choose`` for a call the Triton GEMM takes: ``torch._int_mm`` + the
    epilogue kernel where ``int_mm_unsupported_reason`` allows it and it times faster for the
    bucket (or ``VIDITQ_GEMM_ROUTE`` forces it), else the Triton GEMM; ``routes()`` lists each."""
    from viditq_compile.kernels import gemm_choice

    refusal = gemm_choice.int_mm_unsupported_reason(m, n, k, weight_bits, group_size, packed_act)
    variant = gemm_choice.variant_name(w_zero is not None, bias is not None, activation, gate is not None,
                                       residual is not None, out_dtype)
    base = f"w{weight_bits}a{4 if packed_act else 8}" + (f"-g{group_size}" if group_size else "")
    variant = base + variant.removeprefix("w8a8")  # W4, groups, packed activations: the Triton GEMM's own
    key = gemm_choice.BucketKey.of(m, n, k, variant, gemm_choice.device_capability(xq.device))
    return gemm_choice.choose(key, run, refusal, cuda=xq.device.type == "cuda")


def routes() -> dict[tuple, str]:
    """``(M bucket, K, N, variant, compute capability) -> "route: reason"`` of every integer
    ``viditq.qlinear`` / ``qlinear_fused`` call the Triton GEMM could take, in this process: which
    of the Triton GEMM (``triton``) and ``torch._int_mm`` + epilogue (``int_mm``) ran, and why
    (timed, forced, or what ``torch._int_mm`` refuses). Shapes neither takes are in ``fallbacks()``."""
    from viditq_compile.kernels import gemm_choice

    return {key.row(): choice.describe() for key, choice in gemm_choice.routes().items()}


def _fp8_linear(xq, x_scale, w_q, w_scale, bias, out_dtype, activation, gate, residual):
    """e4m3 operands: ``kernels.fp8_gemm.fp8_qlinear_triton`` where ``fp8_unsupported_reason``
    takes the shape on this device (K a multiple of 16, compute capability 8.9+), else the
    reference (``_fp8_reference``, logged with the reason)."""
    from viditq_compile.kernels import fp8_gemm

    m, (n, k) = x_scale.numel(), w_q.shape
    reason = fp8_unsupported_reason(m, n, k, fp8_gemm.device_arch(xq.device))
    if reason is None:
        return fp8_gemm.fp8_qlinear_triton(xq, x_scale, w_q, w_scale, bias, out_dtype, activation, gate,
                                           residual)
    return _fp8_reference(xq, x_scale, w_q, w_scale, bias, out_dtype, activation, gate, residual, reason)


def _fp8_reference(xq, x_scale, w_q, w_scale, bias, out_dtype, activation, gate, residual, reason):
    """e4m3 operands the e4m3 Triton GEMM does not take (``reason``): the reference numerics in
    torch on the GPU (fp32 GEMM of the upcast operands, ``numerics.fp8``); logged once per shape."""
    key = (QLINEAR.name, x_scale.numel(), w_q.shape[0], w_q.shape[1], "fp8_e4m3", 0)
    if key not in _FALLBACKS:
        _FALLBACKS[key] = f"e4m3 operands: {reason}"
        log.warning("%s on CUDA: e4m3 M=%d N=%d K=%d runs the reference path (%s)", QLINEAR.display,
                    key[1], key[2], key[3], reason)
    y = numerics.qlinear(xq, x_scale, w_q, w_scale, None, bias, None, torch.float32,
                         gemm=fp8.fp8_gemm_fast)
    return numerics.epilogue(y, activation, gate, residual).to(out_dtype)


def quantize_act_cuda(x, smooth, rotation, static_scale, act_bits=8):
    from viditq_compile.kernels.quantize_act import quantize_act_triton

    return quantize_act_triton(x, smooth, rotation, static_scale, act_bits)


def _quantize_for_gemm(x, smooth, rotation, static_scale, act_bits):
    """``quantize_act_cuda``, but 4-bit values come packed two per byte when K is even: the
    GEMM that follows in the same op reads half the bytes."""
    from viditq_compile.kernels.quantize_act import quantize_act_triton

    pack = act_bits == 4 and x.shape[-1] % 2 == 0
    return quantize_act_triton(x, smooth, rotation, static_scale, act_bits, pack=pack)


def _linear_for(xq, x_scale, w_q, w_scale, w_zero, bias, weight_bits, group_size, out_dtype):
    return qlinear_cuda(xq, x_scale, w_q, w_scale, w_zero, bias, weight_bits, group_size, out_dtype,
                        packed_act=xq.dtype == torch.uint8)


def _register() -> None:
    @torch.library.register_kernel(QLINEAR.qualname, "cuda")
    def _qlinear(xq, x_scale, w_q, w_scale, w_zero, bias, weight_bits, group_size, out_dtype):
        check_qlinear_args(xq, x_scale, w_q, w_scale, w_zero, bias, weight_bits, group_size,
                           out_dtype)
        return qlinear_cuda(xq, x_scale, w_q, w_scale, w_zero, bias, weight_bits, group_size, out_dtype)

    @torch.library.register_kernel(QUANTIZE_ACT.qualname, "cuda")
    def _quantize_act(x, smooth, rotation, static_scale, act_bits=8):
        return quantize_act_cuda(x, smooth, rotation, static_scale, act_bits)

    @torch.library.register_kernel(W8A8_LINEAR.qualname, "cuda")
    def _w8a8_linear(x, w_q, w_scale, w_zero, bias, act_bits=8):
        check_w8a8_args(x, w_q, w_scale, w_zero, bias, act_bits)
        xq, x_scale = _quantize_for_gemm(x, None, [], None, act_bits)
        return _linear_for(xq, x_scale, w_q, w_scale, w_zero, bias, 8, 0, x.dtype)

    @torch.library.register_kernel(QLINEAR_FUSED.qualname, "cuda")
    def _qlinear_fused(xq, x_scale, w_q, w_scale, w_zero, bias, weight_bits, group_size, out_dtype,
                       activation, gate, residual, packed_act):
        check_qlinear_fused_args(xq, x_scale, w_q, w_scale, w_zero, bias, weight_bits, group_size,
                                 out_dtype, activation, gate, residual, packed_act)
        return qlinear_cuda(xq, x_scale, w_q, w_scale, w_zero, bias, weight_bits, group_size, out_dtype,
                            activation, gate, residual, packed_act)

    @torch.library.register_kernel(QLINEAR_TIMESTEP.qualname, "cuda")
    def _qlinear_timestep(x, smooth, rotation, timestep, bounds, w_q, w_scale, w_zero, bias,
                          weight_bits, act_bits, group_size, out_dtype):
        check_qlinear_timestep_args(x, smooth, rotation, timestep, bounds, w_q, w_scale, w_zero,
                                    bias, weight_bits, act_bits, group_size, out_dtype)
        return ops.qlinear_timestep_impl(x, smooth, rotation, timestep, bounds, w_q, w_scale, w_zero,
                                         bias, weight_bits, act_bits, group_size, out_dtype,
                                         quantize=_quantize_for_gemm, linear=_linear_for)


_register()


# ---- viditq.attention (helper "attention"): kernels.attention, the reference past its head dims ----
def attention_cuda(q, k, v, scale, block_q=128, block_k=128):
    """``viditq.attention`` on CUDA: ``kernels.attention.attention_triton`` (int8 Q·Kᵀ on tensor
    cores, online fp32 softmax, 16-bit P·V); head dims past the kernel's run the CPU
    implementation's ATen ops on the GPU (logged once, in ``fallbacks()``)."""
    from viditq_compile.kernels import attention as attention_kernel
    from viditq_compile.numerics import attention as attn
    from viditq_compile.ops.schema import ATTENTION

    attn.check_attention_args(q, k, v, scale, block_q, block_k, ATTENTION.display)
    reason = attention_kernel.unsupported_reason(q, k, v)
    if reason is None:
        return attention_kernel.attention_triton(q, k, v, scale, block_q, block_k)
    key = (ATTENTION.name, q.shape[-1], v.shape[-1])
    if key not in _FALLBACKS:
        _FALLBACKS[key] = reason
        log.warning("%s on CUDA: %s; runs the reference path", ATTENTION.display, reason)
    return ops.attention_impl(q, k, v, scale, block_q, block_k)


def _register_attention() -> None:
    from viditq_compile.ops.schema import ATTENTION

    torch.library.register_kernel(ATTENTION.qualname, "cuda")(attention_cuda)


_register_attention()
