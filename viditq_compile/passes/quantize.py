"""The quantize pass: linears -> ``torch.ops.viditq`` ops with integer weights.

Matches every linear call whose layer the plan quantizes, quantizes its weight once per layer
(``numerics.quantize_weight``), adds the int8 weight, scales and zero points to the graph as
constant tensors, and replaces the call by ``viditq.w8a8_linear``. The floating-point weight is
removed from the graph when nothing else reads it, so no float copy of a quantized weight stays in
an exported program.

Keeps: the graph's inputs and outputs (names, shapes, dtypes); each replaced node's metadata.
"""

from __future__ import annotations

import torch

from .. import numerics
from ..plan import Plan
from .sites import GraphTensors, LinearSite

W8A8_OP = torch.ops.viditq.w8a8_linear.default


def quantize_linears(tensors: GraphTensors, sites: list[LinearSite], plan: Plan,
                     cache=None) -> int:
    """Rewrite the quantized layers of ``plan``; returns the number of linear calls rewritten.

    ``cache`` (a ``torch.utils.weak.WeakIdKeyDictionary`` keyed by the float weight) keeps quantized weights
    per (version, bits, sym), so a weight seen by several graphs (recompiles, graph breaks) is
    quantized once, and an in-place update of the weight is noticed.
    """
    g = tensors.gm.graph
    nodes_of: dict[str, tuple] = {}
    count = 0
    for s in sites:
        lp = plan.layers[s.name]
        if not lp.quantized:
            continue
        if s.name not in nodes_of:
            qw = _quantize(s.weight, lp.weight_bits, lp.weight_sym, cache)
            zero = tensors.add_tensor(f"{s.name}.viditq_w_zero", qw.zero) \
                if qw.zero is not None else None
            nodes_of[s.name] = (tensors.add_tensor(f"{s.name}.viditq_w_q", qw.q),
                                tensors.add_tensor(f"{s.name}.viditq_w_scale", qw.scale), zero)
        wq, ws, wz = nodes_of[s.name]
        with g.inserting_before(s.node):
            new = g.call_function(W8A8_OP, (s.x, wq, ws, wz, s.bias, lp.act_bits))
        new.meta = dict(s.node.meta)
        s.node.replace_all_uses_with(new)
        g.erase_node(s.node)
        tensors.remove_if_unused(s.weight_node)
        count += 1
    tensors.finalize()
    return count


def _quantize(weight, bits, sym, cache):
    if cache is None:
        return numerics.quantize_weight(weight, bits=bits, sym=sym)
    per_weight = cache.setdefault(weight, {})
    key = (weight._version, bits, sym)
    if key not in per_weight:
        per_weight.clear()  # an older version of this weight is stale
        per_weight[key] = numerics.quantize_weight(weight, bits=bits, sym=sym)
    return per_weight[key]
