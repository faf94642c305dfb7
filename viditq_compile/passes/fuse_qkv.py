"""One integer GEMM for the quantized linears that read the same activation (an FX pass).

``fuse_shared_inputs(tensors)`` runs on a graph the quantize pass has rewritten. A DiT block's
q / k / v projections read one normalized hidden state, and cross-attention's k / v read the
caption; the quantize pass already gives each such group one activation quantization
(``viditq.quantize_act``, or one ``x`` for ``viditq.w8a8_linear``). This pass gives them one GEMM
too: N grows from 1152 to 3456 (or 2304), one ``torch._int_mm`` / kernel launch instead of three,
and the activation is read once.

Matches: two or more calls of

- ``viditq.qlinear`` whose ``xq`` and ``x_scale`` are the same nodes (one ``quantize_act``), or
- ``viditq.w8a8_linear`` whose ``x`` is the same node,

with the same ``act_bits`` (w8a8), ``weight_bits``, ``group_size``, ``out_dtype``, integer (not
e4m3) weights, zero points on all or none, a bias on all or none (of one dtype), and weights /
scales / zero points that are tensors this graph holds (the quantize pass's constants). A group
of calls that read one activation but differ in any of these stays separate and is listed in
``Fusion.refused`` with the reason (logged at INFO); e4m3 layers are refused too (their GEMM
accumulates in fp32, so a wider N may change the blocking and the rounding).

Rewrites: the integer weights, scales and zero points are concatenated along N once, at pass
time (new graph constants named ``<first layer>+<other layers' last name component>...``; the
per-layer ones are removed), the biases are concatenated in the graph (``aten.cat``: biases are
the model's parameters, read at run time), one call of the same op replaces the group, and each
former call's users read ``aten.slice`` of its output along the last dim.

Assumes: every input of a group is defined before its first call (the shared activation is, the
constants are placed at the graph's top). Inference only.

Keeps: every output bit-exact. Each output column of ``qlinear`` / ``w8a8_linear`` depends only on
its own weight row, scale, zero point and bias (``numerics.qlinear``: integer GEMM, then per-column
elementwise epilogue in a fixed order), and the integer GEMM is exact whatever its N.
Keeps each replaced node's metadata on its slice. (Compiled, the graphs stay bit-exact in fp32;
with 16-bit activations Inductor may fuse the producer of the shared activation into its one
remaining quantization and skip the intermediate 16-bit rounding it applies when three consumers
read a stored copy, so fused and unfused compiled bf16 outputs differ at bf16 rounding level:
52.8 dB apart on tiny PixArt, both 44.7 dB from fp32.)

Runs where ``pipeline.quantize_graph`` is asked to (``fuse``; by default on Dynamo graphs only:
exported programs keep one op per layer, which their artifacts, checks and reports rely on).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
from torch import fx

from viditq_compile.graph.sites import GraphTensors, fake_call, node_value
from viditq_compile.numerics import fp8
from viditq_compile.ops.schema import QLINEAR, QUANTIZE_ACT, QUANTIZE_ACT_FP8, W8A8_LINEAR, OpSchema
from viditq_compile.passes.quantize import LAYER_META, share_cached

log = logging.getLogger(__name__)
aten = torch.ops.aten


_WEIGHT_ARGS = ("w_q", "w_scale", "w_zero")


@dataclass
class Fusion:
    """What ``fuse_shared_inputs`` did. ``groups``: the layer names of each fused GEMM, in graph
    order; ``refused``: ``(layer names, reason)`` for each set of calls that read one activation
    but stay separate."""

    groups: list[tuple[str, ...]] = field(default_factory=list)
    refused: list[tuple[tuple[str, ...], str]] = field(default_factory=list)

    @property
    def count(self) -> int:
        """Linear calls folded into a shared GEMM (a q / k / v group counts 3)."""
        return sum(len(g) for g in self.groups)

    @property
    def gemms(self) -> int:
        """GEMMs the fused calls became."""
        return len(self.groups)

    def summary(self) -> str:
        """One line for logs and reports."""
        text = f"{self.count} linear calls fused into {self.gemms} GEMM(s)"
        if self.refused:
            text += "; kept separate: " + "; ".join(f"{', '.join(n)} ({why})" for n, why in self.refused)
        return text


def _layer(node: fx.Node) -> str:
    return str(node.meta.get(LAYER_META, node.name))


def _tensor(tensors: GraphTensors, node) -> torch.Tensor | None:
    """The real tensor behind a constant node (a ``get_attr`` buffer of a Dynamo graph, a
    lifted buffer / parameter of an exported program), else None."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        value = getattr(tensors.gm, str(node.target), None)
        return value if isinstance(value, torch.Tensor) else None
    return tensors.weight_of(node)[1]


def _source(node: fx.Node, op: OpSchema):
    """The activation a call reads, and the key its partners must share."""
    if op is W8A8_LINEAR:
        x = W8A8_LINEAR.get(node, "x")
        return x, ("w8a8", x)
    xq, xs = QLINEAR.get(node, "xq"), QLINEAR.get(node, "x_scale")
    producer = xq.args[0] if isinstance(xq, fx.Node) and xq.op == "call_function" and xq.args \
        and isinstance(xq.args[0], fx.Node) else None
    src = None
    for q in (QUANTIZE_ACT, QUANTIZE_ACT_FP8):
        if producer is not None and q.calls(producer):
            src = q.get(producer, "x")
    return src, ("qlinear", xq, xs)


def _format(tensors: GraphTensors, node: fx.Node, op: OpSchema) -> tuple[tuple | None, str | None]:
    """``(format, None)``: what must agree for calls to share a GEMM; ``(None, reason)`` when
    the call cannot be fused at all."""
    a = op.node_args(node)
    w = {name: _tensor(tensors, a[name]) for name in _WEIGHT_ARGS}
    if w["w_q"] is None or w["w_scale"] is None or (a["w_zero"] is not None and w["w_zero"] is None):
        return None, "its weights are not constants of this graph"
    if fp8.is_fp8(w["w_q"]):
        return None, "e4m3 weights (an fp32-accumulating GEMM is not bit-exact across N)"
    bias = node_value(a["bias"]) if a["bias"] is not None else None
    if a["bias"] is not None and not isinstance(bias, torch.Tensor):
        bias = _tensor(tensors, a["bias"])  # a bias a pass added (a folded value projection's)
    if a["bias"] is not None and not isinstance(bias, torch.Tensor):
        return None, "its bias has no traced value"
    k = w["w_q"].shape[1]
    if op is W8A8_LINEAR:
        widths: tuple = ("act_bits", a["act_bits"])
    else:
        widths = ("weight_bits", a["weight_bits"], "group_size", a["group_size"], "out_dtype",
                  a["out_dtype"])
    return (op.name, *widths, "K", k, "w_q", w["w_q"].dtype, "zero points", a["w_zero"] is not None,
            "bias", None if bias is None else bias.dtype), None


def _difference(mine: tuple, other: tuple) -> str:
    """The first field in which two formats disagree, spelled for a user."""
    if mine[0] != other[0]:
        return f"ops differ: {mine[0]} vs {other[0]}"
    for i in range(1, min(len(mine), len(other)), 2):
        if mine[i + 1] != other[i + 1]:
            return f"{mine[i]} differs: {mine[i + 1]} vs {other[i + 1]}"
    return "each reads its own activation quantization"


def _rewrite(tensors: GraphTensors, op: OpSchema, calls: list[fx.Node], cache) -> tuple[str, ...]:
    g = tensors.gm.graph
    args = [op.node_args(c) for c in calls]
    names = tuple(_layer(c) for c in calls)
    tails = [n.rsplit(".", 1)[-1] for n in names[1:]]
    fused_name = "+".join([names[0], *tails])
    new_args = dict(args[0])
    for name in _WEIGHT_ARGS:
        if args[0][name] is None:
            continue
        parts = [_tensor(tensors, a[name]) for a in args]
        joined = torch.cat(parts, dim=0).contiguous()  # type: ignore[arg-type]  # checked by _format
        share_cached(cache, parts, joined)  # type: ignore[arg-type]
        new_args[name] = tensors.add_tensor(f"{names[0]}.viditq_{name}_fused_{'_'.join(tails)}", joined)
    sizes = [int(_tensor(tensors, a["w_q"]).shape[0]) for a in args]  # type: ignore[union-attr]
    first = min(calls, key=lambda c: list(g.nodes).index(c))
    with g.inserting_before(first):
        if args[0]["bias"] is not None:
            bias = g.call_function(aten.cat.default, ([a["bias"] for a in args], 0))
            fake_call(bias)
            new_args["bias"] = bias
        fused = g.call_function(op.overload, op.positional(new_args))
        fused.meta = dict(first.meta)
        fused.meta[LAYER_META] = fused_name
        for key in ("val", "example_value"):  # the first call's value, N wide -> sum(sizes) wide
            val = first.meta.get(key)
            if isinstance(val, torch.Tensor):
                with val.fake_mode if hasattr(val, "fake_mode") else contextlib.nullcontext():
                    fused.meta[key] = val.new_empty((*val.shape[:-1], sum(sizes)))
        start = 0
        for call, size in zip(calls, sizes):
            part = g.call_function(aten.slice.Tensor, (fused, -1, start, start + size))
            part.meta = dict(call.meta)  # the slice has the call's shape and dtype
            if "val" in part.meta:
                fake_call(part)  # and a slice's strides, which an exported program records
            start += size
            call.replace_all_uses_with(part)
    for call, a in zip(calls, args):
        g.erase_node(call)
        for name in _WEIGHT_ARGS:
            if isinstance(a[name], fx.Node):
                tensors.remove_if_unused(a[name])
    return names


def fuse_shared_inputs(tensors: GraphTensors, cache=None) -> Fusion:
    """Fuse, in place, the quantized linears of ``tensors``' graph that read one activation (see
    the module docstring). Returns what it fused and what it refused; the graph is recompiled
    when anything changed. ``cache``: the quantize pass's weight cache; the integer weights it
    holds for the fused layers become views of the concatenated ones (one copy in memory)."""
    if not isinstance(tensors, GraphTensors):
        raise TypeError(f"fuse_shared_inputs: expected a GraphTensors, got {type(tensors).__name__}")
    g = tensors.gm.graph
    by_source: dict = {}
    for node in list(g.nodes):
        for op in (QLINEAR, W8A8_LINEAR):
            if op.calls(node):
                src, key = _source(node, op)
                # calls on one source activation but different quantizations are candidates too
                # (reported when they stay apart); calls with no known source group by key only
                by_source.setdefault(src if src is not None else key, []).append((node, op, key))
    done = Fusion()
    for members in by_source.values():
        if len(members) < 2:
            continue
        groups: dict = {}
        unfusable: list[tuple[fx.Node, str]] = []
        for node, op, key in members:
            fmt, why = _format(tensors, node, op)
            if fmt is None:
                unfusable.append((node, why))  # type: ignore[arg-type]
            else:
                groups.setdefault((key, fmt), []).append((node, op))
        for node, why in unfusable:
            done.refused.append(((_layer(node),), why))
        for (key, fmt), calls in groups.items():
            if len(calls) > 1:
                done.groups.append(_rewrite(tensors, calls[0][1], [n for n, _ in calls], cache))
                continue
            other = next(((k, f) for (k, f) in groups if (k, f) != (key, fmt)), None)
            if other is not None:
                why = _difference(fmt, other[1]) if fmt != other[1] else \
                    "each reads its own activation quantization"
                done.refused.append(((_layer(calls[0][0]),), why))
    if done.groups:
        tensors.finalize()
    if done.groups or done.refused:
        log.info("fuse_shared_inputs: %s", done.summary())
    return done
