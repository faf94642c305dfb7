"""The integer method: int8 / int4 weights (per channel or per group, symmetric or with zero points)
and int8 / int4 activations (dynamic per token, or a static per-tensor scale from calibration).

What this module owns, and nothing else does:

- the ``LayerPlan`` fields the method uses (``FIELDS``) and the weight symmetry the search gives
  each width (``SEARCH_WEIGHT_SYM``);
- the names of the tensors it adds to a program (``weight_names``, ``act_scale_name``);
- the weight quantization every route shares (``quantize_weight``), and its eager reference
  (``EagerLinear``): ``numerics.quantize_act`` + ``numerics.qlinear``, the reference the ``viditq``
  ops are tested against, applied to a layer of the eager model. The search scores layers with it;
  ``tests/methods/test_parity.py`` holds it to the program the quantize pass builds from the same plan.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from viditq_compile.graph import modules
from viditq_compile.numerics import fp8
from viditq_compile.numerics import quant as numerics

if TYPE_CHECKING:
    from viditq_compile.config.plan import LayerPlan
    from viditq_compile.methods.balance import LayerTransform

NAME = "int_weight"
FIELDS = ("weight_bits", "act_bits", "weight_sym", "act_sym", "weight_group", "act_static", "timestep_widths",
          "number_format")
"""The ``LayerPlan`` fields this method reads."""

SEARCH_WEIGHT_SYM = {8: True, 4: False}
"""Weight symmetry per width in the search: symmetric int8, asymmetric int4 (as the presets)."""


def weight_names(layer: str, suffix: str = "") -> tuple[str, str, str]:
    """The program's names of a layer's integer weight, its scales and its zero points."""
    return (f"{layer}.viditq_w_q{suffix}", f"{layer}.viditq_w_scale{suffix}", f"{layer}.viditq_w_zero{suffix}")


def act_scale_name(layer: str) -> str:
    """The program's name of a layer's static activation scale."""
    return f"{layer}.viditq_act_scale"


def quantize_weight(weight: torch.Tensor, lp: LayerPlan) -> numerics.QuantizedWeight:
    """``numerics.quantize_weight`` (``fp8.quantize_weight_fp8`` for an fp8 layer) at ``lp``'s
    format; its refusals (NaN/Inf, with what and where) name the layer, which numerics does not
    know."""
    try:
        if lp.fp8:
            return fp8.quantize_weight_fp8(weight)
        return numerics.quantize_weight(weight, bits=lp.weight_bits, sym=lp.weight_sym, group=lp.weight_group)  # type: ignore[arg-type]
    except ValueError as e:
        raise ValueError(f"layer {lp.name!r}: {e}") from None


class EagerLinear:
    """The eager reference of one quantized layer at fixed widths (``lp``, one timestep range): a
    forward hook that replaces a linear layer's output by what the program computes for it: an
    ``nn.Linear``'s, or a 1×1 convolution's (``graph.modules.is_linear_layer``), whose input it
    moves channels-last and whose output back, as the program's rewritten convolution does.

    ``transform``: the layer's balancing (``methods.balance.layer_transforms``), or ``None``;
    ``static_scale``: the per-tensor activation scale of an ``act_static`` layer
    (``numerics.static_scale`` of its calibration absmax), required exactly then.
    """

    def __init__(self, module: nn.Module, lp: LayerPlan, transform: LayerTransform | None = None,
                 static_scale: torch.Tensor | None = None):
        if not modules.is_linear_layer(module):
            raise TypeError(f"layer {lp.name!r}: EagerLinear takes an nn.Linear or a linear "
                            f"convolution, got {type(module).__name__} ({modules.module_refusal(module)})")
        if lp.timestep_widths is not None:
            raise ValueError(f"layer {lp.name!r}: EagerLinear runs one timestep range; pass lp.at_range(r)")
        if bool(lp.act_static) != (static_scale is not None):
            raise ValueError(f"layer {lp.name!r}: act_static={lp.act_static} needs a static scale exactly "
                             f"when set (got {'one' if static_scale is not None else 'none'})")
        w = transform.weight if transform is not None else \
            modules.linear_weight(module).detach().to(torch.float32)
        self.qw = quantize_weight(w, lp)
        self.vec = transform.act_vector if transform is not None else None
        self.rot = transform.rotation if transform is not None else []
        self.static = static_scale
        self.act_bits = lp.act_bits
        self.group = lp.weight_group
        bias = module.bias
        # a folded value projection's bias, in the model bias's dtype as the program holds it
        self.bias = bias if transform is None or transform.bias is None else \
            transform.bias.to(bias.dtype)  # type: ignore[union-attr, arg-type]  # folded only where there is a bias
        self.fp8 = lp.fp8

    def __call__(self, module, args, output):
        x = modules.to_tokens(module, args[0])
        if self.fp8:
            xq, xs = fp8.quantize_act_fp8(x, self.vec, self.rot)
            gemm = fp8.fp8_gemm_fast
        else:
            xq, xs = numerics.quantize_act(x, self.vec, self.rot, self.static, self.act_bits)
            gemm = numerics.int_gemm_fast
        y = numerics.qlinear(xq, xs, self.qw.q, self.qw.scale, self.qw.zero, self.bias, self.group,
                             x.dtype, gemm=gemm)
        return modules.from_tokens(module, y, args[0])
