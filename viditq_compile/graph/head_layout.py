"""Where an attention's heads sit in the channels of its value and out projections.

An attention output projection ``o`` reads ``O = concat_h(P_h V_h)``, and ``V`` is the output of a
value projection ``v`` reshaped into heads. A linear map ``M`` of ``o``'s input channels that mixes
no two heads (a diagonal smoothing, a per-head rotation) commutes with ``P_h``:
``O M = concat_h(P_h (V_h M_h))``, so it can be applied to ``v``'s weight and bias instead of to
every activation of ``o`` (``methods.balance.fold_into_value``). That needs, per head ``h`` and
position ``i`` within it, the channel of ``v``'s output and the channel of ``o``'s input it is:
``value_head_map`` finds them.

Method: from ``o``'s input back to an attention (``scaled_dot_product_attention``, its ATen
variants or ``viditq.attention``) and from the attention's value back to a linear, through layout
ops only (views, transposes, permutes, copies, casts), each value used by the next op alone. Each
chain is then run on a probe tensor whose every element holds its channel index (a head-major
label on the attention side), so any head layout a model spells (``view + transpose``,
``unflatten``, ``permute``, einops-style reshapes) is read the same way, and a chain that moves
channels between tokens (an all-to-all) is refused. Joint attention (q / k / v concatenated from
two streams, the output split into two projections), hand-written attentions and value paths
through RoPE or a norm are refused with the reason. It rewrites nothing.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.fx as fx
from torch import Tensor

from viditq_compile.ops import schema

if TYPE_CHECKING:
    from viditq_compile.graph.sites import LinearSite

# methods.balance reads head maps, and config imports methods: this module imports no other part of
# graph/ (roles, sites reach config); graph.roles takes these helpers from here
SDPA_OPS = {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
         "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
         "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_fused_attention_overrideable",
         schema.ATTENTION.name}
"""Names (``_op``) of the attention ops: SDPA, its ATen variants and ``viditq.attention`` (q, k, v first)."""
_SDPA = SDPA_OPS


def _op(n: fx.Node) -> str:
    if n.op == "call_method":
        return str(n.target)
    if n.op != "call_function":
        return n.op
    t = n.target
    return t._opname if isinstance(t, torch._ops.OpOverload) else getattr(t, "__name__", str(t))


def node_value(node):
    """The traced value of a node (``graph.sites.node_value``)."""
    return node.meta.get("val", node.meta.get("example_value")) if isinstance(node, fx.Node) else node


def _hint(size) -> int | None:
    """The example value of a size; ``None`` for an unbacked one."""
    if not isinstance(size, torch.SymInt):
        return int(size)
    node = size.node
    if node.hint is not None:
        return int(node.hint)
    value = node.expr.xreplace(getattr(node.shape_env, "var_to_val", {}))
    return int(value) if value.is_number else None

# ops that move values without mixing channels or tokens' features; casts run as identities on
# the probe (the labels are exact integers in any dtype the chain would cast to)
_MOVES = {"view", "_unsafe_view", "reshape", "permute", "transpose", "t", "flatten", "unflatten",
          "contiguous", "clone", "squeeze", "unsqueeze", "alias", "detach"}
_CASTS = {"_to_copy", "to", "type_as", "float", "half", "bfloat16"}
MAX_PROBE_ELEMENTS = 1 << 27
"""Largest chain value the probe materializes (int32 labels: 512 MiB); larger ones are refused."""


class HeadLayoutError(ValueError):
    """``o`` / ``v`` are no out / value projection pair whose heads can be mapped; says why."""


@dataclass(frozen=True)
class HeadMap:
    """``out`` reads an attention whose value ``value`` produces. ``out_channels[h, i]`` /
    ``value_channels[h, i]``: the input channel of ``out`` / output channel of ``value`` that is
    position ``i`` of head ``h`` (``[heads, head_dim]`` int64 each)."""

    out: str
    value: str
    out_channels: Tensor
    value_channels: Tensor

    @property
    def heads(self) -> int:
        return int(self.out_channels.shape[0])

    @property
    def head_dim(self) -> int:
        return int(self.out_channels.shape[1])


def value_head_map(out: LinearSite, sites: list[LinearSite]) -> HeadMap:
    """The head map of out projection ``out`` (see the module docstring); ``HeadLayoutError``
    saying why when ``out`` reads no attention through layout ops, or its value is no linear of
    ``sites`` whose output only the attention reads."""
    calls: dict[str, int] = {}
    for s in sites:
        calls[s.name] = calls.get(s.name, 0) + 1
    if calls.get(out.name, 0) != 1:
        raise HeadLayoutError(f"layer {out.name!r} is called {calls.get(out.name, 0)} times")
    readers = _data_users(out.x)
    if len(readers) != 1:
        raise HeadLayoutError(f"its input is read by {len(readers)} ops ({', '.join(n.name for n in readers[:3])}), "
                              f"not the layer alone")
    attention, out_chain = _walk_back(out.x, is_end=lambda n: _op(n) in _SDPA, what="an attention")
    value_node = attention.args[2] if len(attention.args) > 2 else attention.kwargs.get("value")
    if not isinstance(value_node, fx.Node):
        raise HeadLayoutError(f"attention {attention.name} has no value node")
    by_node = {s.node: s for s in sites}
    linear, value_chain = _walk_back(value_node, is_end=lambda n: n in by_node,
                                     what="a linear layer (the value projection)")
    value = by_node[linear]
    if calls[value.name] != 1:
        raise HeadLayoutError(f"its value projection {value.name!r} is called {calls[value.name]} times")
    if value.name == out.name:
        raise HeadLayoutError("its value projection is the layer itself")
    v_val, a_val = node_value(linear), node_value(attention)
    if isinstance(a_val, (tuple, list)):
        a_val = a_val[0]
    if not isinstance(v_val, Tensor) or not isinstance(a_val, Tensor) or a_val.dim() < 3:
        raise HeadLayoutError("the graph records no traced shapes for the attention")
    heads, head_dim = _hint(a_val.shape[-3]), _hint(a_val.shape[-1])
    if heads is None or head_dim is None:
        raise HeadLayoutError("the attention's head count or head dim is not a concrete size")
    # value side: each element of v's output holds its channel; read it back at [head, position]
    v_labels = _run(value_chain, _labels(v_val, value.out_features, last_axis=True))
    if _hint(v_labels.shape[-1]) != head_dim or v_labels.dim() < 3 or v_labels.shape[-3] != heads:
        raise HeadLayoutError(f"the value reaches the attention as {tuple(v_labels.shape)}, not "
                              f"[..., {heads}, tokens, {head_dim}]")
    value_channels = _constant_over_tokens(v_labels.movedim(-3, 0).movedim(-1, 1), "value")
    # out side: each element of the attention output holds head * head_dim + position
    a_labels = _labels(a_val, heads * head_dim, last_axis=False, heads=heads, head_dim=head_dim)
    o_labels = _run(out_chain, a_labels)
    if o_labels.shape[-1] != out.in_features:
        raise HeadLayoutError(f"the attention output reaches the layer as {tuple(o_labels.shape)}, "
                              f"not [..., {out.in_features}]")
    flat = _constant_over_tokens(o_labels.movedim(-1, 0), "out")  # [K]: head-major label per channel
    if sorted(flat.tolist()) != list(range(out.in_features)):
        raise HeadLayoutError("the attention output's channels do not map one to one onto the layer's input")
    out_channels = torch.empty(out.in_features, dtype=torch.int64)
    out_channels[flat] = torch.arange(out.in_features)
    return HeadMap(out.name, value.name, out_channels.view(heads, head_dim), value_channels)


def reads_attention(out: LinearSite) -> bool:
    """Whether ``out``'s input is an attention's output through layout ops (other readers of the
    values on the way allowed): an out projection, foldable or not."""
    try:
        _walk_back(out.x, is_end=lambda n: _op(n) in _SDPA, what="an attention", alone=False)
    except HeadLayoutError:
        return False
    return True


def _walk_back(start: fx.Node, is_end, what: str, alone: bool = True) -> tuple[fx.Node, list[fx.Node]]:
    """The first node satisfying ``is_end`` back from ``start`` through layout ops, and the layout
    ops from it to ``start`` in execution order (each read by the next alone, with ``alone``)."""
    chain: list[fx.Node] = []
    n = start
    while not is_end(n):
        op = _op(n)
        if n.op == "call_function" and n.target is operator.getitem and n.args[1] == 0 \
                and isinstance(n.args[0], fx.Node) and _op(n.args[0]) in _SDPA:
            pass  # output 0 of an ATen flash-attention variant
        elif op not in _MOVES | _CASTS:
            raise HeadLayoutError(f"{what} is not reached through layout ops alone: {n.name} "
                                  f"({op}) is in the way")
        src = n.args[0] if n.args else n.kwargs.get("input", n.kwargs.get("self"))
        if not isinstance(src, fx.Node):
            raise HeadLayoutError(f"{n.name} ({op}) reads no tensor")
        if alone and len(_data_users(src)) != 1:
            raise HeadLayoutError(f"{src.name} is read by {len(_data_users(src))} ops (a fold would change "
                                  f"what the others see)")
        chain.append(n)
        n = src
    return n, chain[::-1]


def _data_users(n: fx.Node) -> list[fx.Node]:
    """The users of ``n`` that read its values, not only its shape (``sym_size``, ``size``) or
    its metadata (export's ``_assert_tensor_metadata``)."""
    out = []
    for u in n.users:
        v, op = node_value(u), _op(u)
        if isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool) or op in ("sym_size", "size", "dim") \
                or op.startswith("_assert"):
            continue
        out.append(u)
    return out


def _concrete(a):
    """An argument of a chain op with its sizes made concrete (example values)."""
    if isinstance(a, fx.Node):
        v = node_value(a)
        if isinstance(v, torch.SymInt):
            h = _hint(v)
            if h is None:
                raise HeadLayoutError(f"size {a.name} has no example value")
            return h
        if isinstance(v, (int, float, bool)):
            return v
        raise HeadLayoutError(f"{a.name} is a second tensor operand of a layout op")
    if isinstance(a, torch.SymInt):
        return _concrete_symint(a)
    if isinstance(a, (list, tuple)):
        return type(a)(_concrete(x) for x in a)
    return a


def _concrete_symint(a: torch.SymInt) -> int:
    h = _hint(a)
    if h is None:
        raise HeadLayoutError("a size of the chain has no example value")
    return h


def _run(chain: list[fx.Node], probe: Tensor) -> Tensor:
    """``chain`` (layout ops, each reading the previous) applied to ``probe``."""
    t = probe
    for n in chain:
        op = _op(n)
        if op in _CASTS or (n.op == "call_function" and n.target is operator.getitem):
            continue
        args = [_concrete(a) for a in n.args[1:]]
        kwargs = {k: _concrete(v) for k, v in n.kwargs.items() if k not in ("input", "self")}
        if op in ("view", "_unsafe_view"):
            # the same elements as the view; the probe's strides need not allow a view (casts,
            # which the graph's view may follow, are skipped here)
            t = t.reshape(*(args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args))
        elif n.op == "call_method":
            t = getattr(t, str(n.target))(*args, **kwargs)
        else:
            t = n.target(t, *args, **kwargs)  # type: ignore[operator]  # a call_function: a callable
    return t


def _labels(val: Tensor, channels: int, *, last_axis: bool, heads: int = 0, head_dim: int = 0) -> Tensor:
    """An int32 probe of ``val``'s shape: the channel along the last axis (``last_axis``), or
    ``head * head_dim + position`` for an attention output ``[..., heads, tokens, head_dim]``."""
    shape = [_concrete_symint(s) if isinstance(s, torch.SymInt) else int(s) for s in val.shape]
    numel = 1
    for s in shape:
        numel *= s
    if numel > MAX_PROBE_ELEMENTS:
        raise HeadLayoutError(f"the traced value {shape} is too large to probe ({numel} elements)")
    if last_axis:
        if shape[-1] != channels:
            raise HeadLayoutError(f"the value projection's output {shape} has no {channels} channels last")
        return torch.arange(channels, dtype=torch.int32).expand(*shape).contiguous()
    lab = torch.arange(heads * head_dim, dtype=torch.int32).view(heads, 1, head_dim)
    return lab.expand(*shape).contiguous()


def _constant_over_tokens(t: Tensor, side: str) -> Tensor:
    """``t [A, (B,) ...rest]`` -> ``t[:, (:,) 0, ...]`` when the rest (batch, tokens) holds the same
    labels everywhere: the chain kept each token's channels with that token."""
    lead = 2 if side == "value" else 1
    flat = t.reshape(*t.shape[:lead], -1)
    first = flat[..., :1]
    if not bool((flat == first).all()):
        raise HeadLayoutError(f"the {side} chain moves channels across tokens (an all-to-all or a "
                              f"token-mixing reshape)")
    return first[..., 0].to(torch.int64)
