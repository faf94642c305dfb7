"""The module form of a quantized model: each quantized layer an ``nn.Module`` that calls the
``viditq`` ops, so the model stays the user's ``nn.Module`` (diffusers' ``save_pretrained``,
``.to()``, offload hooks and LoRA adapters see it).

``to_modules(model, qm)`` copies what a quantized program (``vq.quantize``) runs for each layer
into a ``QuantizedLinear`` that replaces the layer in ``model``: the same ops, with the same
tensors (integer weights, scales, zero points, balancing vector, static activation scale), so the
module form computes what the program computes, bit for bit (``tests/test_module_form.py``), and
``torch.compile(model, backend="viditq", options={"recipe": "fp"})`` fuses it as it fuses the
program (the backend compiles a graph that already holds ``viditq`` ops as it is; recipe ``fp``
keeps a graph that holds only the layers the plan kept in floating point so). ``quantize_modules``
does both steps. ``fuse_lora`` folds PEFT LoRA branches into the quantized weights.

What the module form does not do: one quantization per input shared by the layers that read it
(q / k / v each quantize their input; the numbers are the same, the program is faster), and
timestep-dependent widths (``qlinear_timestep`` needs the model's timestep: refused, use the
program).

``QuantizedLinear`` subclasses ``nn.Linear`` as bitsandbytes' and quanto's quantized linears do:
PEFT (and so ``pipe.load_lora_weights``) wraps ``nn.Linear`` layers, and the LoRA branch then runs
in 16-bit beside the quantized GEMM. Its ``weight`` is the integer (or e4m3) weight as a
``requires_grad=False`` Parameter; scales and vectors are buffers that keep their dtype through
``.to(dtype)``. The library's own layer discovery (``graph.modules.is_linear_layer``) skips it.

``layout(model)`` describes every ``QuantizedLinear`` as plain JSON data (what a diffusers
``config.json`` stores), and ``from_layout(model, layout)`` puts empty ones in place from it, after
validating every entry: a hostile layout gets a ``LayoutError`` naming the bad value.
"""

from __future__ import annotations

import logging
import operator
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, fx, nn

from viditq_compile.graph import modules
from viditq_compile.numerics import fp8
from viditq_compile.numerics import quant as numerics
from viditq_compile.numerics.hadamard import hadamard_order_split
from viditq_compile.numerics.packing import pack_int4, unpack_int4
from viditq_compile.numerics.parallel import rotation_factors
from viditq_compile.ops.schema import (
    QLINEAR,
    QLINEAR_FUSED,
    QLINEAR_TIMESTEP,
    QUANTIZE_ACT,
    QUANTIZE_ACT_FP8,
    W8A8_LINEAR,
)

log = logging.getLogger(__name__)

__all__ = ["QuantizedLinear", "LayoutError", "to_modules", "quantize_modules", "layout", "from_layout",
           "quantized_linears", "fuse_lora"]

LAYOUT_VERSION = 1
MAX_LAYERS = 100_000
MAX_FEATURES = 1 << 20
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
_DTYPES = {"int8": torch.int8, "uint8": torch.uint8, "int32": torch.int32, "float32": torch.float32,
           "float8_e4m3fn": torch.float8_e4m3fn}
_FORMATS = ("int", "fp8_e4m3")


class LayoutError(ValueError):
    """A module-form layout (``config.json``'s ``quantization_config.layout``) that cannot be used."""


class QuantizedLinear(nn.Linear):
    """One quantized linear layer (or 1×1 convolution, ``spatial`` > 0) in module form.

    spec: ``op`` (``"w8a8"``: ``viditq.w8a8_linear``; ``"qlinear"``: ``viditq.quantize_act`` /
    ``quantize_act_fp8`` then ``viditq.qlinear``), ``in_features``, ``out_features``,
    ``weight_bits``, ``act_bits``, ``group_size``, ``number_format`` (``"int"`` / ``"fp8_e4m3"``),
    ``zero`` / ``vector`` / ``rotated`` / ``static`` / ``bias`` (which tensors exist), ``spatial``
    (spatial dims of a convolution, 0 for a linear), ``shapes`` (tensor name -> [dtype, shape]);
    optionally ``rotation_blocks`` (an int >= 2: the rotation is block-diagonal,
    ``numerics.parallel.rotation_factors``, as ``vq.quantize(..., tensor_parallel=N)`` makes
    row-parallel layers; absent: one full-width rotation).

    Tensors: ``weight`` [N, K] int8 / e4m3 or [N, K/2] uint8 (packed int4; a Parameter),
    ``weight_scale`` fp32 [N] or [N, K/group], ``weight_zero`` int32 like the scale,
    ``act_vector`` fp32 [K] (balancing: smoothing x random signs), ``act_scale`` (static
    activation scale), ``bias`` (the layer's own, in the model's dtype); the Hadamard factors of a
    rotated layer are recomputed from K and ``rotation_blocks`` (``numerics.parallel.rotation_factors``),
    not stored.
    Built empty (``torch.empty`` on ``device``); ``to_modules`` or a state dict fills them.
    """

    viditq_quantized = True
    weight_scale: Tensor
    weight_zero: Tensor | None
    act_vector: Tensor | None
    act_scale: Tensor | None

    def __init__(self, spec: Mapping[str, Any], device: torch.device | str | None = None,
                 bias_dtype: torch.dtype | None = None):
        spec = check_spec(spec, "QuantizedLinear")
        nn.Module.__init__(self)
        self.spec = dict(spec)
        self.in_features, self.out_features = spec["in_features"], spec["out_features"]
        shapes = spec["shapes"]

        def empty(name):
            dtype, shape = shapes[name]
            return torch.empty(shape, dtype=_DTYPES[dtype], device=device)

        self.weight = nn.Parameter(empty("weight"), requires_grad=False)
        self.register_buffer("weight_scale", empty("weight_scale"))
        for name in ("weight_zero", "act_vector", "act_scale"):
            self.register_buffer(name, empty(name) if name in shapes else None)
        if spec["bias"]:
            self.bias = nn.Parameter(torch.empty(spec["out_features"], dtype=bias_dtype, device=device))
        else:
            self.register_parameter("bias", None)
        factors = rotation_factors(spec["in_features"], spec.get("rotation_blocks")) if spec["rotated"] else []
        self._n_factors = len(factors)
        for i, f in enumerate(factors):
            self.register_buffer(f"hadamard_{i}", f.to(device if device is not None and str(device) != "meta"
                                                       else f.device), persistent=False)

    def rotation(self) -> list[Tensor]:
        return [getattr(self, f"hadamard_{i}") for i in range(self._n_factors)]

    def quantized_tensors(self) -> list[str]:
        """The names of the tensors whose dtype the quantization fixes (not the bias)."""
        return [n for n in ("weight", "weight_scale", "weight_zero", "act_vector", "act_scale")
                if getattr(self, n) is not None] + [f"hadamard_{i}" for i in range(self._n_factors)]

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() would round the fp32 scales and turn the e4m3 weight into 16-bit
        # floats: take only the device change for the quantized tensors
        # detached: a Parameter's .data is reassigned in place
        keep = {n: getattr(self, n).detach() for n in self.quantized_tensors()}
        super()._apply(fn, recurse)
        for n, old in keep.items():
            new = getattr(self, n)
            if new.dtype != old.dtype:
                fixed = old.to(device=new.device)
                if isinstance(new, nn.Parameter):
                    new.data = fixed
                else:
                    self._buffers[n] = fixed
        return self

    def forward(self, x: Tensor) -> Tensor:
        spatial = self.spec["spatial"]
        t = x.movedim(modules.channel_dim(x, spatial), -1) if spatial else x
        if self.spec["op"] == "w8a8":
            y = W8A8_LINEAR.overload(t, self.weight, self.weight_scale, self.weight_zero, self.bias,
                                            self.spec["act_bits"])
        else:
            if self.spec["number_format"] == "fp8_e4m3":
                xq, xs = QUANTIZE_ACT_FP8.overload(t, self.act_vector, self.rotation())
            else:
                xq, xs = QUANTIZE_ACT.overload(t, self.act_vector, self.rotation(), self.act_scale,
                                               self.spec["act_bits"])
            y = QLINEAR.overload(xq, xs, self.weight, self.weight_scale, self.weight_zero, self.bias,
                                 self.spec["weight_bits"], self.spec["group_size"], t.dtype)
        return y.movedim(-1, modules.channel_dim(x, spatial)) if spatial else y

    def dequantized_weight(self) -> Tensor:
        """The balanced weight ``W'`` the integer (or e4m3) weight stands for, fp32 [N, K]."""
        s = self.spec
        q = unpack_int4(self.weight) if s["weight_bits"] == 4 else self.weight
        return numerics.QuantizedWeight(q, self.weight_scale, self.weight_zero, s["weight_bits"],
                                        s["group_size"] or None).dequantize()

    @torch.no_grad()
    def add_to_weight(self, delta: Tensor) -> None:
        """Re-quantize the layer with ``delta`` (an [N, K] change of the original weight ``W``, e.g. a
        LoRA's ``B @ A * scale``) added: the delta is balanced as ``W`` was (``W' = W / v @ R`` for
        the balancing vector ``v = m * d`` and the Hadamard factors), added to the dequantized
        ``W'`` and quantized again in the layer's format; one rounding more than quantizing the
        merged floating-point weight would cost (the report of the program does not know it)."""
        n, k = self.out_features, self.in_features
        if not isinstance(delta, Tensor) or tuple(delta.shape) != (n, k) or not delta.is_floating_point():
            raise ValueError(f"add_to_weight: delta must be a float [{n}, {k}] tensor, got "
                             f"{getattr(delta, 'dtype', type(delta).__name__)} {tuple(getattr(delta, 'shape', ()))}")
        s = self.spec
        d = numerics.balance_weight(delta.to(self.weight_scale.device), self.act_vector, None, self.rotation())
        w = self.dequantized_weight() + d
        if s["number_format"] == "fp8_e4m3":
            qw = fp8.quantize_weight_fp8(w)
        else:
            qw = numerics.quantize_weight(w, bits=s["weight_bits"], sym=not s["zero"], group=s["group_size"] or None)
        q = pack_int4(qw.q) if s["weight_bits"] == 4 else qw.q
        self.weight.data = q.to(self.weight.device)
        self.weight_scale.copy_(qw.scale)
        if self.weight_zero is not None and qw.zero is not None:
            self.weight_zero.copy_(qw.zero)

    def extra_repr(self) -> str:
        s = self.spec
        fmt = "e4m3" if s["number_format"] == "fp8_e4m3" else f"W{s['weight_bits']}A{s['act_bits']}"
        parts = [f"in_features={s['in_features']}", f"out_features={s['out_features']}", fmt]
        if s["group_size"]:
            parts.append(f"group={s['group_size']}")
        if s["vector"]:
            parts.append("balanced" + (" + rotated" if s["rotated"] else ""))
        return ", ".join(parts)


def fuse_lora(model: nn.Module, adapter_names: list[str] | None = None) -> int:
    """Fold the LoRA branches that PEFT (``pipe.load_lora_weights``, ``load_lora_adapter``) put
    beside ``QuantizedLinear`` layers into their weights (``QuantizedLinear.add_to_weight``: balanced,
    added, re-quantized) and put the bare quantized layer back in place of the PEFT wrapper; returns
    the number of layers fused. ``adapter_names``: the adapters to fuse (default: the layer's active
    ones). Use it instead of diffusers' ``fuse_lora()``, which adds the delta to an integer weight."""
    fused = 0
    for path, m in list(model.named_modules()):
        base = getattr(m, "base_layer", None)
        if not isinstance(base, QuantizedLinear) or not hasattr(m, "get_delta_weight"):
            continue
        names = list(adapter_names) if adapter_names is not None else list(m.active_adapters)
        unknown = [a for a in names if a not in m.lora_A]
        if unknown:
            raise ValueError(f"layer {path!r}: no LoRA adapter {unknown} (it has {sorted(m.lora_A)})")
        if not names:
            continue
        delta = sum(m.get_delta_weight(a).to(torch.float32) for a in names)
        base.add_to_weight(delta)  # type: ignore[arg-type]
        _set_module(model, path, base)
        fused += 1
    log.info("fuse_lora: %d quantized layers re-quantized with their LoRA", fused)
    return fused


def quantized_linears(model: nn.Module) -> dict[str, QuantizedLinear]:
    """Module path -> every ``QuantizedLinear`` of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


# --- program -> modules -----------------------------------------------------------------------
def _args(node: fx.Node, schema) -> dict:
    return schema.node_args(node)


def _program_layers(program: torch.export.ExportedProgram) -> dict[str, dict]:
    """Layer name -> (spec, tensors) of each linear op of ``program``."""
    sig = program.graph_signature
    fqn_of = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
    values = {**program.constants, **program.state_dict}

    def tensor(node, where: str) -> Tensor | None:
        if node is None:
            return None
        fqn = fqn_of.get(node.name) if isinstance(node, fx.Node) and node.op == "placeholder" else None
        if fqn is None or fqn not in values:
            raise ValueError(f"{where}: argument {getattr(node, 'name', node)!r} is not a tensor the program holds")
        return values[fqn]

    out: dict[str, dict] = {}
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        where = f"op {node.name}"
        if QLINEAR_TIMESTEP.calls(node):
            raise ValueError(f"{where}: a layer with timestep-dependent widths (qlinear_timestep) has no "
                             f"module form (it needs the model's timestep); keep the program form "
                             f"(vq.quantize) for this plan")
        if QLINEAR_FUSED.calls(node):
            raise ValueError(f"{where}: qlinear_fused appears only in compiled graphs; pass the exported "
                             f"program")
        if W8A8_LINEAR.calls(node):
            a = _args(node, W8A8_LINEAR)
            q: dict = {"smooth": None, "rotation": [], "static_scale": None, "act_bits": int(a["act_bits"])}
            op, fmt, wbits, group = "w8a8", "int", 8, 0
        elif QLINEAR.calls(node):
            a = _args(node, QLINEAR)
            xq = a["xq"]
            src = xq.args[0] if isinstance(xq, fx.Node) and xq.target is operator.getitem else None
            if not isinstance(src, fx.Node):
                raise ValueError(f"{where}: its input is not produced by {QUANTIZE_ACT.display}")
            if QUANTIZE_ACT.calls(src):
                q, fmt = _args(src, QUANTIZE_ACT), "int"
            elif QUANTIZE_ACT_FP8.calls(src):
                q, fmt = {"static_scale": None, "act_bits": 8, **_args(src, QUANTIZE_ACT_FP8)}, "fp8_e4m3"
            else:
                raise ValueError(f"{where}: its input is not produced by {QUANTIZE_ACT.display}")
            op, wbits, group = "qlinear", int(a["weight_bits"]), int(a["group_size"])
        else:
            continue
        w_fqn = fqn_of.get(a["w_q"].name, "")
        layer = w_fqn.rpartition(".viditq_w_q")[0]
        if not layer:
            raise ValueError(f"{where}: its weight {w_fqn!r} is not a quantized weight of the program")
        tensors = {"weight": tensor(a["w_q"], where), "weight_scale": tensor(a["w_scale"], where),
                   "weight_zero": tensor(a["w_zero"], where), "act_vector": tensor(q["smooth"], where),
                   "act_scale": tensor(q["static_scale"], where)}
        rotation = [tensor(r, where) for r in q["rotation"]]
        blocks = _rotation_blocks(rotation)
        spec = {**({"rotation_blocks": blocks} if blocks > 1 else {}),
                "op": op, "weight_bits": wbits, "act_bits": int(q["act_bits"]), "group_size": group,
                "number_format": fmt, "rotated": bool(rotation), "bias": a["bias"] is not None,
                "shapes": {n: [_dtype_name(t), list(t.shape)] for n, t in tensors.items() if t is not None}}
        out.setdefault(layer, {"spec": spec, "tensors": tensors, "rotation": rotation})
    return out


def _rotation_blocks(rotation: list) -> int:
    """The diagonal blocks of a rotation given as Kronecker factors: the order of a leading
    identity factor (``numerics.parallel.rotation_factors``), 1 for a full-width rotation."""
    if len(rotation) > 1 and rotation[0] is not None:
        f = rotation[0]
        if f.dim() == 2 and f.shape[0] > 1 and torch.equal(f, torch.eye(f.shape[0], dtype=f.dtype, device=f.device)):
            return int(f.shape[0])
    return 1


def _dtype_name(t: Tensor) -> str:
    name = str(t.dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"tensor of dtype {t.dtype} has no module form (dtypes: {sorted(_DTYPES)})")
    return name


def to_modules(model: nn.Module, qm) -> int:
    """Replace each layer ``qm``'s program quantizes by a ``QuantizedLinear`` holding the
    program's tensors for it (copies: ``model`` does not share memory with ``qm``); returns the
    number of layers replaced. ``qm``: a ``QuantizedModel`` made from ``model`` (its layer names
    are ``model``'s module paths). Layers the program keeps in floating point are left as they
    are. Raises ``ValueError`` for a program layer ``model`` does not have, or has with other
    features, for plans without a module form (timestep-dependent widths) and for programs with
    quantized attention (``passes.quantize_attention``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    program = getattr(qm, "program", None)
    if not isinstance(program, torch.export.ExportedProgram):
        raise TypeError(f"qm must be a viditq_compile.QuantizedModel, got {type(qm).__name__}")
    from viditq_compile.passes.quantize_attention import program_attentions

    attentions = [name for name, _, _ in program_attentions(program.graph_module)]
    if attentions:  # a module holds no attention op: it would silently run in floating point
        raise ValueError(f"module form has no quantized attention, but the program quantizes "
                         f"{attentions[:4]}: use the program (vq.quantize) or the viditq backend, "
                         f"or a recipe whose attention rule is fp")
    found = _program_layers(program)
    named = dict(model.named_modules())
    built: dict[str, QuantizedLinear] = {}
    for layer, d in found.items():
        mod = named.get(layer)
        if mod is None or not modules.is_linear_layer(mod):
            raise ValueError(f"layer {layer!r} of the program is not a linear layer of the model "
                             f"({type(mod).__name__ if mod is not None else 'no such module'})")
        w = modules.linear_weight(mod)
        spec = {**d["spec"], "out_features": int(w.shape[0]), "in_features": int(w.shape[1]),
                "vector": d["tensors"]["act_vector"] is not None, "zero": d["tensors"]["weight_zero"] is not None,
                "static": d["tensors"]["act_scale"] is not None,
                "spatial": 0 if isinstance(mod, nn.Linear) else len(mod.kernel_size)}
        q = QuantizedLinear(spec, device=w.device, bias_dtype=mod.bias.dtype if mod.bias is not None else None)
        for i, (f, g) in enumerate(zip(q.rotation(), d["rotation"])):
            if f.shape != g.shape or not torch.equal(f, g.to(f.device)):
                raise ValueError(f"layer {layer!r}: the program's Hadamard factor {i} is not rotation_factors"
                                 f"({spec['in_features']}, {spec.get('rotation_blocks')})[{i}]")
        if len(d["rotation"]) != len(q.rotation()):
            raise ValueError(f"layer {layer!r}: the program rotates with {len(d['rotation'])} factors, "
                             f"rotation_factors({spec['in_features']}, {spec.get('rotation_blocks')}) has "
                             f"{len(q.rotation())}")
        with torch.no_grad():
            for n, t in d["tensors"].items():
                if t is not None:
                    getattr(q, n).copy_(t)
        if mod.bias is not None:
            q.bias = mod.bias  # the layer's own parameter: LoRA, hooks and dtype moves see it
        for attr in ("_tp_packed_row_blocks", "_tp_packed_col_blocks"):  # diffusers' packed TP layers
            if hasattr(mod, attr):
                setattr(q, attr, getattr(mod, attr))
        built[layer] = q
    for layer, q in built.items():
        _set_module(model, layer, q)
    log.info("module form: %d layers replaced by QuantizedLinear", len(built))
    return len(built)


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    setattr(owner, leaf, new)


def quantize_modules(model: nn.Module, args: tuple = (), kwargs: dict | None = None, **quantize_kwargs):
    """``vq.quantize(model, args, kwargs, **quantize_kwargs)`` (recipe, plan, calibration, ...),
    then ``to_modules``: ``model`` is quantized in place in module form. Returns the program's
    ``Report`` (what was quantized, kept FP and why). The program is dropped afterwards; while it
    exists the quantized weights are held twice."""
    from viditq_compile.api import quantize

    qm = quantize(model, args, kwargs, **quantize_kwargs)
    to_modules(model, qm)
    return qm.report


# --- layout: the JSON a config stores ---------------------------------------------------------
def layout(model: nn.Module) -> dict:
    """``{"version": 1, "layers": {path: spec}}`` for every ``QuantizedLinear`` of ``model``."""
    return {"version": LAYOUT_VERSION,
            "layers": {n: {k: v for k, v in m.spec.items()} for n, m in quantized_linears(model).items()}}


def from_layout(model: nn.Module, data: Any, device: torch.device | str | None = None) -> int:
    """Put an empty ``QuantizedLinear`` (on ``device``) in place of each layer ``data``
    (``layout``'s output, as read from a file: validated first, nothing changed on a refusal)
    names; returns how many. The replaced layer must be a linear layer with the layout's
    features."""
    if not isinstance(data, Mapping) or set(data) != {"version", "layers"}:
        raise LayoutError(f"layout: expected a mapping with keys ['layers', 'version'], got "
                          f"{sorted(data) if isinstance(data, Mapping) else type(data).__name__}")
    if data["version"] != LAYOUT_VERSION:
        raise LayoutError(f"layout.version: {data['version']!r} is not {LAYOUT_VERSION} (made by another "
                          f"viditq_compile version?)")
    layers = data["layers"]
    if not isinstance(layers, Mapping) or len(layers) > MAX_LAYERS:
        raise LayoutError(f"layout.layers: expected a mapping of at most {MAX_LAYERS} layers")
    named = dict(model.named_modules())
    built = {}
    for path, spec in layers.items():
        where = f"layout.layers[{path!r}]"
        if not isinstance(path, str) or not _NAME.fullmatch(path):
            raise LayoutError(f"layout.layers: {path!r} is not a module path")
        mod = named.get(path)
        if mod is None or not (modules.is_linear_layer(mod) or isinstance(mod, QuantizedLinear)):
            raise LayoutError(f"{where}: the model has no linear layer there "
                              f"({type(mod).__name__ if mod is not None else 'no such module'})")
        spec = check_spec(spec, where)
        w = mod.weight
        feats = (mod.out_features, mod.in_features) if isinstance(mod, QuantizedLinear) else \
            tuple(modules.linear_weight(mod).shape)
        if feats != (spec["out_features"], spec["in_features"]):
            raise LayoutError(f"{where}: features {spec['out_features']}x{spec['in_features']} but the model's "
                              f"layer is {feats[0]}x{feats[1]}")
        b = mod.bias
        if (b is not None) != spec["bias"]:
            raise LayoutError(f"{where}: bias={spec['bias']} but the model's layer "
                              f"{'has' if b is not None else 'has no'} bias")
        built[path] = QuantizedLinear(spec, device=device if device is not None else w.device,
                                      bias_dtype=b.dtype if b is not None else None)
    for path, q in built.items():
        _set_module(model, path, q)
    return len(built)


def _expect(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise LayoutError(f"{where}: {what}")


def check_spec(spec: Any, where: str) -> dict:
    """A layer spec validated (types, ranges, and tensor shapes consistent with the features);
    ``LayoutError`` naming the bad value otherwise."""
    keys = {"op", "in_features", "out_features", "weight_bits", "act_bits", "group_size", "number_format",
            "zero", "vector", "rotated", "static", "bias", "spatial", "shapes"}
    _expect(isinstance(spec, Mapping) and set(spec) - {"rotation_blocks"} == keys, where,
            f"expected a mapping with keys {sorted(keys)} (and optionally 'rotation_blocks'), got "
            f"{sorted(map(str, spec)) if isinstance(spec, Mapping) else type(spec).__name__}")

    def integer(key, lo, hi):
        v = spec[key]
        _expect(isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi, where,
                f"{key}={v!r} is not an integer in [{lo}, {hi}]")
        return v

    def flag(key):
        _expect(isinstance(spec[key], bool), where, f"{key}={spec[key]!r} is not true/false")
        return spec[key]

    _expect(spec["op"] in ("w8a8", "qlinear"), where, f"op={spec['op']!r} is not 'w8a8' or 'qlinear'")
    k, n = integer("in_features", 1, MAX_FEATURES), integer("out_features", 1, MAX_FEATURES)
    wbits, abits = integer("weight_bits", 4, 8), integer("act_bits", 4, 8)
    _expect(wbits in (4, 8) and abits in (4, 8), where, f"widths W{wbits}A{abits} are not 4 or 8 bits")
    group = integer("group_size", 0, k)
    _expect(group == 0 or k % group == 0, where, f"group_size={group} does not divide in_features={k}")
    fmt = spec["number_format"]
    _expect(fmt in _FORMATS, where, f"number_format={fmt!r} is not one of {_FORMATS}")
    integer("spatial", 0, 3)
    for f in ("zero", "vector", "rotated", "static", "bias"):
        flag(f)
    _expect(spec["op"] == "qlinear" or (wbits == 8 and group == 0 and fmt == "int" and not spec["vector"]
                                        and not spec["rotated"] and not spec["static"]), where,
            "op 'w8a8' takes only per-channel int8 weights without balancing or static scales")
    _expect(not spec["rotated"] or spec["vector"], where, "rotated without a balancing vector")
    if "rotation_blocks" in spec:
        blocks = integer("rotation_blocks", 2, k)
        _expect(spec["rotated"] and k % blocks == 0, where,
                f"rotation_blocks={blocks} needs a rotated layer whose in_features={k} it divides")
        try:
            hadamard_order_split(k // blocks)
        except ValueError as e:
            raise LayoutError(f"{where}: rotation_blocks={blocks}: {e}") from None
    w_dtype = "float8_e4m3fn" if fmt == "fp8_e4m3" else ("uint8" if wbits == 4 else "int8")
    w_shape = [n, k // 2] if wbits == 4 else [n, k]
    s_shape = [n, k // group] if group else [n]
    expected: dict[str, list] = {"weight": [w_dtype, w_shape], "weight_scale": ["float32", s_shape]}
    if spec["zero"]:
        expected["weight_zero"] = ["int32", s_shape]
    if spec["vector"]:
        expected["act_vector"] = ["float32", [k]]
    shapes = spec["shapes"]
    _expect(isinstance(shapes, Mapping), where, "shapes is not a mapping")
    if spec["static"]:
        got = shapes.get("act_scale")
        _expect(isinstance(got, list) and len(got) == 2 and got[0] == "float32" and isinstance(got[1], list)
                and len(got[1]) <= 1 and all(s == 1 for s in got[1]), where,
                f"shapes.act_scale={got!r} is not a float32 scalar")
        expected["act_scale"] = got
    _expect(dict(shapes) == expected, where, f"shapes={dict(shapes)!r} do not match the layer "
                                             f"(expected {expected!r})")
    _expect(not (wbits == 4 and k % 2), where, f"4-bit weights need an even in_features, got {k}")
    return dict(spec)
