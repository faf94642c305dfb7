"""``torch.ops.viditq.*``: the custom ops a quantized program is made of.

Importing this module defines the ops (schema, fake implementation for tracing, CPU
implementation). It must be imported before ``torch.export.load`` of a quantized program;
``import viditq_compile`` does that. Registration with Inductor is separate and explicit
(``viditq_compile.lowering.inductor.install``).

Each op is opaque to ``torch.export`` so the saved program is portable: the same op runs on any
device that has an implementation.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import numerics


def _check_w8a8_args(x: Tensor, w_q: Tensor, w_scale: Tensor, w_zero: Optional[Tensor],
                     bias: Optional[Tensor], act_bits: int) -> None:
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
def w8a8_linear(x: Tensor, w_q: Tensor, w_scale: Tensor, w_zero: Optional[Tensor],
                bias: Optional[Tensor], act_bits: int = 8) -> Tensor:
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
