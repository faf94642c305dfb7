"""The attention pass: SDPA calls -> ``viditq.attention`` (SageAttention-style, ``numerics.attention``).

Matches: every ``scaled_dot_product_attention`` call (``aten.scaled_dot_product_attention`` in an
exported program, ``torch.nn.functional.scaled_dot_product_attention`` in a Dynamo graph) whose
kind (``graph.roles``: self, temporal or cross attention, from data flow; by module name where sizes
cannot tell time from space) the recipe's ``attention`` rule (``config.recipe.AttentionRule``) sets
to ``"int8"``. ``choose_attentions`` decides, ``quantize_attention`` rewrites.

Assumes (and refuses otherwise, keeping SDPA with the reason recorded in the choice): no
``attn_mask``, ``is_causal=False``, ``dropout_p=0``, q / k / v of one float dtype with the same
leading (batch, head) dims (no GQA broadcast), a static head dim. PixArt's cross-attention passes its
caption mask, so it stays SDPA even where a recipe asks for it. Hand-written attentions (softmax of
a matmul) are found by the role analysis but not rewritten: listed with that reason.

Keeps: the graph's inputs and outputs; the node's metadata (``nn_module_stack`` names the attention);
SDPA's scale (``1 / sqrt(D)`` when the call gives none). Not exact: the op is quantized (its error
against fp32 SDPA is measured in ``tests/numerics/test_attention.py``). Runs after the select pass
(the roles need the float linears) and touches no linear, so the linears' plan is unaffected.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from viditq_compile.graph import roles
from viditq_compile.graph.sites import LinearSite, _name_from_stack, fake_call, node_value
from viditq_compile.numerics import attention as attn
from viditq_compile.ops.schema import ATTENTION

log = logging.getLogger(__name__)

ATTENTION_OP = ATTENTION.overload
SDPA_TARGETS = (torch.ops.aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention)
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


@dataclass(frozen=True)
class AttentionChoice:
    """One attention of the graph: ``name`` (its module path, else the node's name), ``node`` (the
    node's name), ``kind`` (``graph.roles``' role of it), ``format`` (``"int8"``: rewritten to
    ``viditq.attention``; ``"fp"``: left as it is) and ``reason`` (why, in words)."""

    name: str
    node: str
    kind: str
    format: str
    reason: str
    block: int = attn.DEFAULT_BLOCK

    @property
    def quantized(self) -> bool:
        return self.format == "int8"


def _sdpa_args(node: fx.Node) -> dict | None:
    if node.op != "call_function" or node.target not in SDPA_TARGETS:
        return None
    out: dict = dict(_SDPA_DEFAULTS)
    out.update(zip(_SDPA_ARGS, node.args))
    out.update(node.kwargs)
    return out


def _refusal(a: dict) -> str | None:
    """Why this SDPA call cannot become ``viditq.attention``, or None."""
    if a["attn_mask"] is not None:
        return f"has an attention mask ({ATTENTION.display} takes none)"
    if a["is_causal"] is not False:
        return f"is causal ({ATTENTION.display} has no causal masking)"
    if a["dropout_p"] != 0:
        return f"has dropout_p={a['dropout_p']!r}"
    vals = [node_value(a[k]) for k in ("query", "key", "value")]
    if any(not isinstance(v, torch.Tensor) for v in vals):
        return "q / k / v have no recorded values (shapes unknown)"
    q, k, v = vals
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in attn.FLOAT_DTYPES:
        return f"dtypes {q.dtype} / {k.dtype} / {v.dtype} (needs one of {attn.FLOAT_DTYPES})"
    if q.dim() < 3 or not (q.dim() == k.dim() == v.dim()):
        return f"ranks {q.dim()} / {k.dim()} / {v.dim()}"
    if a["enable_gqa"] or q.shape[:-2] != k.shape[:-2] or k.shape[:-2] != v.shape[:-2]:
        return (f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} differ in leading dims "
                f"(broadcast or grouped-query heads)")
    if not isinstance(q.shape[-1], int):
        return f"head dim {q.shape[-1]} is symbolic"
    return None


def _kinds(gm: fx.GraphModule, sites: list[LinearSite], latent_input, frame_axis) -> dict[fx.Node, str]:
    """Attention output node -> its role, as ``graph.roles`` decides it for its q/k/v linears."""
    # roles keeps its per-attention facts private; the kinds are the ones layer_roles gives the
    # projections of each attention (name rule where sizes cannot tell time from space)
    facts = roles._GraphFacts(gm, sites, latent_input, frame_axis)
    out: dict[fx.Node, str] = {}
    for i, a in enumerate(facts.attentions):
        kind, _ = facts.kinds.get(i, (None, ""))
        if kind is None:
            name = _name_from_stack(a.node) or a.node.name
            kind = "temporal_attn" if roles._TEMPORAL_NAME.search(name) else "self_attn"
        out[a.node] = kind
    return out


def choose_attentions(gm: fx.GraphModule, sites: list[LinearSite], rule, *, latent_input: str | None = None,
                      frame_axis: int | None = None, keep: dict[str, str] | None = None) -> list[AttentionChoice]:
    """What each attention of ``gm`` becomes under ``rule`` (an ``AttentionRule``), in graph order.

    sites: the graph's ``linear_sites()`` before any linear is rewritten (the roles read them).
    keep: attention name -> reason, attentions that stay SDPA whatever the rule says (a plan's
    ``attention.kept``: what the search kept in floating point, and what was refused before).
    Every SDPA call and every hand-written attention the role analysis finds gets a choice.
    """
    from viditq_compile.config.recipe import AttentionRule

    if not isinstance(rule, AttentionRule):
        raise TypeError(f"rule must be a viditq_compile.config.recipe.AttentionRule, got {type(rule).__name__}")
    kinds = _kinds(gm, sites, latent_input, frame_axis) if rule.quantizes else {}
    choices = []
    for node in gm.graph.nodes:
        a = _sdpa_args(node)
        if a is None and node not in kinds:
            continue
        kind = kinds.get(node, "unknown")
        name = _name_from_stack(node) or node.name
        want = rule.format_of(kind)
        if not rule.quantizes:
            reason = "the recipe quantizes no attention"
        elif keep and name in keep:
            reason = str(keep[name])
        elif want == "fp":
            reason = f"{kind}: the recipe keeps it in floating point"
        elif a is None:
            reason = f"{kind}: a hand-written attention (softmax of a matmul), not an SDPA call"
            log.warning("attention %s stays in floating point: %s", name, reason)
        else:
            refused = _refusal(a)
            if refused is None:
                choices.append(AttentionChoice(name, node.name, kind, "int8", f"{kind}: int8 Q·Kᵀ "
                                               f"(block {rule.block}), fp32 softmax, 16-bit P·V", rule.block))
                continue
            reason = f"{kind}: {refused}"
            log.warning("attention %s stays in floating point although the recipe asks int8 for %s: %s",
                        name, kind, refused)
        choices.append(AttentionChoice(name, node.name, kind, "fp", reason, rule.block))
    return choices


def quantize_attention(gm: fx.GraphModule, choices: list[AttentionChoice]) -> int:
    """Replace each SDPA call ``choices`` quantize (by node name) with ``viditq.attention``; returns
    the number replaced. A choice naming a node the graph lacks, or one that is not an SDPA call,
    raises ``ValueError``."""
    nodes = {n.name: n for n in gm.graph.nodes}
    count = 0
    for c in choices:
        if not c.quantized:
            continue
        node = nodes.get(c.node)
        a = _sdpa_args(node) if node is not None else None
        if node is None or a is None or _refusal(a) is not None:
            raise ValueError(f"attention {c.name!r}: node {c.node!r} is not an SDPA call this pass can "
                             f"rewrite in this graph")
        q = node_value(a["query"])
        scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(q.shape[-1])
        with gm.graph.inserting_after(node):
            new = gm.graph.call_function(ATTENTION_OP, ATTENTION.positional(
                q=a["query"], k=a["key"], v=a["value"], scale=float(scale), block_q=c.block, block_k=c.block))
        new.meta.update(node.meta)
        new.meta.pop("val", None)
        fake_call(new)
        if "val" not in new.meta and "example_value" in node.meta:
            new.meta["example_value"] = node.meta["example_value"]
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    log.info("quantized %d of %d attention(s)", count, len(choices))
    return count


def program_attentions(gm: fx.GraphModule) -> list[tuple[str, int, int]]:
    """``(name, block_q, block_k)`` of every ``viditq.attention`` call in ``gm`` (a program's graph,
    loaded or built), for the report."""
    out = []
    for n in gm.graph.nodes:
        if ATTENTION.calls(n):
            a = ATTENTION.node_args(n)
            out.append((_name_from_stack(n) or n.name, int(a["block_q"]), int(a["block_k"])))
    return out
