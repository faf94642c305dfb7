"""The balance pass: ViDiT-Q channel balancing (smoothing + randomized Hadamard rotation).

Matches every linear call whose layer the plan balances and rewrites ``linear(x, W, b)`` into
``linear(viditq.balance(x, v, R), W', b)`` with

    v = m · d,   W' = (W · d / m) R_H        (m: smoothing vector, d: random ±1 signs,
                                             R_H: normalized Hadamard as Kronecker factors)

so that ``balance(x) @ W'^T == x @ W^T`` in exact arithmetic: balancing moves outliers from the
activations into the weights (smoothing) and spreads them over all channels (rotation), and the
quantize pass then rounds better-conditioned tensors. The weight side is computed here, once,
offline. The activation side is one ``viditq.balance`` node per producer: every balanced linear
reading the same tensor (q/k/v, the two MLP halves of a gated MLP, a layer called twice) shares
one smoothing vector, computed from their joint weight statistics, and one rotation. The quantize
pass fuses that node into the activation quantization (``viditq.quantize_act``), and Inductor
fuses its per-channel multiply into the producing kernel (e.g. the adaLN modulate).

A folded pair (``LayerPlan.balance_folded_into``, ``passes.fold_balance``): the out projection keeps
its input and gets ``W'``; the value projection gets its weight and bias with ``M`` folded in
(``methods.balance.fold_into_value``), and its own input balancing, if the plan has one.

Assumes: the select pass wrote the plan (``balance``, ``alpha``, ``rotation_seed``, ``rotation_blocks``); layers that
smooth have calibration statistics (``match_plan`` / ``select_linears`` guarantee it).
Keeps: the graph's outputs, in exact arithmetic (fp32 rounding only). Updates each balanced
``LinearSite`` in place (``x``, ``weight``, ``weight_node``) so later passes see the new graph.
"""

from __future__ import annotations

import torch.fx as fx

from viditq_compile.config.plan import Plan
from viditq_compile.graph.sites import GraphTensors, LinearSite, fake_call
from viditq_compile.methods import balance
from viditq_compile.methods.balance import balance_groups, layer_transforms
from viditq_compile.ops.schema import BALANCE

BALANCE_OP = BALANCE.overload


def balance_linears(tensors: GraphTensors, sites: list[LinearSite], plan: Plan, stats=None) -> int:
    """Apply the plan's balancing; returns the number of ``viditq.balance`` nodes inserted."""
    g = tensors.gm.graph
    order = {n: i for i, n in enumerate(g.nodes)}
    transforms = layer_transforms(sites, plan, stats)
    hadamard_nodes: dict[tuple[int, int], list[fx.Node]] = {}  # (K, diagonal blocks) -> factors
    inserted = 0
    grouped = {s.name for members, _ in balance_groups(sites, plan) for s in members}
    for s in sites:  # a value projection that carries a fold but balances no input of its own
        t = transforms.get(s.name)
        if t is not None and s.name not in grouped:
            _replace_weight(tensors, s, t, tensors.add_tensor(balance.weight_name(s.name),
                                                              t.weight.to(s.weight.dtype).contiguous()))  # type: ignore[union-attr]
    for members, _ in balance_groups(sites, plan):
        layers = {s.name: s for s in members}
        k = members[0].in_features
        first = transforms[members[0].name]
        if not first.balances_input:  # a folded out projection: its input arrives balanced
            for s in members:
                _replace_weight(tensors, s, first, tensors.add_tensor(
                    balance.weight_name(s.name), first.weight.to(s.weight.dtype).contiguous()))  # type: ignore[union-attr]
            continue
        vec_node = tensors.add_tensor(balance.vector_name(members[0].name), first.act_vector) \
            if first.act_vector is not None else None
        blocks = plan.layers[members[0].name].rotation_blocks or 1
        if first.rotation and (k, blocks) not in hadamard_nodes:
            hadamard_nodes[k, blocks] = [tensors.add_tensor(balance.hadamard_name(k, i, blocks), f.contiguous())
                                         for i, f in enumerate(first.rotation)]
        rot_nodes = hadamard_nodes.get((k, blocks), []) if first.rotation else []
        new_weight = {}
        for name, s in layers.items():
            w_bal = transforms[name].weight
            new_weight[name] = (w_bal, tensors.add_tensor(balance.weight_name(name),
                                                          w_bal.to(s.weight.dtype).contiguous()))  # type: ignore[union-attr]
        balanced_x: dict[fx.Node, fx.Node] = {}
        for s in sorted(members, key=lambda s: order[s.node]):
            if s.x not in balanced_x:
                with g.inserting_before(s.node):
                    node = g.call_function(BALANCE_OP, BALANCE.positional(x=s.x, smooth=vec_node,
                                                                          rotation=rot_nodes))
                fake_call(node)
                balanced_x[s.x] = node
                inserted += 1
            s.node.replace_input_with(s.x, balanced_x[s.x])
            s.x = balanced_x[s.x]
            _replace_weight(tensors, s, transforms[s.name], new_weight[s.name][1])
    tensors.finalize()
    return inserted


def _replace_weight(tensors: GraphTensors, s: LinearSite, t: balance.LayerTransform, w_node: fx.Node) -> None:
    """``s`` computes with ``t.weight`` (added as ``w_node``) and, for a folded value projection,
    ``t.bias``; ``s`` is updated in place."""
    old_weight = s.weight_node
    s.node.replace_input_with(old_weight, w_node)
    s.weight, s.weight_node, s.derived_weight = t.weight, w_node, True
    tensors.remove_if_unused(old_weight)
    if t.bias is not None:
        assert s.bias is not None and s.bias_value is not None  # fold_into_value folded one
        old_bias = s.bias
        b_node = tensors.add_tensor(balance.bias_name(s.name), t.bias.to(s.bias_value.dtype).contiguous())
        s.node.replace_input_with(old_bias, b_node)
        s.bias, s.bias_value = b_node, t.bias.to(s.bias_value.dtype)
        tensors.remove_if_unused(old_bias)
