"""The conv-as-linear pass: convolutions that are linears in disguise become linears.

Matches every convolution call (``graph.sites.CONV_TARGETS``: ``aten.convolution`` in an export
graph, ``torch.conv1d/2d/3d`` in a Dynamo graph) whose kernel is all ones, with stride 1, padding
0, groups 1, not transposed (``graph.modules.conv_refusal``: a 1×1 conv2d, a 1×1×1 conv3d, a k=1
conv1d), whose weight is a model parameter and whose input's traced rank is known, and rewrites

    conv(x, W[O, I, 1, ...], b)  ->  permute(linear(permute(x, channels last), view(W, [O, I]), b),
                                             channels back)

The weight stays the model's parameter, read through an in-graph ``[O, I]`` view: the graph's
linear sites (``GraphTensors.linear_sites``) see through it and name the layer after the
convolution's module (``ff.conv_inverted``), so select, balance, quantize, the search and the
report treat it as any linear; the quantize pass drops the view and the float parameter when it
quantizes the layer (``GraphTensors.drop_weight``). A layer kept in floating point keeps reading
its parameter, so a Dynamo graph that runs for several modules (regional compilation) reads each
module's own weight, as it did before.

Every other convolution (k×k, depthwise, strided patch embeddings) stays as it is;
``GraphTensors.kept_convolutions`` lists them with the reason, for the report.

Assumes: the graph records traced values (``val`` / ``example_value``) on convolution inputs.
Keeps: the graph's inputs and outputs; each output equal up to fp32 reordering of the channel sum
(a GEMM instead of a convolution kernel).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from viditq_compile.graph.modules import conv_refusal
from viditq_compile.graph.sites import (
    ExportedTensors,
    GraphTensors,
    conv_call,
    fake_call,
    node_value,
)

log = logging.getLogger(__name__)

_ATEN: dict[str, Callable[..., Any]] = {"permute": torch.ops.aten.permute.default, "view": torch.ops.aten.view.default,
         "linear": torch.ops.aten.linear.default}
_TORCH: dict[str, Callable[..., Any]] = {"permute": torch.permute, "view": torch.reshape, "linear": torch._C._nn.linear}


def convs_as_linears(tensors: GraphTensors) -> int:
    """Rewrite the graph's linear convolutions (see the module docstring); returns how many."""
    if not isinstance(tensors, GraphTensors):
        raise TypeError(f"convs_as_linears takes a GraphTensors (ExportedTensors / DynamoTensors), "
                        f"got {type(tensors).__name__}")
    g = tensors.gm.graph
    ops = _ATEN if isinstance(tensors, ExportedTensors) else _TORCH
    count = 0
    for node in list(g.nodes):
        c = conv_call(node)
        if c is None:
            continue
        _, weight = tensors.weight_of(c.weight)
        x = node_value(c.x)
        if weight is None or weight.dim() < 3 or not isinstance(x, torch.Tensor):
            continue
        spatial = weight.dim() - 2
        if conv_refusal(weight.shape[2:], c.stride, c.padding, c.dilation, c.groups, c.transposed):
            continue
        channel = x.dim() - spatial - 1
        if channel not in (0, 1):
            continue
        perm = [d for d in range(x.dim()) if d != channel] + [channel]
        back = sorted(range(x.dim()), key=perm.__getitem__)
        o, i = int(weight.shape[0]), int(weight.shape[1])
        with g.inserting_before(node):
            tokens = g.call_function(ops["permute"], (c.x, perm))
            w2d = g.call_function(ops["view"], (c.weight, [o, i]))
            lin = g.call_function(ops["linear"], (tokens, w2d, c.bias))
            out = g.call_function(ops["permute"], (lin, back))
        for new in (tokens, w2d, lin):
            _meta_from(new, node)
        out.meta = dict(node.meta)  # the same value as the convolution's
        node.replace_all_uses_with(out)
        g.erase_node(node)
        count += 1
    if count:
        tensors.finalize()
    kept = tensors.kept_convolutions()
    if count or kept:
        log.info("conv_as_linear: %d convolution(s) rewritten as linears; %d kept as convolutions "
                 "(floating point)%s", count, len(kept),
                 ": " + "; ".join(f"{k.name}: {k.reason}" for k in kept[:4]) + (", ..." if len(kept) > 4 else "")
                 if kept else "")
    return count


def _meta_from(new: fx.Node, conv: fx.Node) -> None:
    """The convolution's provenance (module stack, stack trace) and the node's own traced value
    (export keeps ``val``; a Dynamo graph ``example_value``)."""
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack", "from_node", "seq_nr"):
        if key in conv.meta:
            new.meta[key] = conv.meta[key]
    fake_call(new)
    if "example_value" in conv.meta and "val" in new.meta:
        new.meta["example_value"] = new.meta.pop("val")
