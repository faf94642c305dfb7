"""Fold the pointwise tail of each quantized linear into its GEMM kernel (an FX pass).

``fuse_epilogues(gm, device_types)`` rewrites a graph that holds ``viditq`` ops, for the devices
whose GEMM is a kernel of ours that runs the epilogue (``inductor.GEMM_KERNEL_DEVICES``: CUDA):

1. ``w8a8_linear(x, ...)`` becomes ``quantize_act(x, None, [], None, act_bits)`` + ``qlinear``,
   so that Inductor fuses the quantization into the kernel producing x (the quantization
   decomposes into ATen ops on every device, ``lowering/inductor.py``);
2. every ``qlinear`` becomes ``qlinear_fused`` and absorbs, in this order and each only when it is
   the single user of what came before: transparent ops (eval dropout, a clone, division or
   multiplication by 1), then ``gelu(approximate="tanh")`` or ``silu``, then a multiplication by
   a gate (``[N]``, ``[B, 1, N]`` against ``[B, T, N]``, or the output's shape: adaLN-single's
   ``gate_msa * attn_output``), then the addition of a residual of the output's shape. The
   epilogue then runs in fp32 inside the GEMM and rounds once (``numerics.epilogue``), and no
   elementwise kernel re-reads the GEMM's output;
3. a 4-bit ``quantize_act`` whose values feed only ``qlinear_fused`` nodes gets its values packed
   two per byte (``packing.pack_int4_values``, fused into the quantizing kernel) and those nodes
   read them with ``packed_act=True``: half the activation bytes for W4A4.

Assumes: node metadata carries fake values (``val`` in export graphs, ``example_value`` in Dynamo
graphs; nodes without one are left alone), and the graph is inference only. Recognises both
torch-level (Dynamo) and ATen-level (exported program) spellings of the tail ops. Ops on a
device not in ``device_types`` are left as they are (on CPU, Inductor fuses the decomposed
epilogue by itself). Returns what it did, counted.
"""

from __future__ import annotations

import operator
from collections import Counter

import torch
from torch import fx

from viditq_compile.graph.sites import fake_call, node_value
from viditq_compile.numerics import quant as numerics
from viditq_compile.numerics.packing import pack_int4_values
from viditq_compile.ops.schema import QLINEAR, QLINEAR_FUSED, QUANTIZE_ACT, W8A8_LINEAR, OpSchema

aten = torch.ops.aten

_GELU = {torch._C._nn.gelu, torch.nn.functional.gelu, aten.gelu.default}
_SILU = {torch.nn.functional.silu, aten.silu.default}
_MUL = {operator.mul, torch.mul, aten.mul.Tensor}
_ADD = {operator.add, torch.add, aten.add.Tensor}
_DIV = {operator.truediv, torch.div, aten.div.Tensor}
_DROPOUT = {torch.nn.functional.dropout, aten.dropout.default}
_CLONE = {torch.clone, aten.clone.default}  # what an exported eval-mode dropout becomes


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _device_type(node) -> str | None:
    val = node_value(node)
    return val.device.type if isinstance(val, torch.Tensor) else None


def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 and users[0].op == "call_function" else None


def _is_transparent(u: fx.Node, x: fx.Node) -> bool:
    """``u`` returns ``x``'s values unchanged in inference."""
    if u.target in _DROPOUT:
        training = _arg(u, 2, "training" if u.target is torch.nn.functional.dropout else "train", True)
        return u.args[0] is x and training is False and not _arg(u, 3, "inplace", False)
    if u.target in _CLONE:
        return u.args[0] is x and len(u.args) == 1
    if u.target in _DIV or u.target in _MUL:
        return len(u.args) == 2 and u.args[0] is x and not u.kwargs and isinstance(u.args[1], (int, float)) \
            and u.args[1] == 1
    return False


def _activation_of(u: fx.Node, x: fx.Node) -> str | None:
    if u.target in _GELU and u.args[0] is x and _arg(u, 1, "approximate", "none") == "tanh":
        return "gelu_tanh"
    if u.target in _SILU and u.args[0] is x and not _arg(u, 1, "inplace", False):
        return "silu"
    return None


def _other_operand(u: fx.Node, x: fx.Node) -> fx.Node | None:
    if len(u.args) != 2 or u.kwargs or (u.args[0] is x) == (u.args[1] is x):
        return None
    other = u.args[1] if u.args[0] is x else u.args[0]
    return other if isinstance(other, fx.Node) else None


def _compatible(u: fx.Node, x: fx.Node, other: fx.Node) -> bool:
    """``u = x (*|+) other`` keeps x's shape, dtype and device (no promotion, no broadcast of x)."""
    xv, uv, ov = node_value(x), node_value(u), node_value(other)
    if not all(isinstance(v, torch.Tensor) for v in (xv, uv, ov)):
        return False
    return (tuple(uv.shape) == tuple(xv.shape) and uv.dtype == xv.dtype and ov.is_floating_point()
            and ov.device == xv.device)


def _replace(graph: fx.Graph, old: fx.Node, at: fx.Node, args: dict) -> fx.Node:
    """A ``qlinear_fused`` node with ``args`` (by name) in place of ``at`` (whose users it
    takes); ``old`` (the fused node ``at`` consumed) is erased."""
    with graph.inserting_before(at):
        new = graph.call_function(QLINEAR_FUSED.overload, QLINEAR_FUSED.positional(args))
    new.meta = dict(at.meta)
    at.replace_all_uses_with(new)
    graph.erase_node(at)
    if old is not at and not old.users:
        graph.erase_node(old)
    return new


def _split_w8a8(graph: fx.Graph, node: fx.Node) -> None:
    a = W8A8_LINEAR.node_args(node)
    with graph.inserting_before(node):
        qa = graph.call_function(QUANTIZE_ACT.overload, QUANTIZE_ACT.positional(
            x=a["x"], smooth=None, rotation=[], static_scale=None, act_bits=a["act_bits"]))
        fake_call(qa)
        items = [graph.call_function(operator.getitem, (qa, i)) for i in (0, 1)]
        for i, item in enumerate(items):
            if "val" in qa.meta:
                item.meta["val"] = qa.meta["val"][i]
        q = graph.call_function(QLINEAR.overload, QLINEAR.positional(
            xq=items[0], x_scale=items[1], w_q=a["w_q"], w_scale=a["w_scale"], w_zero=a["w_zero"],
            bias=a["bias"], weight_bits=8, group_size=0, out_dtype=node_value(node).dtype))
    q.meta = dict(node.meta)
    node.replace_all_uses_with(q)
    graph.erase_node(node)


def _absorb_tail(graph: fx.Graph, fused: fx.Node, done: Counter) -> None:
    while (u := _single_user(fused)) is not None:
        args = QLINEAR_FUSED.node_args(fused)
        if _is_transparent(u, fused):
            u.replace_all_uses_with(fused)
            graph.erase_node(u)
            done["transparent"] += 1
            continue
        if args["activation"] == "none" and args["gate"] is None and args["residual"] is None \
                and (act := _activation_of(u, fused)) is not None:
            args["activation"] = act
            fused = _replace(graph, fused, u, args)
            done[act] += 1
            continue
        other = _other_operand(u, fused)
        if other is None or not _compatible(u, fused, other):
            return
        if u.target in _MUL and args["gate"] is None and args["residual"] is None:
            try:
                numerics.epilogue_gate_rows(node_value(fused).shape, node_value(other).shape)
            except ValueError:
                return
            args["gate"] = other
            fused = _replace(graph, fused, u, args)
            done["gate"] += 1
            continue
        if u.target in _ADD and args["residual"] is None \
                and tuple(node_value(other).shape) == tuple(node_value(fused).shape):
            args["residual"] = other
            _replace(graph, fused, u, args)
            done["residual"] += 1
        return


def _pack_4bit_activations(graph: fx.Graph, qa: fx.Node, done: Counter) -> None:
    if QUANTIZE_ACT.get(qa, "act_bits") != 4:
        return
    xv = node_value(QUANTIZE_ACT.get(qa, "x"))
    if not isinstance(xv, torch.Tensor) or xv.shape[-1] % 2:
        return
    values = [u for u in qa.users if u.target is operator.getitem and u.args[1] == 0]
    if len(values) != 1 or not values[0].users:
        return
    consumers = list(values[0].users)
    if not all(QLINEAR_FUSED.calls(c) and QLINEAR_FUSED.get(c, "xq") is values[0]
               and not QLINEAR_FUSED.get(c, "packed_act") for c in consumers):
        return
    with graph.inserting_after(values[0]):
        packed = graph.call_function(pack_int4_values, (values[0],))
    fake_call(packed)
    for c in consumers:
        c.args, c.kwargs = QLINEAR_FUSED.positional(QLINEAR_FUSED.node_args(c), xq=packed,
                                                    packed_act=True), {}
    done["packed_act"] += 1


def fuse_epilogues(gm: fx.GraphModule, device_types=frozenset({"cuda"})) -> Counter:
    """Rewrite ``gm`` in place as the module docstring says, for ops whose input lies on one of
    ``device_types``. Returns a ``Counter`` of what it did (``w8a8_split``, ``qlinear``,
    ``gelu_tanh``, ``silu``, ``gate``, ``residual``, ``transparent``, ``packed_act``)."""
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"fuse_epilogues: expected a torch.fx.GraphModule, got {type(gm).__name__}")
    device_types = frozenset(device_types)
    graph = gm.graph
    done: Counter = Counter()

    def on_device(node: fx.Node, op: OpSchema) -> bool:
        return _device_type(op.get(node, op.names[0])) in device_types and node_value(node) is not None

    for node in [n for n in graph.nodes if W8A8_LINEAR.calls(n)]:
        if on_device(node, W8A8_LINEAR):
            _split_w8a8(graph, node)
            done["w8a8_split"] += 1
    for node in [n for n in graph.nodes if QLINEAR.calls(n)]:
        if not on_device(node, QLINEAR):
            continue
        fused = _replace(graph, node, node, {**QLINEAR.node_args(node), "activation": "none",
                                             "gate": None, "residual": None, "packed_act": False})
        done["qlinear"] += 1
        _absorb_tail(graph, fused, done)
    for node in [n for n in graph.nodes if QUANTIZE_ACT.calls(n)]:
        if on_device(node, QUANTIZE_ACT):
            _pack_4bit_activations(graph, node, done)
    if done:
        graph.lint()
        gm.recompile()
    return done
