"""The quantize pass: linears -> ``torch.ops.viditq`` ops with integer weights.

Matches every linear call whose layer the plan quantizes, quantizes its weight once per layer
(``numerics.quantize_weight``; 4-bit weights are packed two per byte), adds the integer weight,
scales and zero points to the graph as constant tensors, and replaces the call:

- plain W8A8 (per-channel int8 weights, dynamic per-token activations, no balancing):
  ``viditq.w8a8_linear(x, ...)``, one op;
- everything else (4-bit or grouped weights, balanced inputs, static activation scales):
  ``xq, xs = viditq.quantize_act(x, v, R, static_scale)`` once per input tensor and activation
  format, shared by every consumer, then ``viditq.qlinear(xq, xs, ...)`` per layer. A balanced
  input (``viditq.balance(x, v, R)`` from the balance pass) is folded into that quantization, so
  the rotation runs once per producer and its output never round-trips through a low precision.

The floating-point weight is removed from the graph when nothing else reads it, so no float copy
of a quantized weight stays in an exported program.

Keeps: the graph's inputs and outputs (names, shapes, dtypes); each replaced node's metadata.
"""

from __future__ import annotations

import operator

import torch

from .. import numerics
from ..kernels.packing import pack_int4
from ..plan import LayerPlan, Plan
from .balance import BALANCE_OP
from .sites import GraphTensors, LinearSite, fake_call, node_value

W8A8_OP = torch.ops.viditq.w8a8_linear.default
QUANTIZE_ACT_OP = torch.ops.viditq.quantize_act.default
QLINEAR_OP = torch.ops.viditq.qlinear.default


def quantize_linears(tensors: GraphTensors, sites: list[LinearSite], plan: Plan,
                     cache=None, stats=None) -> int:
    """Rewrite the quantized layers of ``plan``; returns the number of linear calls rewritten.

    ``cache`` (a ``torch.utils.weak.WeakIdKeyDictionary`` keyed by the float weight) keeps
    quantized weights per (version, format), so a weight seen by several graphs (recompiles,
    graph breaks) is quantized once, and an in-place update of the weight is noticed.
    ``stats`` (``CalibrationStats``) gives the static activation scales of ``act_static`` layers.
    """
    g = tensors.gm.graph
    weights_of: dict[str, tuple] = {}
    act_of: dict[tuple, tuple] = {}
    count = 0
    for s in sites:
        lp = plan.layers[s.name]
        if not lp.quantized:
            continue
        if s.name not in weights_of:
            weights_of[s.name] = _add_weight(tensors, s, lp, cache)
        wq, ws, wz = weights_of[s.name]
        with g.inserting_before(s.node):
            if lp.single_op:
                new = g.call_function(W8A8_OP, (s.x, wq, ws, wz, s.bias, lp.act_bits))
            else:
                xq, xs = _quantized_input(tensors, s, lp, act_of, stats)
                out_dtype = output_dtype(s)
                new = g.call_function(QLINEAR_OP, (xq, xs, wq, ws, wz, s.bias, lp.weight_bits,
                                                   lp.weight_group or 0, out_dtype))
        new.meta = dict(s.node.meta)
        s.node.replace_all_uses_with(new)
        g.erase_node(s.node)
        if s.x.op == "call_function" and s.x.target == BALANCE_OP and not s.x.users:
            g.erase_node(s.x)
        tensors.remove_if_unused(s.weight_node)
        count += 1
    tensors.finalize()
    return count


def output_dtype(s: LinearSite) -> torch.dtype:
    """The dtype the linear call produced, as traced. Never guessed from the weight: after the
    balance pass a site's weight is the fp32 balanced one, whatever the model's dtype."""
    for node in (s.node, s.x):
        val = node_value(node)
        if isinstance(val, torch.Tensor):
            return val.dtype
    raise ValueError(f"linear {s.name!r}: the graph records no traced value for the call or its "
                     f"input, so its output dtype is unknown")


def _add_weight(tensors: GraphTensors, s: LinearSite, lp: LayerPlan, cache):
    qw = _quantize(s.weight, lp, cache)
    q = pack_int4(qw.q) if lp.weight_bits == 4 else qw.q
    zero = tensors.add_tensor(f"{s.name}.viditq_w_zero", qw.zero) if qw.zero is not None else None
    return (tensors.add_tensor(f"{s.name}.viditq_w_q", q),
            tensors.add_tensor(f"{s.name}.viditq_w_scale", qw.scale), zero)


def _quantized_input(tensors, s: LinearSite, lp: LayerPlan, act_of: dict, stats):
    """The (xq, x_scale) nodes for ``s``'s input, created once per (input, format)."""
    g = tensors.gm.graph
    if s.x.op == "call_function" and s.x.target == BALANCE_OP:
        src, vec, rot = s.x.args
    else:
        src, vec, rot = s.x, None, []
    key = (src, vec, tuple(rot), lp.act_bits, s.name if lp.act_static else None)
    if key not in act_of:
        static = None
        if lp.act_static:
            scale = numerics.static_scale(stats.absmax(s.name), lp.act_bits)
            static = tensors.add_tensor(f"{s.name}.viditq_act_scale", scale)
        node = g.call_function(QUANTIZE_ACT_OP, (src, vec, list(rot), static, lp.act_bits))
        fake_call(node)
        xq = g.call_function(operator.getitem, (node, 0))
        xs = g.call_function(operator.getitem, (node, 1))
        for i, item in enumerate((xq, xs)):
            if "val" in node.meta:
                item.meta["val"] = node.meta["val"][i]
        act_of[key] = (xq, xs)
    return act_of[key]


def _quantize(weight, lp: LayerPlan, cache):
    args = dict(bits=lp.weight_bits, sym=lp.weight_sym, group=lp.weight_group)
    if cache is None or lp.balance is not None:
        # a balanced weight is a fresh tensor of this graph; nothing to share
        return numerics.quantize_weight(weight, **args)
    per_weight = cache.setdefault(weight, {})
    key = (weight._version, lp.weight_bits, lp.weight_sym, lp.weight_group)
    if key not in per_weight:
        per_weight.clear()  # an older version of this weight is stale
        per_weight[key] = numerics.quantize_weight(weight, **args)
    return per_weight[key]
