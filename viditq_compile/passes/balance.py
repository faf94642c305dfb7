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

Assumes: the select pass wrote the plan (``balance``, ``alpha``, ``rotation_seed``); layers that
smooth have calibration statistics (``match_plan`` / ``select_linears`` guarantee it).
Keeps: the graph's outputs, in exact arithmetic (fp32 rounding only). Updates each balanced
``LinearSite`` in place (``x``, ``weight``, ``weight_node``) so later passes see the new graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from viditq_compile.config.plan import Plan
from viditq_compile.graph.sites import GraphTensors, LinearSite, fake_call
from viditq_compile.numerics import quant as numerics
from viditq_compile.numerics.hadamard import kron_factors, random_signs

BALANCE_OP = torch.ops.viditq.balance.default


def balance_groups(sites: list[LinearSite], plan: Plan) -> list[tuple[list[LinearSite], tuple]]:
    """Balanced sites grouped by the transform they must share, in graph order.

    Sites are linked when they read the same tensor or belong to the same layer (a layer called
    on two inputs needs one W'); each connected component with the same (method, alpha, seed)
    is one group.
    """
    parent: dict = {}

    def find(k):
        while parent.setdefault(k, k) != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    chosen = []
    for s in sites:
        lp = plan.layers[s.name]
        if not lp.quantized or lp.balance is None:
            continue
        key = (lp.balance, lp.alpha, lp.rotation_seed)
        chosen.append((s, key))
        a, b = find(("x", s.x, key)), find(("layer", s.name, key))
        parent[a] = b
    groups: dict = {}
    for s, key in chosen:
        groups.setdefault(find(("layer", s.name, key)), ([], key))[0].append(s)
    return list(groups.values())


@dataclass(frozen=True)
class LayerTransform:
    """One balanced layer: ``x' = balance(x, act_vector, rotation)``, ``W' = weight`` (fp32)."""

    act_vector: torch.Tensor
    rotation: list[torch.Tensor]
    weight: torch.Tensor


def layer_transforms(sites: list[LinearSite], plan: Plan, stats=None) -> dict[str, LayerTransform]:
    """The balancing of every balanced layer of ``plan``, computed once per transform group
    (``balance_groups``): the activation vector ``m · d``, the Hadamard factors and W'.

    Shared by this pass and the sensitivity pass, so that the search measures the same rounding
    the quantized program does. A weight holding NaN or Inf is refused (``ValueError`` naming the
    layer, what is not finite and where) before it is balanced.
    """
    out: dict[str, LayerTransform] = {}
    for members, (method, alpha, seed) in balance_groups(sites, plan):
        layers = {s.name: s for s in members}  # one entry per distinct layer
        k = members[0].in_features
        weights = {name: s.weight.detach().to(torch.float32) for name, s in layers.items()}
        for name, w in weights.items():
            # checked before balancing: a rotation would spread one NaN over its whole row
            bad = numerics.nonfinite_summary(w)
            if bad:
                raise ValueError(f"layer {name!r}: weight contains NaN or Inf ({bad}); it cannot be "
                                 f"balanced or quantized")
        smooth = signs = None
        factors: list[torch.Tensor] = []
        if "smooth" in method:
            w_max = torch.stack([w.abs().amax(dim=0) for w in weights.values()]).amax(dim=0)
            a_max = torch.stack([_act_absmax(stats, name, k) for name in layers]).amax(dim=0)
            smooth = numerics.smoothing_vector(w_max, a_max, alpha)
        if "rotate" in method:
            signs = random_signs(k, seed)
            factors = kron_factors(k)
        act_vec = smooth * signs if smooth is not None and signs is not None else \
            (smooth if smooth is not None else signs)
        for name in layers:
            w_bal = numerics.balance_weight(weights[name], smooth, signs, factors)
            out[name] = LayerTransform(act_vec.contiguous(), factors, w_bal)
    return out


def balance_linears(tensors: GraphTensors, sites: list[LinearSite], plan: Plan, stats=None) -> int:
    """Apply the plan's balancing; returns the number of ``viditq.balance`` nodes inserted."""
    g = tensors.gm.graph
    order = {n: i for i, n in enumerate(g.nodes)}
    transforms = layer_transforms(sites, plan, stats)
    hadamard_nodes: dict[int, list[fx.Node]] = {}
    inserted = 0
    for members, _ in balance_groups(sites, plan):
        layers = {s.name: s for s in members}
        k = members[0].in_features
        first = transforms[members[0].name]
        vec_node = tensors.add_tensor(f"{members[0].name}.viditq_balance_vector", first.act_vector)
        if first.rotation and k not in hadamard_nodes:
            hadamard_nodes[k] = [tensors.add_tensor(f"viditq_hadamard.{k}.{i}", f.contiguous())
                                 for i, f in enumerate(first.rotation)]
        rot_nodes = hadamard_nodes.get(k, []) if first.rotation else []
        new_weight = {}
        for name, s in layers.items():
            w_bal = transforms[name].weight
            new_weight[name] = (w_bal, tensors.add_tensor(f"{name}.viditq_balanced_weight",
                                                          w_bal.to(s.weight.dtype).contiguous()))
        balanced_x: dict[fx.Node, fx.Node] = {}
        for s in sorted(members, key=lambda s: order[s.node]):
            if s.x not in balanced_x:
                with g.inserting_before(s.node):
                    node = g.call_function(BALANCE_OP, (s.x, vec_node, rot_nodes))
                fake_call(node)
                balanced_x[s.x] = node
                inserted += 1
            old_weight = s.weight_node
            w_bal, w_node = new_weight[s.name]
            s.node.replace_input_with(s.x, balanced_x[s.x])
            s.node.replace_input_with(old_weight, w_node)
            s.x, s.weight, s.weight_node = balanced_x[s.x], w_bal, w_node
            tensors.remove_if_unused(old_weight)
    tensors.finalize()
    return inserted


def _act_absmax(stats, name: str, k: int) -> torch.Tensor:
    a = stats.absmax(name).to(torch.float32)
    if a.shape != (k,):
        raise ValueError(f"calibration statistics of {name!r} have {tuple(a.shape)} channels, "
                         f"the layer has K={k}")
    return a
