"""The quantize pass: linears -> ``torch.ops.viditq`` ops with integer weights.

Matches every linear call whose layer the plan quantizes, quantizes its weight once per layer
(``numerics.quantize_weight``; 4-bit weights are packed two per byte), adds the integer weight,
scales and zero points to the graph as constant tensors, and replaces the call:

- plain W8A8 (per-channel int8 weights, dynamic per-token activations, no balancing):
  ``viditq.w8a8_linear(x, ...)``, one op;
- everything else (4-bit or grouped weights, balanced inputs, static activation scales):
  ``xq, xs = viditq.quantize_act(x, v, R, static_scale)`` once per input tensor and activation
  format, shared by every consumer, then ``viditq.qlinear(xq, xs, ...)`` per layer; fp8 layers
  (``number_format`` ``"fp8_e4m3"``) the same with ``viditq.quantize_act_fp8`` and e4m3 weights. A balanced
  input (``viditq.balance(x, v, R)`` from the balance pass) is folded into that quantization, so
  the rotation runs once per producer and its output never round-trips through a low precision;
- a layer whose widths change with the timestep (``LayerPlan.timestep_widths``):
  ``viditq.qlinear_timestep(x, v, R, timestep, bounds, ...)`` with the weight quantized once per
  distinct (weight_bits, weight_sym) and the balanced input folded in the same way. ``timestep``
  is the graph input the plan's ``timestep_input`` names (``GraphTensors.user_input``), so one
  graph serves every sampling step and the op picks the version at run time.

The floating-point weight is removed from the graph when nothing else reads it, so no float copy
of a quantized weight stays in an exported program.

Keeps: the graph's inputs and outputs (names, shapes, dtypes); each replaced node's metadata
(plus the layer name, ``LAYER_META``).
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from viditq_compile.config.plan import LayerPlan, Plan, PlanError
from viditq_compile.graph.sites import GraphTensors, LinearSite, fake_call, node_value
from viditq_compile.methods import int_weight
from viditq_compile.numerics import quant as numerics
from viditq_compile.numerics.packing import pack_int4
from viditq_compile.ops.schema import (
    BALANCE,
    QLINEAR,
    QLINEAR_TIMESTEP,
    QUANTIZE_ACT,
    QUANTIZE_ACT_FP8,
    W8A8_LINEAR,
)
from viditq_compile.passes.balance import BALANCE_OP
from viditq_compile.passes.select import layer_refusal

W8A8_OP = W8A8_LINEAR.overload
QUANTIZE_ACT_OP = QUANTIZE_ACT.overload
QUANTIZE_ACT_FP8_OP = QUANTIZE_ACT_FP8.overload
QLINEAR_OP = QLINEAR.overload
QLINEAR_TIMESTEP_OP = QLINEAR_TIMESTEP.overload
LAYER_META = "viditq_layer"
"""``node.meta`` key holding the layer name of each op this pass emits (later passes name what
they did by it; ``torch.export`` does not save it)."""


def quantize_linears(tensors: GraphTensors, sites: list[LinearSite], plan: Plan,
                     cache=None, stats=None) -> int:
    """Rewrite the quantized layers of ``plan``; returns the number of linear calls rewritten.

    ``cache`` (a ``torch.utils.weak.WeakIdKeyDictionary`` keyed by the float weight) keeps
    quantized weights per (version, format), so a weight seen by several graphs (recompiles,
    graph breaks) is quantized once, and an in-place update of the weight is noticed.
    ``stats`` (``CalibrationStats``) gives the static activation scales of ``act_static`` layers.
    A plan with ``timestep_widths`` layers needs its ``timestep_input`` among the graph's inputs
    (``PlanError`` otherwise), looked up only when this graph holds such a layer. A quantized
    layer whose weights its shape cannot take at its width or whose integer GEMM could overflow
    int32 (``select.layer_refusal``; ``select_linears`` and ``match_plan`` never let one through)
    is refused with ``PlanError`` before anything is
    rewritten.
    """
    for s in sites:
        refused = layer_refusal(plan.layers[s.name])
        if refused:
            raise PlanError(f"layer {s.name!r} cannot be quantized: {refused}")
    g = tensors.gm.graph
    weights_of: dict[str, tuple | list[tuple]] = {}
    act_of: dict[tuple, tuple] = {}
    timestep = None
    if any(plan.layers[s.name].quantized and plan.layers[s.name].timestep_widths is not None
           for s in sites):
        timestep = tensors.user_input(plan.timestep_input)  # type: ignore[arg-type]  # set with widths; before the graph is touched
    count = 0
    replaced: dict[fx.Node, fx.Node] = {}
    for s in sites:
        lp = plan.layers[s.name]
        if not lp.quantized:
            continue
        s.x = replaced.get(s.x, s.x)  # the output of a linear rewritten above (Linear -> Linear)
        if s.name not in weights_of:
            weights_of[s.name] = _add_versions(tensors, s, lp, cache) if lp.timestep_widths \
                else _add_weight(tensors, s, lp, cache)
        with g.inserting_before(s.node):
            if lp.timestep_widths is not None:
                new = _timestep_linear(g, s, lp, plan, timestep, weights_of[s.name])
            elif lp.single_op:
                wq, ws, wz = weights_of[s.name]
                new = g.call_function(W8A8_OP, W8A8_LINEAR.positional(
                    x=s.x, w_q=wq, w_scale=ws, w_zero=wz, bias=s.bias, act_bits=lp.act_bits))
            else:
                wq, ws, wz = weights_of[s.name]
                xq, xs = _quantized_input(tensors, s, lp, act_of, stats)
                out_dtype = output_dtype(s)
                new = g.call_function(QLINEAR_OP, QLINEAR.positional(
                    xq=xq, x_scale=xs, w_q=wq, w_scale=ws, w_zero=wz, bias=s.bias,
                    weight_bits=lp.weight_bits, group_size=lp.weight_group or 0, out_dtype=out_dtype))
        new.meta = dict(s.node.meta)
        new.meta[LAYER_META] = s.name
        s.node.replace_all_uses_with(new)
        replaced[s.node] = new
        g.erase_node(s.node)
        if s.x.op == "call_function" and s.x.target == BALANCE_OP and not s.x.users:
            g.erase_node(s.x)
        tensors.drop_weight(s.weight_node)
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


def _add_weight(tensors: GraphTensors, s: LinearSite, lp: LayerPlan, cache, suffix: str = ""):
    qw = _quantize(s.weight, lp, None if s.derived_weight else cache, s.param)
    q = pack_int4(qw.q) if lp.weight_bits == 4 and not lp.fp8 else qw.q
    q_name, scale_name, zero_name = int_weight.weight_names(s.name, suffix)
    zero = tensors.add_tensor(zero_name, qw.zero) if qw.zero is not None else None
    return tensors.add_tensor(q_name, q), tensors.add_tensor(scale_name, qw.scale), zero


def version_suffixes(lp: LayerPlan) -> list[str]:
    """Per timestep range, the suffix of the names of the weight tensors it runs on. Ranges with
    the same weight format share one copy, named after the first of them: ``""`` for range 0
    (named like a static layer's weight), ``"_r<i>"`` otherwise."""
    first: dict[tuple, int] = {}
    out = []
    for i, (bits, _, sym) in enumerate(lp.versions()):
        j = first.setdefault((bits, sym), i)
        out.append(f"_r{j}" if j else "")
    return out


def _add_versions(tensors: GraphTensors, s: LinearSite, lp: LayerPlan, cache) -> list[tuple]:
    """``(w_q, w_scale, w_zero)`` nodes per timestep range (see ``version_suffixes``)."""
    added: dict[str, tuple] = {}
    out = []
    for i, suffix in enumerate(version_suffixes(lp)):
        if suffix not in added:
            added[suffix] = _add_weight(tensors, s, lp.at_range(i), cache, suffix)
        out.append(added[suffix])
    return out


def _timestep_linear(g, s: LinearSite, lp: LayerPlan, plan: Plan, timestep, versions):
    """The ``viditq.qlinear_timestep`` node for ``s`` (inserted at the graph's insert point)."""
    src, vec, rot = _unbalanced(s.x)
    w_q, w_scale, w_zero = (list(t) for t in zip(*versions))
    widths = lp.versions()
    return g.call_function(QLINEAR_TIMESTEP_OP, QLINEAR_TIMESTEP.positional(
        x=src, smooth=vec, rotation=list(rot), timestep=timestep,
        bounds=[float(b) for b in plan.timestep_bounds], w_q=w_q, w_scale=w_scale, w_zero=w_zero,
        bias=s.bias, weight_bits=[v[0] for v in widths], act_bits=[v[1] for v in widths],
        group_size=lp.weight_group or 0, out_dtype=output_dtype(s)))


def _unbalanced(x):
    """``(src, smooth, rotation)`` with ``x == viditq.balance(src, smooth, rotation)``, so the
    consuming op balances inside its quantization; ``(x, None, [])`` for an unbalanced input."""
    if x.op == "call_function" and x.target == BALANCE_OP:
        return tuple(BALANCE.node_args(x).values())
    return x, None, []


def _quantized_input(tensors, s: LinearSite, lp: LayerPlan, act_of: dict, stats):
    """The (xq, x_scale) nodes for ``s``'s input, created once per (input, format)."""
    g = tensors.gm.graph
    src, vec, rot = _unbalanced(s.x)
    key = (src, vec, tuple(rot), lp.act_bits, lp.number_format, s.name if lp.act_static else None)
    if key not in act_of:
        static = None
        if lp.act_static:
            scale = numerics.static_scale(stats.absmax(s.name), lp.act_bits)  # type: ignore[arg-type]  # quantized
            static = tensors.add_tensor(int_weight.act_scale_name(s.name), scale)
        if lp.fp8:
            node = g.call_function(QUANTIZE_ACT_FP8_OP, QUANTIZE_ACT_FP8.positional(
                x=src, smooth=vec, rotation=list(rot)))
        else:
            node = g.call_function(QUANTIZE_ACT_OP, QUANTIZE_ACT.positional(
                x=src, smooth=vec, rotation=list(rot), static_scale=static, act_bits=lp.act_bits))
        fake_call(node)
        xq = g.call_function(operator.getitem, (node, 0))
        xs = g.call_function(operator.getitem, (node, 1))
        for i, item in enumerate((xq, xs)):
            if "val" in node.meta:
                item.meta["val"] = node.meta["val"][i]
        act_of[key] = (xq, xs)
    return act_of[key]


def _quantize(weight, lp: LayerPlan, cache, param=None):
    """``weight`` quantized, through ``cache`` keyed by ``param`` (the model's tensor behind it:
    a rewritten convolution's ``[O, I]`` weight is a fresh view in each graph) or ``weight``."""
    if cache is None or lp.balance is not None:
        # a balanced weight is a fresh tensor of this graph; nothing to share
        return int_weight.quantize_weight(weight, lp)
    owner = param if param is not None else weight
    per_weight = cache.setdefault(owner, {})
    key = (owner._version, lp.weight_bits, lp.weight_sym, lp.weight_group, lp.number_format)
    if key not in per_weight:
        for stale in [k for k in per_weight if k[0] != owner._version]:
            del per_weight[stale]  # quantized from an older value of this weight
        per_weight[key] = int_weight.quantize_weight(weight, lp)
    return per_weight[key]



def share_cached(cache, parts: list[torch.Tensor], fused: torch.Tensor) -> int:
    """Make the quantized weights in ``cache`` (see ``quantize_linears``) that are one of
    ``parts`` views of ``fused``, their concatenation along dim 0 (``passes.fuse_qkv``), so the
    cache and the graph hold one copy. Returns the number of cached tensors rebound (0 for 4-bit
    weights: the cache holds them unpacked, the graph packed)."""
    import dataclasses

    if cache is None:
        return 0
    offsets, start = {}, 0
    for p in parts:
        offsets[id(p)] = (p, start)
        start += p.shape[0]
    if start != fused.shape[0]:
        raise ValueError(f"share_cached: parts hold {start} rows, the fused tensor {fused.shape[0]}")
    rebound = 0
    for per_weight in cache.values():
        for key, qw in list(per_weight.items()):
            changes = {}
            for name in ("q", "scale", "zero"):
                t = getattr(qw, name)
                hit = offsets.get(id(t)) if t is not None else None
                if hit is not None and hit[0] is t and t.dtype == fused.dtype \
                        and t.shape[1:] == fused.shape[1:]:
                    changes[name] = fused[hit[1]:hit[1] + t.shape[0]]
            if changes:
                per_weight[key] = dataclasses.replace(qw, **changes)
                rebound += len(changes)
    return rebound
