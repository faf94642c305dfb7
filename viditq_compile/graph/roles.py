"""Layer roles: what each linear layer does, read from the captured graph.

ViDiT-Q's metric-decoupled mixed precision scores each layer by the metric of its role:
cross-attention by text alignment, self/spatial attention and MLP by visual quality, temporal
attention by video consistency. This analysis finds the roles from data flow, so renamed or
unfamiliar modules are handled; names are only a fallback, and user overrides come last.

Method (``layer_roles_with_reasons``):

1. Attentions: ``scaled_dot_product_attention`` and its fused variants, and hand-written ones
   (a softmax whose scores come from one matmul and whose probabilities feed another).
2. Each attention's linears: walking back from q, k, v to the first linears (through views,
   elementwise ops such as RoPE and qk-norm, cat/split) and forward from its output through
   layout ops to the out projection(s).
3. Its kind: an attention pooler (``other``) when q, k and v all read no latent and one query
   token pools the sequence (HunyuanDiT's text pooler); cross-attention when k and v depend on a
   graph input other than the latent and not on the latent; temporal when its query length
   equals the latent's frame count (ints or symbolic sizes); self-attention otherwise (joint
   text+image attention included).
4. Linears attached to no attention: ``mlp`` when they run on a token stream after an attention
   (the latent's, or a text stream's: text refiners); ``other`` when their input does not depend
   on the latent (timestep / guidance / pooled-text / class embedders, modulation, caption
   projection), when the latent reaches them through no linear, conv or attention (patch
   embedding) or when they reach the output through no further linear (final projection).

``other`` is what a DiT quantizer keeps in floating point: ``keep_fp_by_graph`` gives those layers
with the fact that decided each, and says which layers the graph places at all.

Where the graph has no answer (no latent input found, no attention found, or frame count equal
to the per-frame token count so that sizes cannot tell time from space), the module path
decides, and the decision records that it did. It rewrites nothing.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import sympy
import torch
import torch.fx as fx

from viditq_compile.families import registry as families
from viditq_compile.graph.head_layout import SDPA_OPS, _hint, _op
from viditq_compile.graph.sites import LinearSite, node_value
from viditq_compile.io.user_regex import UserRegexError, compile_user_regex, user_search
from viditq_compile.ops import schema

log = logging.getLogger(__name__)

ROLES = ("cross_attn", "self_attn", "temporal_attn", "mlp", "other")
_PRIORITY = {r: i for i, r in enumerate(("cross_attn", "temporal_attn", "self_attn", "mlp", "other"))}

LATENT_NAMES = families.LATENT_NAMES

_SDPA = SDPA_OPS  # q, k, v first, as SDPA's
_SOFTMAX = {"softmax", "_softmax", "_safe_softmax"}
_MATMUL = {"bmm", "mm", "matmul", "baddbmm", "einsum"}
_LINEAR = {"linear", "addmm", *(op.name for op in schema.LINEAR_OPS)}
# a backward walk from q/k/v ends at these: they mix features or bring in other data
_STOP = _LINEAR | _MATMUL | _SDPA | _SOFTMAX | {"convolution", "conv1d", "conv2d", "conv3d", "embedding"}
# a forward walk from an attention output passes only ops that move data without mixing it
_LAYOUT = {"view", "_unsafe_view", "reshape", "permute", "transpose", "t", "clone", "contiguous",
           "_to_copy", "to", "type_as", "float", "half", "bfloat16", "getitem", "split",
           "split_with_sizes", "chunk", "unbind", "slice", "select", "narrow", "cat", "concat",
           "squeeze", "unsqueeze", "flatten", "unflatten", "expand", "dropout", "native_dropout",
           "alias", "detach", schema.BALANCE.name, schema.QUANTIZE_ACT.name}
_PROBS = _LAYOUT | {"masked_fill", "where", "mul", "div"}
_SCATTER = {"slice_scatter", "select_scatter", "diagonal_scatter", "as_strided_scatter", "index_put",
            "scatter", "copy", "copy_"}
# ops that mix features: a latent value past one of them is no longer the raw (patchified) input
_MIXING = _LINEAR | _MATMUL | _SDPA | {"convolution", "conv1d", "conv2d", "conv3d"}


def _name_pattern(role: str, end: str = "") -> re.Pattern:
    """The families' name fragments of ``role`` (``families.ROLE_NAMES``), each starting a word."""
    return re.compile(r"(?<![a-z])(" + "|".join(families.ROLE_NAMES[role]) + ")" + end)


# (pattern, role), first match wins; applied only where the graph gives no answer
_NAME_RULES = ((_name_pattern("cross_attn"), "cross_attn"), (_name_pattern("self_attn"), "self_attn"),
               (_name_pattern("mlp", r"(?![a-z])"), "mlp"))
_TEMPORAL_NAME = _name_pattern("temporal_attn", r"(?![a-z])")


@dataclass(frozen=True)
class RoleDecision:
    """A layer's role and what decided it: ``source`` is ``"graph"``, ``"name"`` or
    ``"override"``; ``reason`` says which fact or pattern."""

    role: str
    source: str
    reason: str


@dataclass
class _Attention:
    node: fx.Node  # the op producing the attention output
    q: fx.Node
    k: fx.Node
    v: fx.Node
    q_len: object  # int or SymInt: the query sequence length


def layer_roles(gm: fx.GraphModule, sites: list[LinearSite], *,
                overrides: Mapping[str, str] | None = None, latent_input: str | None = None,
                frame_axis: int | None = None) -> dict[str, str]:
    """Role (one of ``ROLES``) of every distinct ``site.name``; see ``layer_roles_with_reasons``."""
    decisions = layer_roles_with_reasons(gm, sites, overrides=overrides, latent_input=latent_input,
                                         frame_axis=frame_axis)
    return {name: d.role for name, d in decisions.items()}


def layer_roles_with_reasons(gm: fx.GraphModule, sites: list[LinearSite], *,
                             overrides: Mapping[str, str] | None = None,
                             latent_input: str | None = None,
                             frame_axis: int | None = None) -> dict[str, RoleDecision]:
    """``RoleDecision`` of every distinct ``site.name``, in graph order.

    gm: an exported (ATen) or Dynamo graph; sites: its ``linear_sites()``.
    overrides: regex -> role, searched in each layer name (``re.search``), first match wins;
    applied after the graph and the names. A bad regex or role raises ``ValueError``.
    latent_input: the user input holding the noisy latent; by default the first tensor input
    named one of ``LATENT_NAMES``, else the first tensor input.
    frame_axis: the latent's frame axis, for video; by default axis 2 of a 5-D latent
    ([B, C, F, H, W]), axis 1 of a 4-D latent when the graph attends along axis 1 and along axis 2
    separately ([B, F, S, C] tokens, OpenSORA STDiT), none otherwise.
    """
    rules = _compile_overrides(overrides)
    graph = _GraphFacts(gm, sites, latent_input, frame_axis)
    decisions: dict[str, RoleDecision] = {}
    for s in sites:
        d = graph.decide(s)
        if isinstance(d, str):
            d = _by_name(s.name, d)
        prev = decisions.get(s.name)
        decisions[s.name] = d if prev is None else _merge(prev, d)
    for name in decisions:
        for pattern, role in rules:
            if user_search(pattern, name, f"override regex for role {role!r}"):
                decisions[name] = RoleDecision(role, "override", f"matches {pattern.pattern!r}")
                break
        log.debug("role of %s: %s (%s: %s)", name, decisions[name].role, decisions[name].source,
                  decisions[name].reason)
    by_name = [name for name, d in decisions.items() if d.source == "name"]
    if by_name:
        log.info("roles of %d layer(s) decided by name, the graph had no answer: %s", len(by_name),
                 ", ".join(by_name))
    return decisions


def keep_fp_by_graph(gm: fx.GraphModule, sites: list[LinearSite], *,
                     latent_input: str | None = None) -> dict[str, str | None]:
    """What the graph says about keeping each layer in floating point: layer name -> the fact that
    makes it a conditioning, embedding or final-projection layer (role ``other``, decided by the
    graph), or ``None`` for a layer the graph places in an attention or a feed-forward. Layers the
    graph cannot place (no latent input, no attention in the graph) are absent: their names
    decide (``families.KEEP_FP_REGEX``)."""
    decisions = layer_roles_with_reasons(gm, sites, latent_input=latent_input)
    return {name: (d.reason if d.role == "other" else None)
            for name, d in decisions.items() if d.source == "graph"}


def _compile_overrides(overrides):
    rules = []
    for regex, role in (overrides or {}).items():
        if role not in ROLES:
            raise ValueError(f"override {regex!r}: unknown role {role!r}; roles are {', '.join(ROLES)}")
        if not isinstance(regex, str) or not regex:
            raise ValueError(f"override regex {regex!r} for role {role!r} must be a non-empty string")
        # the one guard for user regexes: length, validity, no catastrophic backtracking
        try:
            rules.append((compile_user_regex(regex, f"override regex for role {role!r}"), role))
        except UserRegexError as e:
            if e.kind == "invalid":
                raise ValueError(f"override regex {regex!r} is not a valid regular expression: {e.detail}") from None
            raise
    return rules


def _by_name(name: str, why: str) -> RoleDecision:
    for pattern, role in _NAME_RULES:
        m = pattern.search(name)
        if m is None:
            continue
        if role == "self_attn" and _TEMPORAL_NAME.search(name):
            return RoleDecision("temporal_attn", "name", f"{why}; name has {m.group(0)!r} and 'temp'")
        return RoleDecision(role, "name", f"{why}; name has {m.group(0)!r}")
    return RoleDecision("other", "name", f"{why}; no known name part")


def _merge(a: RoleDecision, b: RoleDecision) -> RoleDecision:
    """One layer called at several places: the graph beats names, then the more specific role."""
    if a.source != b.source:
        return a if a.source == "graph" else b
    if a.role == b.role:
        return a
    first, second = sorted((a, b), key=lambda d: _PRIORITY[d.role])
    return RoleDecision(first.role, first.source, f"{first.reason} (also called as {second.role})")


# ----------------------------------------------------------------------------------------------
def _tensor(n) -> torch.Tensor | None:
    v = node_value(n) if isinstance(n, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _expr(size):
    return size.node.expr if isinstance(size, torch.SymInt) else int(size)


def _same_size(a, b) -> bool:
    """Whether two sizes (ints or SymInts) are the same length. Symbolic sizes compare by
    expression, without adding guards to the program's shape env; two different input dimensions
    differ; other expressions, which export may leave unsimplified (e.g. ``(s33*s53)//s47``
    where the batch of one input was not unified with another's), compare by example value."""
    if a is None or b is None:
        return False
    ea, eb = _expr(a), _expr(b)
    if ea == eb:
        return True
    if isinstance(ea, sympy.Symbol) and isinstance(eb, sympy.Symbol):
        return False
    ha = _hint(a)
    return ha is not None and ha == _hint(b)


def _token_stream(n: fx.Node) -> bool:
    """Whether a value is a sequence of tokens ([..., N, C] with N not 1), not one embedding per
    sample ([B, C]: timestep, pooled text, modulation)."""
    v = _tensor(n)
    return v is not None and v.dim() >= 3 and not _same_size(v.shape[-2], 1)


def _carries_data(n: fx.Node) -> bool:
    """Whether a node holds tensor data (not a size): reshapes read the latent's shape, which
    must not count as reading the latent."""
    v = node_value(n)
    if v is None:
        return True
    if isinstance(v, (list, tuple)):
        return any(isinstance(x, torch.Tensor) for x in v)
    return isinstance(v, torch.Tensor)


def _arg(n: fx.Node, i: int, key: str):
    return n.args[i] if len(n.args) > i else n.kwargs.get(key)


def _matmul_operands(n: fx.Node):
    if _op(n) == "baddbmm":
        return _arg(n, 1, "batch1"), _arg(n, 2, "batch2")
    if _op(n) == "einsum":
        ops = n.args[1] if len(n.args) > 1 else ()
        return (ops[0], ops[1]) if len(ops) == 2 else (None, None)  # type: ignore[index, arg-type]  # a list
    return _arg(n, 0, "input"), _arg(n, 1, "mat2")


def _input_name(n: fx.Node) -> str:
    arg = n.meta.get("grapharg")
    src = getattr(arg, "source", None)
    name = getattr(src, "name", None)
    name = name() if callable(name) else name
    if isinstance(name, str):  # Dynamo: L['hidden_states'] or L['added_cond_kwargs']['x']
        parts = re.findall(r"\['([^']+)'\]", name)
        if len(parts) > 1 and parts[0] == "kwargs":  # a forward(*args, **kwargs) wrapper (Sana's)
            parts = parts[1:]
        if parts:
            return "_".join(parts)
    return n.name


def _user_inputs(gm: fx.GraphModule, sites: list[LinearSite]) -> list[fx.Node]:
    """Tensor placeholders that are model inputs (not parameters, buffers or constants)."""
    weights = {s.weight_node for s in sites} | {s.bias for s in sites}
    out = []
    for n in gm.graph.nodes:
        if n.op != "placeholder" or _tensor(n) is None:
            continue
        desc = n.meta.get("desc")  # export (torch >= 2.9): PlainAOTInput for user inputs
        arg = n.meta.get("grapharg")  # Dynamo
        if desc is not None:
            user = type(desc).__name__ == "PlainAOTInput"
        elif arg is not None:
            src = getattr(arg, "source", None)
            name = getattr(src, "name", None)
            name = name() if callable(name) else name
            user = not isinstance(node_value(n), torch.nn.Parameter) and isinstance(name, str) \
                and name.startswith("L[") and not name.startswith("L['self']")
        else:
            user = n not in weights and not re.match(r"[pbc]_", n.name)
        if user:
            out.append(n)
    return out


class _GraphFacts:
    """Data-flow facts about one graph, computed once for all sites."""

    def __init__(self, gm, sites, latent_input, frame_axis):
        self.nodes = list(gm.graph.nodes)
        self.position = {n: i for i, n in enumerate(self.nodes)}
        self.site_nodes = {s.node for s in sites}
        inputs = _user_inputs(gm, sites)
        self.latent = self._latent(inputs, latent_input)
        self.input_names = {n: _input_name(n) for n in inputs}
        bits = {n: 1 << i for i, n in enumerate(inputs)}
        self.deps: dict[fx.Node, int] = {}
        self.data = {n: _carries_data(n) for n in self.nodes}
        for n in self.nodes:
            m = bits.get(n, 0)
            for a in n.all_input_nodes:
                if self.data[a]:
                    m |= self.deps[a]
            self.deps[n] = m
        self.latent_bit = bits.get(self.latent, 0)
        self.attentions = self._find_attentions()
        self.after_attn = self._after_attention()
        self.mixed = self._after_mixing()
        self.free = self._reaches_output_without_linear()
        self.kinds = self._classify(frame_axis)
        self.attached = self._attach()

    # -- inputs ------------------------------------------------------------------------------
    @staticmethod
    def _latent(inputs, latent_input):
        names = {_input_name(n): n for n in inputs}
        if latent_input is not None:
            if latent_input not in names:
                raise ValueError(f"latent_input {latent_input!r} is not a tensor input of the graph; "
                                 f"inputs are {sorted(names)}")
            return names[latent_input]
        for want in LATENT_NAMES:
            if want in names:
                return names[want]
        return inputs[0] if inputs else None

    def _inputs_of(self, mask: int) -> list[str]:
        return [name for n, name in self.input_names.items() if self.deps.get(n, 0) & mask]

    # -- attentions --------------------------------------------------------------------------
    def _find_attentions(self) -> list[_Attention]:
        found = []
        for n in self.nodes:
            op = _op(n)
            if op in _SDPA:
                q, k, v = _arg(n, 0, "query"), _arg(n, 1, "key"), _arg(n, 2, "value")
                qv = _tensor(q)
                found.append(_Attention(n, q, k, v, qv.shape[-2] if qv is not None and qv.dim() >= 2
                                        else None))
            elif op in _SOFTMAX:
                att = self._hand_written(n)
                if att is not None:
                    found.append(att)
        return found

    def _hand_written(self, softmax: fx.Node) -> _Attention | None:
        scores = self._walk_to(softmax.all_input_nodes[:1], lambda n: _op(n) in _MATMUL,
                               lambda n: _op(n) not in _STOP, backward=True)
        out = self._walk_to(softmax.users, lambda n: _op(n) in _MATMUL, lambda n: _op(n) in _PROBS,
                            backward=False)
        if len(scores) != 1 or len(out) != 1:
            return None
        q, k = _matmul_operands(scores[0])
        a, b = _matmul_operands(out[0])
        probs_first = bool(self._walk_to([a], lambda n: n is softmax, lambda n: _op(n) in _PROBS,
                                         backward=True)) if isinstance(a, fx.Node) else False
        v = b if probs_first else a
        if not all(isinstance(x, fx.Node) for x in (q, k, v)):
            return None
        sv = _tensor(softmax)
        return _Attention(out[0], q, k, v, sv.shape[-2] if sv is not None and sv.dim() >= 2 else None)

    def _walk_to(self, start: Iterable[fx.Node], is_goal, can_pass, *, backward: bool) -> list[fx.Node]:
        """Nodes satisfying ``is_goal`` first met from ``start`` (included) through ``can_pass``."""
        goals, seen, todo = [], set(), list(start)
        while todo:
            n = todo.pop()
            if n in seen or not isinstance(n, fx.Node):
                continue
            seen.add(n)
            if is_goal(n):
                goals.append(n)
            elif can_pass(n):
                todo.extend(self._operands(n) if backward else n.users)
        return sorted(goals, key=self.position.__getitem__)

    @staticmethod
    def _operands(n: fx.Node) -> list[fx.Node]:
        """The inputs a value flows from; broadcast operands (modulation vectors, RoPE tables,
        norm weights) are left out, so a walk does not leave the token stream."""
        if _op(n) in ("cat", "concat", "stack"):
            return [a for a in n.args[0] if isinstance(a, fx.Node)]  # type: ignore[union-attr]  # a list of tensors
        if _op(n) in _SCATTER:  # written into a buffer (RoPE into empty_like): both carry the stream
            return [a for a in n.all_input_nodes if _tensor(a) is not None]
        ins = n.all_input_nodes
        if len(ins) <= 1:
            return ins
        out = _tensor(n)
        if out is None:
            return ins
        full = [a for a in ins if (t := _tensor(a)) is not None and _same_size(t.numel(), out.numel())]
        return full or ins[:1]

    def _after_attention(self) -> dict[fx.Node, bool]:
        outs = {a.node for a in self.attentions}
        after: dict[fx.Node, bool] = {}
        for n in self.nodes:
            after[n] = n in outs or any(after[a] for a in n.all_input_nodes if self.data[a])
        return after

    def _after_mixing(self) -> dict[fx.Node, bool]:
        """Node -> whether the latent reached it through a feature-mixing op (a linear, conv,
        matmul or attention), not only through reshapes, norms and elementwise ops."""
        mixed: dict[fx.Node, bool] = {}
        for n in self.nodes:
            mixed[n] = any(self.data[a] and self.deps[a] & self.latent_bit
                           and (mixed[a] or _op(a) in _MIXING) for a in n.all_input_nodes)
        return mixed

    def _reaches_output_without_linear(self) -> dict[fx.Node, bool]:
        free: dict[fx.Node, bool] = {}
        for n in reversed(self.nodes):
            free[n] = n.op == "output" or any(free[u] for u in n.users if self.data[u] and _op(u) not in _LINEAR)
        return free

    def _joins_stream(self, linear: fx.Node) -> bool:
        """Whether the linear's output, before any further linear, is combined with a latent
        value it did not produce (a residual add): block layers are, a final projection is not."""
        own, todo = set(), [linear]
        while todo:
            n = todo.pop()
            if n not in own:
                own.add(n)
                todo.extend(u for u in n.users if _op(u) not in _LINEAR)
        return any(a not in own and _tensor(a) is not None and self.deps[a] & self.latent_bit
                   for n in own if n is not linear and n.op != "output" for a in n.all_input_nodes)

    # -- what each attention is --------------------------------------------------------------
    def _classify(self, frame_axis) -> dict[int, tuple[str | None, str]]:
        """Attention index -> (role or None when sizes cannot tell, reason)."""
        kinds: dict[int, tuple[str | None, str]] = {}
        selfs: list[int] = []
        if self.latent is None:
            return kinds
        for i, a in enumerate(self.attentions):
            kv = self.deps[a.k] | self.deps[a.v]
            if not (kv | self.deps[a.q]) & self.latent_bit and _same_size(a.q_len, 1):
                kinds[i] = ("other", f"{a.node.name} pools {', '.join(self._inputs_of(kv)) or 'constants'} "
                            f"into one query token (attention pooler, a conditioning embedding)")
            elif kv and not kv & self.latent_bit:
                kinds[i] = ("cross_attn", f"keys/values of {a.node.name} come from "
                            f"{', '.join(self._inputs_of(kv))}, not from the latent "
                            f"{self.input_names[self.latent]!r}")
            else:
                selfs.append(i)
        frames = self._frames(frame_axis, [self.attentions[i] for i in selfs])
        ambiguous = frames is not None and all(_same_size(self.attentions[i].q_len, frames) for i in selfs)
        for i in selfs:
            a = self.attentions[i]
            if frames is None:
                kinds[i] = ("self_attn", f"{a.node.name} attends over latent tokens (no frame axis)")
            elif ambiguous:
                kinds[i] = (None, f"{a.node.name}: every self-attention runs over {frames} tokens, "
                            f"the frame count, so sizes cannot tell time from space")
            elif _same_size(a.q_len, frames):
                kinds[i] = ("temporal_attn", f"{a.node.name} attends over {a.q_len} tokens = the "
                            f"latent's frame count")
            else:
                kinds[i] = ("self_attn", f"{a.node.name} attends over {a.q_len} tokens, not the "
                            f"{frames} frames")
        return kinds

    def _frames(self, frame_axis, selfs: list[_Attention]):
        lat = _tensor(self.latent) if self.latent is not None else None
        if lat is None:
            return None
        shape = lat.shape
        if frame_axis is not None:
            if not -lat.dim() <= frame_axis < lat.dim():
                raise ValueError(f"frame_axis {frame_axis} is out of range for the latent "
                                 f"{self.input_names[self.latent]!r} of shape {tuple(shape)}")
            frames = shape[frame_axis]
        elif lat.dim() == 5:
            frames = shape[2]
        elif lat.dim() == 4 and all(any(_same_size(a.q_len, shape[d]) for a in selfs) for d in (1, 2)):
            frames = shape[1]
        else:
            return None
        return None if isinstance(frames, int) and frames <= 1 else frames

    # -- linears of each attention -----------------------------------------------------------
    def _attach(self) -> dict[fx.Node, list[tuple[int, str]]]:
        """Linear node -> [(attention index, "q"/"k"/"v"/"out")]."""
        attached: dict[fx.Node, list[tuple[int, str]]] = {}
        is_site = self.site_nodes.__contains__
        for i, a in enumerate(self.attentions):
            for part, start in (("q", a.q), ("k", a.k), ("v", a.v)):
                for lin in self._walk_to([start], is_site, lambda n: _op(n) not in _STOP, backward=True):
                    attached.setdefault(lin, []).append((i, part))
            for lin in self._walk_to(a.node.users, is_site, lambda n: _op(n) in _LAYOUT, backward=False):
                attached.setdefault(lin, []).append((i, "out"))
        return attached

    # -- one linear --------------------------------------------------------------------------
    def decide(self, s: LinearSite) -> RoleDecision | str:
        """The graph's decision for one linear call, or why the graph has none."""
        if self.latent is None:
            return "no latent input found in the graph"
        parts = self.attached.get(s.node)
        if parts:
            by_attention: dict[int, list[str]] = {}
            for i, part in parts:
                by_attention.setdefault(i, []).append(part)
            kinds = sorted(((self.kinds[i][0], f"{'/'.join(ps)} of attention: {self.kinds[i][1]}")
                            for i, ps in by_attention.items()),
                           key=lambda k: (k[0] is None, _PRIORITY.get(k[0], 0)))
            role, why = kinds[0]
            if role is not None:
                return RoleDecision(role, "graph", why)
            temporal = _TEMPORAL_NAME.search(s.name)  # sizes are ambiguous: time or space by name
            return RoleDecision("temporal_attn" if temporal else "self_attn", "name",
                                f"{why}; name {'has' if temporal else 'lacks'} 'temp'")
        if not self.attentions:
            return "no attention found in the graph"
        lat = self.input_names[self.latent]
        if not self.deps[s.x] & self.latent_bit:
            src = self._inputs_of(self.deps[s.x])
            if self.after_attn[s.x] and _token_stream(s.x):
                return RoleDecision("mlp", "graph", "on a token stream after an attention that reads no "
                                    f"latent (only {', '.join(src) or 'constants'}): a text refiner's feed-forward")
            return RoleDecision("other", "graph", f"conditioning: input does not depend on the latent {lat!r}"
                                + (f" (only on {', '.join(src)})" if src else ""))
        if not self.mixed[s.x]:
            return RoleDecision("other", "graph", f"the first linear on the latent {lat!r}: no linear, conv "
                                "or attention precedes it (patch embedding)")
        if self.free[s.node] and not self._joins_stream(s.node):
            return RoleDecision("other", "graph", "output goes to the graph output through no further "
                                "linear and joins no residual stream (final projection)")
        return RoleDecision("mlp", "graph", "on the latent stream after an attention and attached to none "
                            "(feed-forward)")
