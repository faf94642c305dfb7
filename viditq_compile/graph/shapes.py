"""Which input dimensions an exported program takes at any size, which the model pinned, and the
check that refuses a call at a size the program does not take, naming the input and dimension.

Capture (``graph.capture``) marks dimensions ``Dim.AUTO`` by what an input looks like
(``auto_dims``): a 4-D or 5-D tensor (latent images ``[B, C, H, W]``, videos ``[B, C, F, H, W]``)
in every dimension; a 2-D or 3-D tensor (tokens ``[B, N, C]``, pooled or timestep embeddings
``[B, C]``) in all but its last (a feature width); a 1-D tensor (timesteps, labels) in its one.
``torch.export`` keeps a dimension symbolic where the model allows it and specializes it where
the model's code pins it. A pin shows either as a number in the placeholder's shape (channels
read by a convolution) or only as a guard on the symbol (diffusers' ``PatchEmbed`` keeps H
symbolic under ``H // 2 == 8``); ``narrow_pinned_ranges`` writes the second kind into the
program's ``range_constraints`` (here ``[16, 17]``), so the pin is part of the program, saved and
loaded with it.

``InputShapes.of(program)`` reads, from the program alone (it works the same on a loaded one),
every tensor input's dimensions: fixed, a range, and which dimensions share one symbol (the
batch of every input). ``InputShapes.check`` compares a call against them before the program
runs, raising ``InputShapeError``; relations it does not model (Flux's image tokens equal to the
rows of ``img_ids``) are left to the program's own guards, whose failures
``InputShapes.guard_error`` turns into the same error.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils._sympy.value_ranges import ValueRanges

_LATENT_LABELS = {4: ("B", "C", "H", "W"), 5: ("B", "C", "F", "H", "W")}
_TOKEN_LABELS = {1: ("B",), 2: (None, None), 3: ("B", "tokens", "features")}
_SCAN_LIMIT = 4096  # values tried on each side of the example when solving a pinned symbol


ADD_BUCKET = ("To run at other sizes, add a resolution bucket: qm.add_bucket(model, args, kwargs) with an "
              "example call at those sizes, or vq.quantize(model, args, kwargs, buckets=[(args, kwargs), "
              "...]); the buckets share one copy of the weights.")


class InputShapeError(ValueError):
    """A call whose input shape the quantized program does not take; the message names the
    argument, the dimension, the value given, what the program takes, and how to get a program
    that takes it."""


def auto_dims(x: Any) -> dict[int, Any] | None:
    """The ``dynamic_shapes`` entry capture gives one input (module docstring)."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return None
    dims = range(x.dim()) if x.dim() >= 4 or x.dim() == 1 else range(x.dim() - 1)
    return {d: torch.export.Dim.AUTO for d in dims}


# --------------------------------------------------------------------------------------------
# capture side: pins that are only guards become ranges
# --------------------------------------------------------------------------------------------


def _user_inputs(ep: torch.export.ExportedProgram) -> list[torch.fx.Node | None]:
    """One entry per user input, in the order of the call's flattened leaves: its placeholder,
    or None for an input baked in as a constant (``return_dict=False``)."""
    from torch.export.graph_signature import InputKind

    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    return [nodes.get(getattr(spec.arg, "name", None) or "") if hasattr(spec.arg, "name") else None
            for spec in ep.graph_signature.input_specs if spec.kind == InputKind.USER_INPUT]


def _user_placeholders(ep: torch.export.ExportedProgram) -> list[torch.fx.Node]:
    return [n for n in _user_inputs(ep) if n is not None]


def _bound(v: Any) -> int | None:
    """A range bound as an int, None when infinite."""
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        return None
    return int(v) if math.isfinite(f) else None


def _holds(guards: list, symbol, value: int) -> bool:
    import sympy

    for g in guards:
        try:
            r = g.xreplace({symbol: sympy.Integer(value)})
            if r is sympy.false or (r is not sympy.true and not bool(r)):
                return False
        except (TypeError, ValueError, ZeroDivisionError):
            return False
    return True


def _interval(guards: list, symbol, v: int) -> tuple[int, int] | None:
    """The run of values around ``v`` that ``guards`` (in ``symbol`` alone) allow, or None when
    ``v`` fails them or they allow values far from it (a parity or divisibility rule)."""
    if not _holds(guards, symbol, v):
        return None
    if any(_holds(guards, symbol, far) for far in (2 * v, 3 * v, 4 * v + 1, v + _SCAN_LIMIT)):
        return None
    lo = v
    while lo > 1 and v - lo < _SCAN_LIMIT and _holds(guards, symbol, lo - 1):
        lo -= 1
    hi = v
    while hi - v < _SCAN_LIMIT and _holds(guards, symbol, hi + 1):
        hi += 1
    return lo, hi


def narrow_pinned_ranges(ep: torch.export.ExportedProgram) -> dict[str, tuple[int, int]]:
    """Narrow ``ep.range_constraints`` for every input symbol that the model's guards allow only
    a bounded set of values to the interval around the example value the guards allow; returns
    ``{symbol: (lo, hi)}`` for those narrowed.

    A symbol is pinned by an equality in it alone (``H // 2 == 8``: ``[16, 17]``), or by an
    equality with other input sizes that allows the same interval whether the others take their
    example sizes or twice those (Latte's ``F * B_t // B == 4``: F is 4 at any batch; Flux's
    ``N_txt + N_img == rows(txt_ids) + rows(img_ids)`` moves with the others, so the token count
    stays dynamic). Guards that bound nothing (``H % 2 == 0``: ``2 * H`` holds too) leave the
    symbol dynamic."""
    import sympy

    symbols: dict[Any, None] = {}
    shape_env = None
    for node in _user_placeholders(ep):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        for d in val.shape:
            if isinstance(d, torch.SymInt) and isinstance(d.node.expr, sympy.Symbol):
                symbols[d.node.expr] = None
                shape_env = shape_env or d.node.shape_env
    if shape_env is None:
        return {}
    backed = getattr(shape_env, "backed_var_to_val", None)
    hints = {k: int(v) for k, v in (backed if backed is not None else shape_env.var_to_val).items()
             if k in symbols}
    alone: dict[Any, list] = {s: [] for s in symbols}
    tied: dict[Any, list] = {s: [] for s in symbols}
    for g in shape_env.guards:
        free = g.expr.free_symbols
        if not free or not free <= hints.keys():
            continue
        if len(free) == 1:
            alone[next(iter(free))].append(g.expr)
        elif isinstance(g.expr, sympy.Eq):
            for s in free:
                tied[s].append(g.expr)
    narrowed = {}
    for s in symbols:
        v = hints.get(s)
        if v is None:
            continue
        found = None
        if any(isinstance(g, sympy.Eq) for g in alone[s]):
            found = _interval(alone[s], s, v)
        if found is None and tied[s]:
            at = []
            for scale in (1, 2):
                others = {o: sympy.Integer(scale * h) for o, h in hints.items() if o != s}
                guards = alone[s] + [g.xreplace(others) for g in tied[s]]
                at.append(_interval(guards, s, v))
            found = at[0] if at[0] is not None and at[0] == at[1] else None
        if found is None:
            continue
        lo, hi = found
        old = ep.range_constraints.get(s)
        if old is not None:
            lo = max(lo, b) if (b := _bound(old.lower)) is not None else lo
            hi = min(hi, b) if (b := _bound(old.upper)) is not None else hi
        ep.range_constraints[s] = ValueRanges(lo, hi)
        narrowed[str(s)] = (lo, hi)
    return narrowed


# --------------------------------------------------------------------------------------------
# program side: what each input takes, and the check
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DimRule:
    """One dimension of one input. ``lo``/``hi``: the sizes taken (``hi`` None: no upper bound);
    ``symbol``: the program's name for a dimension that is not fixed (inputs that share it must
    agree); ``label``: B, C, F, H, W, tokens or features, when the input's rank says it."""

    index: int
    label: str | None
    lo: int
    hi: int | None
    symbol: str | None

    @property
    def fixed(self) -> bool:
        return self.hi is not None and self.lo == self.hi

    def takes(self) -> str:
        if self.fixed:
            return str(self.lo)
        if self.hi is None:
            return "any size" if self.lo <= 2 else f"any size >= {self.lo}"
        return f"{self.lo} to {self.hi}"

    def name(self) -> str:
        return f"dim {self.index}" + (f" ({self.label})" if self.label else "")


@dataclass(frozen=True)
class InputShape:
    """A tensor input: where it sits in the flattened call, its name, its example rank."""

    position: int
    name: str
    dims: tuple[DimRule, ...]

    def layout(self) -> str:
        return "[" + ", ".join(d.label or "?" for d in self.dims) + "]"


def _labels(val: torch.Tensor) -> tuple[str | None, ...]:
    n, shape = val.dim(), val.shape
    labels: tuple[str | None, ...] = _LATENT_LABELS.get(n) or _TOKEN_LABELS.get(n) or (None,) * n
    fixed = [not isinstance(d, torch.SymInt) or d.node.expr.is_number for d in shape]
    if n == 5 and fixed[1:3] == [False, True]:  # [B, F, C, H, W] (CogVideoX), not [B, C, F, H, W]
        labels = ("B", "F", "C", "H", "W")
    if n == 4 and not fixed[1] and fixed[3]:  # tokens [B, T, S, C] (STDiT3), not a latent
        labels = ("B", None, None, "features")
    return labels


def _arg_names(ep: torch.export.ExportedProgram) -> list[str] | None:
    sig = ep.module_call_graph[0].signature if ep.module_call_graph else None
    return list(sig.forward_arg_names) if sig is not None and sig.forward_arg_names else None


def _display(path: tuple, arg_names: list[str] | None) -> str:
    """``(args, kwargs)`` key path -> ``hidden_states``, ``image_rotary_emb[0]``, ``x``."""
    if len(path) >= 2 and isinstance(path[0], pytree.SequenceKey):
        head, rest = path[1], path[2:]
        if path[0].idx == 1 and isinstance(head, pytree.MappingKey):
            return f"{head.key}{pytree.keystr(rest)}"
        if path[0].idx == 0 and isinstance(head, pytree.SequenceKey):
            i = head.idx
            base = arg_names[i] if arg_names and i < len(arg_names) else f"args[{i}]"
            return f"{base}{pytree.keystr(rest)}"
    return pytree.keystr(path)


class InputShapes:
    """The tensor inputs of an exported program and the sizes each dimension takes (module
    docstring). ``str()`` is a table for people; ``dynamic()`` and ``fixed()`` give the same as
    ``{input: {dim: ...}}``."""

    def __init__(self, inputs: tuple[InputShape, ...], in_spec: pytree.TreeSpec | None, leaves: int):
        self.inputs = inputs
        self._in_spec = in_spec
        self._leaves = leaves

    @classmethod
    def of(cls, ep: torch.export.ExportedProgram) -> InputShapes:
        import sympy

        in_spec = ep.call_spec.in_spec
        placeholders = _user_inputs(ep)
        if in_spec is None or in_spec.num_leaves != len(placeholders):
            return cls((), None, 0)
        paths = [p for p, _ in pytree.tree_flatten_with_path(
            pytree.tree_unflatten(list(range(in_spec.num_leaves)), in_spec), is_leaf=lambda v: v is None)[0]]
        names = _arg_names(ep)
        inputs = []
        for pos, (path, node) in enumerate(zip(paths, placeholders)):
            val = node.meta.get("val") if node is not None else None
            if not isinstance(val, torch.Tensor):
                continue
            dims = []
            for i, (d, label) in enumerate(zip(val.shape, _labels(val))):
                if isinstance(d, torch.SymInt) and d.node.expr.is_number:
                    d = int(d.node.expr)
                if not isinstance(d, torch.SymInt):
                    dims.append(DimRule(i, label, int(d), int(d), None))
                    continue
                expr = d.node.expr
                if not isinstance(expr, sympy.Symbol):  # derived (2 * s0): left to the program
                    dims.append(DimRule(i, label, 0, None, None))
                    continue
                r = ep.range_constraints.get(expr)
                lo = (_bound(r.lower) or 0) if r is not None else 0
                hi = _bound(r.upper) if r is not None else None
                dims.append(DimRule(i, label, lo, hi, str(expr)))
            inputs.append(InputShape(pos, _display(path, names), tuple(dims)))
        # a dimension tied to a batch dimension is a batch dimension, whatever its input's rank
        batch = {d.symbol for i in inputs for d in i.dims if d.label == "B" and d.symbol and i.dims[0] is d
                 and len(i.dims) >= 3}
        inputs = [InputShape(i.position, i.name, tuple(
            dataclasses.replace(d, label="B") if d.symbol in batch and d.label is None else d for d in i.dims))
            for i in inputs]
        return cls(tuple(inputs), in_spec, in_spec.num_leaves)

    # ----------------------------------------------------------------------------- reading

    def dynamic(self) -> dict[str, dict[int, str]]:
        """``{input: {dim: "any size" | "16 to 17"}}`` for the dimensions not fixed."""
        return {i.name: {d.index: d.takes() for d in i.dims if not d.fixed}
                for i in self.inputs if any(not d.fixed for d in i.dims)}

    def fixed(self) -> dict[str, dict[int, int]]:
        """``{input: {dim: size}}`` for the dimensions the program takes at one size only."""
        return {i.name: {d.index: d.lo for d in i.dims if d.fixed}
                for i in self.inputs if any(d.fixed for d in i.dims)}

    def __str__(self) -> str:
        if not self.inputs:
            return "input shapes: not known (the program's input structure could not be read)"
        shared: dict[str, list[str]] = {}
        for i in self.inputs:
            for d in i.dims:
                if d.symbol is not None:
                    shared.setdefault(d.symbol, []).append(f"{i.name}[{d.index}]")
        lines = ["input shapes the program takes:"]
        for i in self.inputs:
            parts = []
            for d in i.dims:
                text = f"{d.label or d.index}={d.takes()}"
                others = [s for s in shared.get(d.symbol or "", ()) if s != f"{i.name}[{d.index}]"]
                if others and i is next(x for x in self.inputs
                                        if any(e.symbol == d.symbol for e in x.dims)):
                    text += f" (= {', '.join(others)})"
                parts.append(text)
            lines.append(f"  {i.name} {i.layout()}: " + ", ".join(parts))
        return "\n".join(lines)

    # ----------------------------------------------------------------------------- checking

    def flatten(self, args: tuple, kwargs: dict) -> list | None:
        """The call's leaves in the program's order, or None when its structure differs (the
        program then refuses it with its own message)."""
        if self._in_spec is None:
            return None
        try:
            kw = kwargs
            ctx = self._in_spec.child(1).context if self._in_spec.num_children == 2 else None
            if isinstance(ctx, list) and set(ctx) == set(kwargs):
                kw = {k: kwargs[k] for k in ctx}
            leaves, spec = pytree.tree_flatten((args, kw), is_leaf=lambda v: v is None)
        except Exception:  # noqa: BLE001 (an unflattenable call: the program's own message)
            return None
        return leaves if len(leaves) == self._leaves and spec == self._in_spec else None

    def check(self, args: tuple, kwargs: dict) -> None:
        """Raise ``InputShapeError`` when a tensor of the call has a size its program does not
        take (module docstring); cheap: one flatten, a comparison per dimension."""
        leaves = self.flatten(args, kwargs)
        if leaves is None:
            return
        seen: dict[str, tuple[int, InputShape, DimRule]] = {}
        for inp in self.inputs:
            x = leaves[inp.position]
            if not isinstance(x, torch.Tensor):
                continue
            if x.dim() != len(inp.dims):
                raise InputShapeError(
                    f"{inp.name} has {x.dim()} dimensions (shape {list(x.shape)}); the program takes "
                    f"{len(inp.dims)} ({inp.layout()})." + self._hint(inp, x))
            for d, size in zip(inp.dims, x.shape):
                size = int(size)
                bad = size < d.lo if d.lo > 2 or d.fixed else False
                bad = bad or (d.hi is not None and size > d.hi)
                if bad:
                    raise InputShapeError(
                        f"{inp.name} {d.name()} is {size} (shape {list(x.shape)}), but this program "
                        f"takes {d.takes()} there (fixed when the model was captured)."
                        + self._hint(inp, x))
                if d.symbol is not None:
                    if d.symbol in seen and seen[d.symbol][0] != size:
                        other_size, other, od = seen[d.symbol]
                        raise InputShapeError(
                            f"{inp.name} {d.name()} is {size}, but {other.name} {od.name()} is "
                            f"{other_size}: the program takes them equal (the model ties them, e.g. "
                            f"one batch for every input).")
                    seen.setdefault(d.symbol, (size, inp, d))

    def guard_error(self, e: BaseException, args: tuple = (), kwargs: dict | None = None
                    ) -> InputShapeError | None:
        """The error for a guard the program itself raised (a relation ``check`` does not model,
        such as Flux's image tokens equal to the rows of ``img_ids``), or None when ``e`` is not a
        shape guard."""
        text = str(e).strip()
        if not (text.startswith("Guard failed") or text.startswith("Unexpected number of dimensions")
                or text.startswith("Expected input at") and ".shape[" in text):
            return None
        leaves = self.flatten(args, kwargs or {})
        given = ", ".join(f"{i.name} {list(leaves[i.position].shape)}" for i in self.inputs
                          if leaves is not None and isinstance(leaves[i.position], torch.Tensor))
        return InputShapeError(
            f"this program does not take the shapes of this call ({given or 'shapes unknown'}): "
            f"the model ties its input sizes so: {text.removeprefix('Guard failed: ')}\n{self}\n"
            f"{ADD_BUCKET}")

    @staticmethod
    def _hint(inp: InputShape, x: torch.Tensor) -> str:
        return (f" To run {inp.name} of shape {list(x.shape)}, add a resolution bucket: "
                f"qm.add_bucket(model, args, kwargs) with an example call at that size, or "
                f"vq.quantize(model, args, kwargs, buckets=[(args, kwargs), ...]); the buckets share "
                f"one copy of the weights (or quantize again with an example call at that size).")
