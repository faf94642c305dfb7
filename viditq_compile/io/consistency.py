"""Plan <-> program <-> weights: what a loaded artifact's plan says is what its program runs.

A tampered ``plan.json`` could make the report claim a layer is FP or W4 while the program runs
it at W8, and a tampered ``weights.safetensors`` could carry NaN or negative scales that load
silently. ``check_artifact`` reads what each ``viditq`` op in the program actually computes
(its weight tensors and width arguments, the quantization that feeds it) and refuses the
artifact unless, layer by layer, that equals the plan:

- every quantized plan layer has an op, at the plan's widths per timestep range, group size,
  static/dynamic activations and balancing; its weights have the dtype and shape those widths
  need; a timestep-aware op uses the plan's timestep bounds;
- no FP plan layer and no layer unknown to the plan has an op;
- every scale (weight, activation) and smoothing vector is finite and > 0, every zero point lies
  in its width's range, every rotation factor is finite.

Called after ``program_loader.load_program``; raises ``ConsistencyError`` naming the layer.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from viditq_compile.methods import balance as balance_method
from viditq_compile.numerics import fp8
from viditq_compile.numerics import quant as numerics
from viditq_compile.ops.schema import (
    NAMESPACE,
    QLINEAR,
    QLINEAR_FUSED,
    QLINEAR_TIMESTEP,
    QUANTIZE_ACT,
    QUANTIZE_ACT_FP8,
    W8A8_LINEAR,
)

__all__ = ["ConsistencyError", "check_artifact", "program_layers"]


class ConsistencyError(ValueError):
    """The plan and the program (or its weights) disagree; the message names the layer."""


@dataclass
class _Layer:
    """What the program runs for one layer (possibly at several call sites)."""

    versions: tuple  # ((weight_bits, act_bits, weight_sym), ...) per timestep range
    group: int
    act_static: bool
    smooth: bool
    rotate: bool
    bounds: tuple | None = None
    shapes: list = field(default_factory=list)  # (fqn, dtype, shape, bits) of each weight version
    number_format: str = "int"


def _args(node: fx.Node) -> dict:
    """The node's arguments by schema name (positional and keyword alike)."""
    schema = node.target._schema  # type: ignore[union-attr]  # an OpOverload
    out = {}
    for i, a in enumerate(schema.arguments):
        if i < len(node.args):
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
    return out


def _layer_of(fqn: str | None, where: str) -> tuple[str, str]:
    """``<layer>.viditq_w_q<suffix>`` -> (layer, suffix)."""
    marker = ".viditq_w_q"
    if not fqn or marker not in fqn:
        raise ConsistencyError(f"{where}: its weight {fqn!r} is not a quantized weight of the program")
    layer, _, suffix = fqn.rpartition(marker)
    return layer, suffix


def program_layers(ep) -> dict[str, _Layer]:
    """Layer name -> what the program runs for it, read from its ``viditq`` ops."""
    sig = ep.graph_signature
    fqn_of = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
    tensors = {**ep.constants, **ep.state_dict}

    def weight(node, bits: int, where: str):
        fqn = fqn_of.get(node.name) if isinstance(node, fx.Node) and node.op == "placeholder" else None
        layer, _ = _layer_of(fqn, where)
        t = tensors.get(fqn)
        return layer, (fqn, getattr(t, "dtype", None), tuple(getattr(t, "shape", ())), bits)

    def producer(xq, where: str) -> tuple[dict, str]:
        """The arguments of the quantization feeding ``xq`` (fp8's with int's defaults) and the
        number format it produces."""
        ok = isinstance(xq, fx.Node) and xq.target is operator.getitem and isinstance(xq.args[0], fx.Node)
        if ok and xq.args[0].target == QUANTIZE_ACT.overload:
            return _args(xq.args[0]), "int"
        if ok and xq.args[0].target == QUANTIZE_ACT_FP8.overload:
            return {"act_bits": 8, "static_scale": None, **_args(xq.args[0])}, "fp8_e4m3"
        raise ConsistencyError(f"{where}: its input is not produced by {QUANTIZE_ACT.display} or "
                               f"{QUANTIZE_ACT_FP8.display}")

    out: dict[str, _Layer] = {}
    for node in ep.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if node.target.namespace != NAMESPACE:
            continue
        a, where = _args(node), f"op {node.name} ({node.target.name()})"
        if node.target == W8A8_LINEAR.overload:
            layer, shape = weight(a["w_q"], 8, where)
            got = _Layer(((8, int(a["act_bits"]), a["w_zero"] is None),), 0, False, False, False,
                         shapes=[shape])
        elif node.target in (QLINEAR.overload, QLINEAR_FUSED.overload):
            q, fmt = producer(a["xq"], where)
            layer, shape = weight(a["w_q"], int(a["weight_bits"]), where)
            got = _Layer(((int(a["weight_bits"]), int(q["act_bits"]), a["w_zero"] is None),),
                         int(a["group_size"]), q["static_scale"] is not None, q["smooth"] is not None,
                         bool(q["rotation"]), shapes=[shape], number_format=fmt)
        elif node.target == QLINEAR_TIMESTEP.overload:
            bits, acts, zeros = list(a["weight_bits"]), list(a["act_bits"]), list(a["w_zero"])
            if not (len(bits) == len(acts) == len(zeros) == len(a["w_q"]) == len(a["bounds"]) + 1):
                raise ConsistencyError(f"{where}: per-range argument lists of different lengths")
            shapes, layers = [], set()
            for wq, b in zip(a["w_q"], bits):
                name, shape = weight(wq, int(b), where)
                layers.add(name)
                shapes.append(shape)
            if len(layers) != 1:
                raise ConsistencyError(f"{where}: weights of several layers {sorted(layers)}")
            (layer,) = layers
            got = _Layer(tuple((int(b), int(c), z is None) for b, c, z in zip(bits, acts, zeros)),
                         int(a["group_size"]), False, a["smooth"] is not None, bool(a["rotation"]),
                         bounds=tuple(float(b) for b in a["bounds"]), shapes=shapes)
        else:
            continue  # quantize_act / balance: read through the ops that consume them
        prev = out.get(layer)
        if prev is not None and (prev.versions, prev.group, prev.act_static, prev.smooth, prev.rotate,
                                 prev.bounds, prev.number_format) != (
                got.versions, got.group, got.act_static, got.smooth, got.rotate, got.bounds,
                got.number_format):
            raise ConsistencyError(f"layer {layer!r}: its call sites run different formats")
        out[layer] = got
    return out


def _check_weights(lp, got: _Layer) -> None:
    for fqn, dtype, shape, bits in got.shapes:
        k = lp.in_features // 2 if bits == 4 else lp.in_features
        want = (torch.uint8 if bits == 4 else fp8.E4M3 if lp.fp8 else torch.int8, (lp.out_features, k))
        if (dtype, shape) != want:
            raise ConsistencyError(f"layer {lp.name!r}: weight {fqn!r} is {dtype} {shape}, a W{bits} "
                                   f"[{lp.out_features}, {lp.in_features}] layer needs {want[0]} {want[1]}")


def _check_values(ep) -> None:
    """Scales finite and > 0, zero points in range, smoothing vectors finite and non-zero (they
    carry the rotation's random signs), rotation factors finite."""
    for name, t in {**ep.constants, **ep.state_dict}.items():
        if not isinstance(t, torch.Tensor):
            continue
        leaf = name.rsplit(".", 1)[-1]
        positive = leaf.startswith(("viditq_w_scale", "viditq_act_scale"))
        nonzero = leaf.startswith("viditq_balance_vector")
        if positive or nonzero or name.startswith("viditq_hadamard.") or leaf.startswith("viditq_balanced_weight"):
            tf = t.detach().float()
            if not bool(torch.isfinite(tf).all()):
                raise ConsistencyError(f"tensor {name!r} holds NaN or Inf")
            if positive and t.numel() and not bool((tf > 0).all()):
                raise ConsistencyError(f"tensor {name!r} holds zero or negative scales "
                                       f"(min {float(tf.min()):.3g})")
            if nonzero and t.numel() and not bool((tf != 0).all()):
                raise ConsistencyError(f"tensor {name!r}: a smoothing vector holds zeros")
        elif leaf.startswith("viditq_w_zero") and t.numel():
            lo, hi = numerics.qrange(8)  # the widest weight format's range
            if t.dtype != torch.int32 or int(t.min()) < lo or int(t.max()) > hi:
                raise ConsistencyError(f"tensor {name!r}: zero points must be int32 in [{lo}, {hi}]")


def check_artifact(ep, plan) -> None:
    """Raise ``ConsistencyError`` unless ``ep`` runs exactly what ``plan`` says (module docstring)."""
    _check_values(ep)
    ran = program_layers(ep)
    unknown = sorted(set(ran) - set(plan.layers))
    if unknown:
        raise ConsistencyError(f"the program quantizes layer(s) the plan does not list: {unknown[:5]}")
    for lp in plan.layers.values():
        got = ran.get(lp.name)
        if not lp.quantized:
            if got is not None:
                raise ConsistencyError(f"layer {lp.name!r}: the plan keeps it in floating point, but the "
                                       f"program runs it at W{got.versions[0][0]}A{got.versions[0][1]}")
            continue
        if got is None:
            raise ConsistencyError(f"layer {lp.name!r}: the plan quantizes it, but the program has no "
                                   f"quantized op for it")
        want = tuple(tuple(v) for v in lp.versions())
        balance = lp.balance
        checks = [
            ("widths (weight bits, activation bits, symmetric weights) per range", want, got.versions),
            ("weight group", lp.weight_group or 0, got.group),
            ("static activation scale", bool(lp.act_static), got.act_static),
            # the balance vector also carries the rotation's random signs: a rotated layer has one
            ("balancing", bool(balance), got.smooth or got.rotate),
            ("rotation", balance_method.rotates(balance), got.rotate),
            ("number format", lp.number_format, got.number_format),
        ]
        if got.bounds is not None:
            checks.append(("timestep bounds", tuple(float(b) for b in plan.timestep_bounds), got.bounds))
        for what, planned, run in checks:
            if planned != run:
                raise ConsistencyError(f"layer {lp.name!r}: the plan says {what} {planned}, the program "
                                       f"runs {run}")
        _check_weights(lp, got)
