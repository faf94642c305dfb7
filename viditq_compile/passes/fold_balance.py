"""The fold step: attention out projections whose balancing moves into their value projection.

Reads the graph's linear sites and a plan, writes a plan (it rewrites no graph). For every quantized
out projection ``o`` that the plan balances (smoothing, rotation or both) and whose attention's value
comes from a quantized layer ``v`` through layout ops only (``graph.head_layout.value_head_map``),
it sets ``o.balance_folded_into = v`` and, when ``o`` rotates, ``o.rotation_blocks`` to the head
count: a rotation per head commutes with the attention, a full-width one mixes heads and does not.
The balance pass then applies ``M = diag(a) R`` (``a`` the activation vector) to ``v``'s weight and bias
(``methods.balance.fold_into_value``) and gives ``o`` no activation transform.

Refused (the layer stays balanced at run time, its plan ``note`` saying why, and a warning): an
out projection whose heads the graph does not map (joint attention, a value through RoPE or a
norm, a hand-written attention, a value projection that stays floating point or is called twice),
whose head channels are not contiguous blocks of its input (no block-diagonal rotation lines up),
or whose head width has no Hadamard construction. Assumes the select pass wrote ``plan``; keeps
every other layer's plan. The fold is exact in exact arithmetic; what changes is the rounding: the
per-head rotation spreads outliers over a head's channels instead of all of them, and ``v``'s weight
is quantized after ``M`` is folded in (RESULTS.md, "Folded balancing", has the quality it costs).
"""

from __future__ import annotations

import logging
from dataclasses import replace

from viditq_compile.config.plan import Plan
from viditq_compile.graph.head_layout import HeadLayoutError, reads_attention, value_head_map
from viditq_compile.graph.sites import LinearSite
from viditq_compile.methods import balance
from viditq_compile.numerics.hadamard import hadamard_order_split

log = logging.getLogger(__name__)


def fold_balance(sites: list[LinearSite], plan: Plan) -> tuple[Plan, dict[str, str]]:
    """``plan`` with the folds set (see the module docstring), and the out projections that were
    not folded with the reason (also in their plan ``note``)."""
    out = replace(plan, layers=dict(plan.layers))
    refused: dict[str, str] = {}
    seen: set[str] = set()
    for s in sites:
        lp = plan.layers[s.name]
        if s.name in seen or not lp.quantized or lp.balance is None or lp.balance_folded_into:
            continue
        seen.add(s.name)
        if not reads_attention(s):
            continue
        why, blocks, into = _fold_of(s, sites, plan)
        if why is not None:
            refused[s.name] = why
            note = f"balance not folded into the value projection: {why}"
            log.warning("layer %s: %s", s.name, note)
            out.layers[s.name] = replace(lp, note="; ".join(filter(None, (lp.note, note))))
            continue
        out.layers[s.name] = replace(lp, balance_folded_into=into,
                                     rotation_blocks=blocks if balance.rotates(lp.balance) else None)
    out.validate()
    return out, refused


def _fold_of(s: LinearSite, sites: list[LinearSite], plan: Plan) -> tuple[str | None, int, str]:
    """(why not, rotation blocks, value projection) of out projection ``s``."""
    lp = plan.layers[s.name]
    try:
        heads = value_head_map(s, sites)
    except HeadLayoutError as e:
        return str(e), 0, ""
    v = plan.layers[heads.value]
    if not v.quantized:
        return f"its value projection {heads.value!r} stays floating point", 0, ""
    if v.balance_folded_into is not None:
        return f"its value projection {heads.value!r} folds its own balancing", 0, ""
    if any(p.balance_folded_into == heads.value for p in plan.layers.values()):
        return f"another layer folds into {heads.value!r}", 0, ""
    if balance.rotates(lp.balance):
        if lp.rotation_blocks is not None:
            return f"its rotation already has {lp.rotation_blocks} blocks (tensor parallelism)", 0, ""
        d = heads.head_dim
        spans = [set(range(b, b + d)) for b in range(0, s.in_features, d)]
        if not all(set(row.tolist()) in spans for row in heads.out_channels):
            return "its heads are not contiguous channel blocks of its input", 0, ""
        try:
            hadamard_order_split(d)
        except ValueError:
            return f"no Hadamard construction for the head width {d}", 0, ""
    return None, heads.heads, heads.value
