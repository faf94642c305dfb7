"""The artifact route of sequence parallelism: an FX pass that makes a quantized program run on a
slice of the image tokens per rank, with Ulysses all-to-alls around its self-attentions.

``sequence_parallel(qm, mesh)`` takes a ``QuantizedModel`` (``vq.quantize`` or ``vq.load``) and
returns a ``SequenceParallelModel``: every rank calls it with the full inputs (as a pipeline calls
each rank) and gets the full output. ``shard_tokens(gm, group)`` is the pass.

Why it is exact: a quantized linear scales activations per token (one scale per row), layer norms
and modulations are per token, so all of a block but attention computes on a token slice what one
process computes for those tokens. A self-attention exchanges heads for tokens (Ulysses: each rank
then attends over every token with ``heads / degree`` heads, the same sums per head) and back; a
cross-attention over the replicated text attends locally.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import fx, nn

from viditq_compile.ops import schema
from viditq_compile.parallel.mesh import Group, resolve_group

log = logging.getLogger(__name__)

__all__ = ["SequenceParallelError", "SequenceParallelModel", "ShardReport", "sequence_parallel", "shard_tokens"]


class SequenceParallelError(ValueError):
    """The program cannot run sequence parallel as asked; the message names the node or value."""


# -- the collectives, as modules the rewritten graph calls ----------------------------------------
def _funcol():
    import torch.distributed._functional_collectives as funcol

    return funcol


def _wait(y: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a functional collective (eager: it returns an AsyncCollectiveTensor)."""
    funcol = _funcol()
    return y.wait() if isinstance(y, funcol.AsyncCollectiveTensor) else y


class _Collective(nn.Module):
    def __init__(self, group: Group):
        super().__init__()
        self.group = group.group
        self.degree = group.size
        self.rank = group.rank


class ShardTokens(_Collective):
    """x: any tensor whose dim ``axis`` holds ``outer x tokens x inner`` (merged dims, row-major) ->
    this rank's contiguous ``tokens / degree`` slice of the tokens, for every outer/inner index."""

    def __init__(self, group: Group, axis: int, outer: int, inner: int):
        super().__init__(group)
        self.axis, self.outer, self.inner = axis, outer, inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.axis % x.dim()
        y = x.unflatten(a, (self.outer, -1, self.inner))
        n = y.shape[a + 1]
        if n % self.degree:
            raise SequenceParallelError(f"{n} tokens do not divide by {self.degree} ranks")
        step = n // self.degree
        return y.narrow(a + 1, self.rank * step, step).flatten(a, a + 2).contiguous()


class GatherTokens(_Collective):
    """The inverse of ``ShardTokens``: every rank's slice, concatenated in rank order."""

    def __init__(self, group: Group, axis: int, outer: int, inner: int):
        super().__init__(group)
        self.axis, self.outer, self.inner = axis, outer, inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.axis % x.dim()
        y = x.unflatten(a, (self.outer, -1, self.inner)).contiguous()
        y = _wait(_funcol().all_gather_tensor(y, a + 1, self.group))
        return y.flatten(a, a + 2)


class UlyssesToHeads(_Collective):
    """[B, H, n, D] (this rank's n = N / degree tokens, every head) -> [B, H / degree, N, D] (every
    token, this rank's heads): one all-to-all."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, n, d = x.shape
        y = x.reshape(b, self.degree, h // self.degree, n, d).permute(1, 0, 2, 3, 4).contiguous()
        y = _wait(_funcol().all_to_all_single(y, None, None, self.group))  # dim 0: heads out, token slices in
        return y.permute(1, 2, 0, 3, 4).reshape(b, h // self.degree, self.degree * n, d)


class UlyssesToTokens(_Collective):
    """The inverse of ``UlyssesToHeads``: [B, H / degree, N, D] -> [B, H, N / degree, D] (strides
    of a [B, N / degree, H, D] tensor)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, hl, big_n, d = x.shape
        n = big_n // self.degree
        y = x.reshape(b, hl, self.degree, n, d).permute(2, 0, 1, 3, 4).contiguous()
        y = _wait(_funcol().all_to_all_single(y, None, None, self.group))  # dim 0: token slices out, heads in
        # laid out [B, n, H, D] as SDPA lays out its output, so the graph's later views still apply
        # (reshape alone is a view where B = 1, with other strides: contiguous makes the layout)
        return y.permute(1, 3, 0, 2, 4).reshape(b, n, self.degree * hl, d).contiguous().transpose(1, 2)


# -- the analysis: where the token axis is in each value --------------------------------------------
@dataclass(frozen=True)
class _Tok:
    """The token axis of a value: dim ``axis`` has full size ``outer * N * inner``."""

    axis: int
    outer: int
    inner: int


@dataclass
class ShardReport:
    """What ``shard_tokens`` did: ``entry`` (the node whose tokens it splits), ``tokens`` (N at the
    example size), ``ulysses`` / ``local`` (attention nodes wrapped with all-to-alls / run on the
    local queries or a local batch axis), ``gathered`` (nodes whose input it gathered back: where
    the token axis ends), ``roles`` (attention node -> role by ``graph.roles``, a cross-check)."""

    entry: str
    tokens: int
    ulysses: list[str] = field(default_factory=list)
    local: list[str] = field(default_factory=list)
    gathered: list[str] = field(default_factory=list)
    roles: dict[str, str] = field(default_factory=dict)


def _hint(s) -> int:
    """The example value of a size (symbolic sizes: the value the program was captured at)."""
    if not isinstance(s, torch.SymInt):
        return int(s)
    node = s.node
    if node.hint is not None:
        return int(node.hint)
    value = node.expr.xreplace(getattr(node.shape_env, "var_to_val", {}))
    if not value.is_number:
        raise SequenceParallelError(f"size {s} has no example value (an unbacked size)")
    return int(value)


def _shape(n) -> tuple[int, ...] | None:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return tuple(_hint(s) for s in v.shape) if isinstance(v, torch.Tensor) else None


def _prod(xs) -> int:
    p = 1
    for x in xs:
        p *= x
    return p


def _args(n: fx.Node) -> Any:
    return n.args


def _kwargs(n: fx.Node) -> Any:
    return n.kwargs


def _name(n: fx.Node) -> str:
    t = n.target
    if n.op != "call_function":
        return n.op
    return getattr(getattr(t, "overloadpacket", t), "__name__", str(t))


_POINTWISE = {"clone", "contiguous", "gelu", "silu", "sigmoid", "tanh", "relu", "neg", "exp", "rsqrt",
              "sqrt", "pow", "_to_copy", "to", "alias", "detach", "dropout", "abs", "sin", "cos", "erf",
              "type_as", "mul", "div", "add", "sub", "where", "maximum", "minimum", "masked_fill", "rsub",
              "square", "reciprocal", "clamp", "log", "native_dropout", "lift_fresh_copy", "hardtanh"}
_VIEWS = {"view", "_unsafe_view", "reshape"}
_SDPA = {"scaled_dot_product_attention", schema.ATTENTION.name}  # viditq.attention is exact per head
_LINEARS = {"linear", *(op.name for op in schema.LINEAR_OPS)}
_ROW_OPS = {schema.QUANTIZE_ACT.name, schema.QUANTIZE_ACT_FP8.name, schema.BALANCE.name}
_ROW_ARGS = {"x", "xq", "x_scale", "gate", "residual"}  # per-token operands of the viditq ops


class _Pass:
    def __init__(self, gm: fx.GraphModule, group: Group, roles: dict[str, str]):
        self.gm, self.g, self.roles = gm, group, roles
        self.tok: dict[fx.Node, _Tok] = {}
        self.gathers: dict[fx.Node, fx.Node] = {}
        self.modules = 0

    def _module(self, mod: nn.Module, before: fx.Node, arg: fx.Node, kind: str) -> fx.Node:
        name = f"_sp_{kind}_{self.modules}"
        self.modules += 1
        self.gm.add_submodule(name, mod)
        with self.gm.graph.inserting_before(before):
            node = self.gm.graph.call_module(name, (arg,))
        if "val" in arg.meta:  # the analysis reads full (one-process) shapes everywhere
            node.meta["val"] = arg.meta["val"]
        return node

    def _shard(self, value: fx.Node, t: _Tok, before: fx.Node) -> fx.Node:
        return self._module(ShardTokens(self.g, t.axis, t.outer, t.inner), before, value, "shard")

    def _gathered(self, n: fx.Node) -> fx.Node:
        if n not in self.gathers:
            t = self.tok[n]
            after = n.next
            while after.op == "placeholder":
                after = after.next
            self.gathers[n] = self._module(GatherTokens(self.g, t.axis, t.outer, t.inner), after, n, "gather")
        return self.gathers[n]

    # -- one node ------------------------------------------------------------------------------
    def visit(self, n: fx.Node, report: ShardReport, N: int) -> None:
        ins = [a for a in n.all_input_nodes if a in self.tok]
        if not ins:
            return
        out = self.rule(n, ins, report, N)
        if out is None:  # the token axis ends here: gather every tracked input this node reads
            if n.op != "output":
                report.gathered.append(n.name)
            for a in ins:
                n.replace_input_with(a, self._gathered(a))
        elif out is not False:
            self.tok[n] = out

    def rule(self, n: fx.Node, ins: list[fx.Node], report: ShardReport, N: int):
        """The token axis of ``n``'s value, ``False`` (handled, no tensor value), or None (gather)."""
        op = _name(n)
        shape: Any = _shape(n)
        if op == "getitem":
            src = _args(n)[0]
            t = self.tok[src]
            if _name(src) == "unbind":  # the unbound dim is gone from each element
                nd = len(_shape(_args(src)[0]) or ())
                dim = int(_args(src)[1] if len(_args(src)) > 1 else 0) % nd
                return _Tok(t.axis - (dim < t.axis), t.outer, t.inner)
            if _name(src) in ("split", "split_with_sizes", "chunk"):
                return t
            sub = _shape(n)
            if sub is None or len(sub) <= t.axis or sub[t.axis] != t.outer * N * t.inner:
                raise SequenceParallelError(f"{n.name}: element {_args(n)[1]} of {src.name} does not keep "
                                            f"the token axis {t.axis} (shape {sub})")
            return t
        t = self.tok[ins[0]]
        if op == "_assert_tensor_metadata":
            return False if _args(n)[1] is None and (len(_args(n)) < 3 or _args(n)[2] is None) else None
        if op == "sym_size" and len(ins) == 1:
            if _args(n)[1] % len(_shape(ins[0]) or (0,)) != t.axis:
                return False
            # the value read is the local size; the graph means the full one
            with self.gm.graph.inserting_after(n):
                full = self.gm.graph.call_function(operator.mul, (n, self.g.size))
            n.replace_all_uses_with(full, delete_user_cb=lambda u: u is not full)
            return False
        if shape is None and op not in ("native_layer_norm", "split", "split_with_sizes", "chunk", "unbind",
                                        *_ROW_OPS, *_LINEARS):
            return None
        if op in _POINTWISE:
            return self._broadcast(n, shape, N)
        if op in _VIEWS:
            return self._view(n, ins[0], shape, N)
        if op == "permute" and _args(n)[0] is ins[0]:
            order = [d % len(shape) for d in _args(n)[1]]
            return _Tok(order.index(t.axis), t.outer, t.inner)
        if op == "transpose" and _args(n)[0] is ins[0]:
            nd = len(shape)
            d0, d1 = (int(d) % nd for d in _args(n)[1:3])
            return _Tok({d0: d1, d1: d0}.get(t.axis, t.axis), t.outer, t.inner)
        if op == "select" and _args(n)[0] is ins[0]:
            dim = int(_args(n)[1]) % (len(shape) + 1)
            return None if dim == t.axis else _Tok(t.axis - (dim < t.axis), t.outer, t.inner)
        if op == "unsqueeze":
            d = int(_args(n)[1]) % len(shape)
            return _Tok(t.axis + (d <= t.axis), t.outer, t.inner)
        if op == "squeeze" and len(_args(n)) > 1:
            in_nd = len(_shape(ins[0]) or ())
            given = _args(n)[1] if isinstance(_args(n)[1], list | tuple) else [_args(n)[1]]
            dims = {int(d) % in_nd for d in given}
            in_shape = _shape(ins[0]) or ()
            gone = {d for d in dims if in_shape[d] == 1}
            if t.axis in dims or N // self.g.size == 1:
                return None
            return _Tok(t.axis - sum(d < t.axis for d in gone), t.outer, t.inner)
        if op == "native_layer_norm":
            nd = len(_shape(ins[0]) or ())
            return t if _args(n)[0] is ins[0] and len(ins) == 1 and t.axis < nd - len(_args(n)[1]) else None
        if op in _LINEARS or op in _ROW_OPS or op in ("addmm", "mm"):
            return self._rows(n, op, ins, t)
        if op in ("split", "split_with_sizes", "chunk", "unbind"):
            nd = len(_shape(ins[0]) or ())
            dim = (_args(n)[2] if len(_args(n)) > 2 else _kwargs(n).get("dim", 0)) if op != "unbind" else \
                (_args(n)[1] if len(_args(n)) > 1 else 0)
            return t if int(dim) % nd != t.axis and _args(n)[0] is ins[0] else None
        if op in ("mean", "sum", "amax", "amin") and len(_args(n)) > 1 and isinstance(_args(n)[1], list | tuple):
            nd = len(_shape(ins[0]) or ())
            dims = {int(d) % nd for d in _args(n)[1]}
            keep = bool(_args(n)[2]) if len(_args(n)) > 2 else bool(_kwargs(n).get("keepdim", False))
            if t.axis in dims:
                return None
            return _Tok(t.axis if keep else t.axis - sum(d < t.axis for d in dims), t.outer, t.inner)
        if op in ("cat", "concat"):
            parts = _args(n)[0]
            dim = int(_args(n)[1]) if len(_args(n)) > 1 else 0
            toks = {self.tok.get(p) for p in parts}
            return t if len(toks) == 1 and dim % len(shape) != t.axis else None
        if op in _SDPA:
            return self._attention(n, report, N)
        return None

    def _broadcast(self, n: fx.Node, shape, N: int):
        nd = len(shape)
        ref = None
        for a in n.all_input_nodes:
            if a in self.tok:
                ta = self.tok[a]
                aligned = _Tok(ta.axis + nd - len(_shape(a) or ()), ta.outer, ta.inner)
                if ref is not None and aligned != ref:
                    return None
                ref = aligned
        assert ref is not None
        full = ref.outer * N * ref.inner
        for a in list(n.all_input_nodes):
            s = _shape(a)
            if a in self.tok or s is None:
                continue
            pos = ref.axis - (nd - len(s))
            if pos < 0 or pos >= len(s) or s[pos] == 1:
                continue
            if s[pos] != full:
                return None
            n.replace_input_with(a, self._shard(a, _Tok(pos, ref.outer, ref.inner), n))  # replicated: slice it
        return ref

    def _view(self, n: fx.Node, src: fx.Node, shape, N: int):
        t = self.tok[src]
        in_shape = _shape(src)
        if in_shape is None or _args(n)[0] is not src:
            return None
        after = t.inner * _prod(in_shape[t.axis + 1:])
        for j in range(len(shape)):
            a_j = _prod(shape[j + 1:])
            if a_j <= after and a_j * shape[j] >= after * N and after % a_j == 0 \
                    and (a_j * shape[j]) % (after * N) == 0:
                inner = after // a_j
                outer = shape[j] // (N * inner)
                sizes = list(_args(n)[1])
                size = sizes[j]
                if isinstance(size, int) and size != -1:
                    sizes[j] = size // self.g.size
                elif isinstance(size, fx.Node):
                    with self.gm.graph.inserting_before(n):
                        sizes[j] = self.gm.graph.call_function(operator.floordiv, (size, self.g.size))
                n.args = (_args(n)[0], sizes, *_args(n)[2:])
                return _Tok(j, outer, inner)
        return None  # the token axis is split over several dims (an unpatchify): gather before it

    def _rows(self, n: fx.Node, op: str, ins: list[fx.Node], t: _Tok):
        """A per-row op (linear, viditq linear / quantize / balance): the activation is its first
        argument (``addmm``: the second) and its feature dim the last; other inputs are weights."""
        x = _args(n)[1] if op == "addmm" else _args(n)[0]
        op_schema = schema.BY_NAME.get(op)
        rows = {x}
        if op_schema is not None:  # read by name through the schema: xq, x_scale, gate, residual
            bound = op_schema.bind(_args(n), _kwargs(n))
            rows |= {v for k, v in bound.items() if k in _ROW_ARGS and isinstance(v, fx.Node)}
        if x not in self.tok or not set(ins) <= rows or t.axis >= len(_shape(x) or ()) - 1:
            return None
        if any(self.tok[a] != t for a in ins if a is not x):
            return None
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor):
            return t
        if isinstance(v, tuple | list):  # (q, scale, ...): getitem keeps the axis where it fits
            return t
        return None

    def _attention(self, n: fx.Node, report: ShardReport, N: int):
        q, k, v = _args(n)[:3]
        if _name(n) == schema.ATTENTION.name:
            mask = None  # viditq.attention takes none (passes.quantize_attention leaves masked calls SDPA)
        else:
            mask = _args(n)[3] if len(_args(n)) > 3 else _kwargs(n).get("attn_mask")
        tq, tk, tv = (self.tok.get(x) for x in (q, k, v))
        nd = len(_shape(q) or ())
        role = self.roles.get(n.name, "?")
        if tq is not None and tq == tk == tv and tq.axis < nd - 2:  # tokens in a batch axis: local
            if isinstance(mask, fx.Node) and mask not in self.tok and (_shape(mask) or (1,))[0] != 1:
                return None
            report.local.append(n.name)
            return tq
        if tq is None or tq.axis != nd - 2 or (tq.outer, tq.inner) != (1, 1):
            return None
        if tk is None and tv is None:  # cross-attention over replicated keys: attend locally
            if isinstance(mask, fx.Node):
                s = _shape(mask) or ()
                if len(s) >= 2 and s[-2] == N:
                    n.replace_input_with(mask, self._shard(mask, _Tok(len(s) - 2, 1, 1), n))
            if role not in ("cross_attn", "?"):
                log.warning("sequence_parallel: %s attends to replicated keys but graph.roles calls it %s",
                            n.name, role)
            report.local.append(n.name)
            return tq
        if not (tq == tk == tv):
            return None
        if mask is not None:
            raise SequenceParallelError(f"{n.name}: a self-attention with an attention mask; the mask's key "
                                        f"axis is the sharded token axis (refused: run it on one process)")
        heads = (_shape(q) or (0, 0))[1]
        if heads % self.g.size:
            raise SequenceParallelError(f"{n.name}: {heads} heads do not divide by {self.g.size} ranks "
                                        f"(Ulysses gives each rank heads / degree heads)")
        if role not in ("self_attn", "temporal_attn", "?"):
            log.warning("sequence_parallel: %s attends over sharded keys but graph.roles calls it %s",
                        n.name, role)
        to_heads = [self._module(UlyssesToHeads(self.g), n, x, "to_heads") for x in (q, k, v)]
        n.args = (*to_heads, *_args(n)[3:])
        after = n.next
        back = self._module(UlyssesToTokens(self.g), after, n, "to_tokens")
        n.replace_all_uses_with(back, delete_user_cb=lambda u: u is not back)
        self.tok[back] = tq
        report.ulysses.append(n.name)
        return False  # the SDPA output itself is head-sharded; its one user (the back exchange) is tracked


def _entry(gm: fx.GraphModule, roles: dict[str, str]) -> tuple[fx.Node, int]:
    """The first value [B, N, C] that every self-attention reads, N its query length: the token
    stream right after the patch embedding. Self-attentions: those ``graph.roles`` calls so (all
    attentions whose keys are as long as their queries when it has no answer)."""
    nodes = list(gm.graph.nodes)
    sdpa = [n for n in nodes if _name(n) in _SDPA]
    if not sdpa:
        raise SequenceParallelError("the program has no scaled_dot_product_attention node")
    ancestors: dict[fx.Node, set[fx.Node]] = {}
    for n in nodes:
        s: set[fx.Node] = set()
        for a in n.all_input_nodes:
            s |= ancestors[a] | {a}
        ancestors[n] = s
    selfs = [n for n in sdpa if roles.get(n.name) == "self_attn"] if roles else \
        [n for n in sdpa if _shape(_args(n)[0]) == _shape(_args(n)[1])]
    lengths = {(_shape(_args(n)[0]) or (0, 0, 0))[-2] for n in selfs}
    for n in nodes:
        sz = _shape(n)
        if sz is None or len(sz) != 3 or n.op in ("placeholder", "get_attr") or sz[1] not in lengths or sz[1] < 2:
            continue
        if selfs and all(n in ancestors[a] for a in selfs):
            return n, sz[1]
    raise SequenceParallelError("no token stream [B, N, C] read by every self-attention was found")


def _attention_roles(program: torch.export.ExportedProgram) -> dict[str, str]:
    """Attention node name -> role, by ``graph.roles`` (its data-flow classification)."""
    from viditq_compile.graph import roles
    from viditq_compile.graph.sites import ExportedTensors

    facts = roles._GraphFacts(program.graph_module, ExportedTensors(program).linear_sites(), None, None)
    return {a.node.name: (facts.kinds.get(i, (None, ""))[0] or "?") for i, a in enumerate(facts.attentions)}


def shard_tokens(gm: fx.GraphModule, group: Group, roles: dict[str, str] | None = None) -> ShardReport:
    """Rewrite ``gm`` (an unlifted exported graph, ``ExportedProgram.module()``, shapes in
    ``meta["val"]``) in place to run sequence parallel over ``group``; returns what it rewrote
    (``len(report.ulysses)`` is the count of self-attentions wrapped).

    Matches: the entry (``_entry``: the first [B, N, C] value every self-attention reads) is
    sliced to this rank's N / degree tokens; from there the token axis is followed through
    per-token ops (pointwise, views, permutes, layer norms, linears and the viditq ops, splits and
    reductions over other dims). A ``scaled_dot_product_attention`` whose q, k and v all carry the
    sliced axis as the sequence axis is wrapped with ``UlyssesToHeads`` on q / k / v and
    ``UlyssesToTokens`` on its output; one whose keys carry none (cross-attention over replicated
    text) runs on the local queries, its mask sliced where the mask has a query axis; one whose
    tokens lie in a batch axis (Latte's temporal attention) runs locally. A replicated operand that
    spans the full token axis (a position-embedding table) is sliced. Where the axis cannot be
    followed (an unpatchify view, an unknown op) and at the outputs, the value is gathered.
    Assumes: q / k / v [B, H, N, D]; every rank is called with the same inputs.
    Keeps: outputs equal to the one-process program's up to the attention's summation order
    (bit-equal where SDPA reduces each head the same way). Refuses (``SequenceParallelError``): a
    self-attention mask, heads not divisible by the degree.
    """
    for n in gm.graph.nodes:  # constants of an unlifted program carry no meta value: their own
        if n.op == "get_attr" and "val" not in n.meta:
            value = operator.attrgetter(str(n.target))(gm)
            if isinstance(value, torch.Tensor):
                n.meta["val"] = value
    entry, tokens = _entry(gm, roles or {})
    report = ShardReport(entry.name, tokens)
    p = _Pass(gm, group, roles or {})
    report.roles = dict(roles or {})
    users = list(entry.users)
    sliced = p._module(ShardTokens(group, 1, 1, 1), entry.next, entry, "shard")
    for u in users:
        u.replace_input_with(entry, sliced)
    p.tok[sliced] = _Tok(1, 1, 1)
    started = False
    for n in list(gm.graph.nodes):
        if n is sliced:
            started = True
            continue
        if started and n.op != "call_module" or n.op == "output":
            p.visit(n, report, tokens)
    gm.graph.lint()
    gm.recompile()
    log.info("sequence_parallel: %d self-attention(s) with Ulysses all-to-alls, %d local, gathered at %s",
             len(report.ulysses), len(report.local), ", ".join(report.gathered) or "the outputs")
    return report


class SequenceParallelModel(nn.Module):
    """One rank's sequence-parallel copy of a ``QuantizedModel``: call it with the full inputs on
    every rank (the same ones), get the full output. ``report``: ``ShardReport``; ``degree``,
    ``rank``; ``module``: the rewritten ``GraphModule``. ``compile()``: ``torch.compile`` with the
    ``viditq`` backend."""

    def __init__(self, module: fx.GraphModule, report: ShardReport, group: Group):
        super().__init__()
        self.module = module
        self.report = report
        self.degree, self.rank = group.size, group.rank

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def compile(self, **kwargs):
        return torch.compile(self.module, backend="viditq", **kwargs)


def sequence_parallel(qm, mesh=None) -> SequenceParallelModel:
    """``qm`` (a ``QuantizedModel``) run sequence parallel (Ulysses) over ``mesh`` (a 1-D
    ``DeviceMesh``, a ``ProcessGroup`` or None for the world); see ``shard_tokens``. A fresh module
    of ``qm.program`` is rewritten (``qm`` itself is left as it was; weights are shared). Refused:
    a degree of 1, several resolution buckets (make one per bucket's program)."""
    from viditq_compile.program import QuantizedModel

    if not isinstance(qm, QuantizedModel):
        raise TypeError(f"sequence_parallel takes a QuantizedModel (vq.quantize / vq.load), got "
                        f"{type(qm).__name__}; for a diffusers model use enable_context_parallel")
    group = resolve_group(mesh, what="sequence_parallel")
    if group.size < 2:
        raise ValueError(f"sequence_parallel over {group.size} rank: nothing to split")
    if len(qm.programs) > 1:
        raise ValueError(f"sequence_parallel: the model has {len(qm.programs)} resolution buckets; "
                         f"it rewrites one program")
    gm = qm.program.module()
    gm.requires_grad_(False)
    report = shard_tokens(gm, group, _attention_roles(qm.program))
    dist.barrier(group.group)
    return SequenceParallelModel(gm, report, group)
