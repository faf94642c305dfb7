"""Where the linear layers are, in the two kinds of graph the passes run on.

The passes see a graph through ``GraphTensors``: which real tensor a weight node holds and under
which module path, which placeholder carries a given forward argument of the model
(``user_input``, e.g. the timestep a timestep-aware plan dispatches on), and how to add a new
constant tensor to the graph. Two implementations:

- ``ExportedTensors``: a lifted ``torch.export`` program (ATen IR). Weights are placeholders
  described by ``graph_signature.input_specs``; new tensors become persistent buffers. User
  inputs are the ``USER_INPUT`` specs, in the order of the flattened ``(args, kwargs)``.
- ``DynamoTensors``: the torch-level graph a ``torch.compile`` backend receives. Weights are
  placeholders whose real values are in ``example_inputs``; new tensors become ``get_attr``
  buffers of the ``GraphModule``. User inputs are the placeholders whose Dynamo source is a
  local of the traced ``forward`` (``L['timestep']``). Layer names are full module paths of the
  root model the weights belong to, found by identity (``ModuleIndex``), even when Dynamo
  compiled a nested module's frame on its own (its sources are then relative to that module);
  where the root is ambiguous the Dynamo source's name is kept and ``name_notes`` says why.
"""

from __future__ import annotations

import gc
import re
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import Tensor

from viditq_compile.config.plan import PlanError

LINEAR_TARGETS = (torch.ops.aten.linear.default, torch._C._nn.linear)
_aten = torch.ops.aten
CONV_TARGETS = (_aten.convolution.default, _aten.conv1d.default, _aten.conv2d.default,
                _aten.conv3d.default, _aten.conv1d.padding, _aten.conv2d.padding,
                _aten.conv3d.padding, torch.conv1d, torch.conv2d, torch.conv3d)
"""Convolution calls as export (``aten.convolution`` after decomposition, ``aten.conv2d`` before)
and Dynamo (``torch.conv2d``, which ``F.conv2d`` and ``nn.Conv2d`` call) record them."""
WEIGHT_VIEW_TARGETS = (_aten.view.default, _aten.reshape.default, torch.reshape)
"""How a graph views a linear convolution's ``[O, I, 1, ...]`` weight as ``[O, I]``
(``passes.conv_as_linear`` emits ``aten.view`` / ``torch.reshape``)."""


@dataclass
class LinearSite:
    """One call of a linear layer: ``node`` computes ``linear(x, weight, bias)``."""

    node: fx.Node
    name: str
    x: fx.Node
    weight_node: fx.Node
    bias: fx.Node | None
    weight: Tensor | None
    in_features: int
    out_features: int
    fp_reason: str | None = None
    param: Tensor | None = None
    """The model's tensor behind ``weight``, by identity (what caches and coverage key on): the
    weight itself, or the ``[O, I, 1, ...]`` parameter of a convolution rewritten as a linear,
    of which ``weight`` is an ``[O, I]`` view; ``None`` when the weight is no model tensor."""
    bias_value: Tensor | None = None
    """The real tensor behind ``bias`` (``None``: no bias, or one that is no model tensor)."""
    derived_weight: bool = False
    """Whether a pass replaced ``weight`` by a tensor of its own (balanced, folded): never the
    model's, so quantized copies of it are not shared through the weight cache."""


@dataclass
class ConvCall:
    """One convolution call, its arguments read by name from any of ``CONV_TARGETS``."""

    node: fx.Node
    x: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    stride: object
    padding: object
    dilation: object
    groups: int
    transposed: bool


def conv_call(node: fx.Node) -> ConvCall | None:
    """The convolution ``node`` computes, or ``None`` when it is no convolution call."""
    if node.op != "call_function" or node.target not in CONV_TARGETS:
        return None
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed",
             "output_padding", "groups") if node.target == _aten.convolution.default else \
        ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    given = dict(zip(names, node.args)) | dict(node.kwargs)
    x, w = given.get("input"), given.get("weight")
    if not isinstance(x, fx.Node) or not isinstance(w, fx.Node):
        return None
    b = given.get("bias")
    return ConvCall(node, x, w, b if isinstance(b, fx.Node) else None, given.get("stride", 1),
                    given.get("padding", 0), given.get("dilation", 1), int(given.get("groups", 1)),  # type: ignore[arg-type]  # an int argument
                    bool(given.get("transposed", False)))


@dataclass
class KeptConvolution:
    """A convolution the graph keeps as a convolution (so in floating point), and why."""

    name: str
    weight_shape: tuple[int, ...]
    reason: str


def _linear_args(node: fx.Node):
    a, kw = node.args, node.kwargs
    x = a[0] if len(a) > 0 else kw.get("input")
    w = a[1] if len(a) > 1 else kw.get("weight")
    b = a[2] if len(a) > 2 else kw.get("bias")
    return x, w, b


class GraphTensors:
    """Access to the real tensors behind a graph's nodes (see module docstring)."""

    gm: fx.GraphModule

    def weight_of(self, node: fx.Node) -> tuple[str | None, Tensor | None]:
        raise NotImplementedError

    def tensor_of(self, node: fx.Node) -> Tensor | None:
        """The real tensor behind a parameter / buffer node (a linear's bias), or ``None``."""
        return self.weight_of(node)[1]

    def add_tensor(self, name: str, tensor: Tensor) -> fx.Node:
        raise NotImplementedError

    def remove_if_unused(self, node: fx.Node) -> None:
        raise NotImplementedError

    def user_input(self, name: str) -> fx.Node:
        """The placeholder of the model's forward argument ``name``; ``PlanError`` naming the
        graph's inputs when there is none or it is not a tensor."""
        raise NotImplementedError

    def finalize(self) -> None:
        self.gm.graph.lint()
        self.gm.recompile()

    def linear_sites(self) -> list[LinearSite]:
        """Every linear call in graph order, with its module path and real weight (a weight that is
        an ``[O, I]`` view of an ``[O, I, 1, ...]`` model parameter, a convolution rewritten by
        ``passes.conv_as_linear``, is named after that parameter's module)."""
        sites = []
        for node in self.gm.graph.nodes:
            if node.op != "call_function" or node.target not in LINEAR_TARGETS:
                continue
            x, w, b = _linear_args(node)
            wname, weight, param = self._linear_weight(w) if isinstance(w, fx.Node) else (None, None, None)
            reason = None
            if weight is None:
                reason = "weight is not a model parameter (computed in the graph or passed as an input)"
                val = w.meta.get("val", w.meta.get("example_value")) if isinstance(w, fx.Node) \
                    else None
                shape = tuple(val.shape) if isinstance(val, Tensor) else (0, 0)
            else:
                shape = tuple(weight.shape)
                if not weight.is_floating_point():
                    reason = f"weight dtype {weight.dtype} is not floating point"
            name = _module_path(wname) if wname else _name_from_stack(node)
            bias = self.tensor_of(b) if isinstance(b, fx.Node) else None
            sites.append(LinearSite(node, name, x, w, b, weight, int(shape[-1]), int(shape[0]),
                                    reason, param, bias))
        return sites

    def _linear_weight(self, w: fx.Node) -> tuple[str | None, Tensor | None, Tensor | None]:
        """(name, [O, I] weight, the model tensor behind it) of a linear's weight node."""
        base = _viewed_weight(w)
        if base is not None:
            name, param = self.weight_of(base)
            shape = tuple(w.args[1])  # type: ignore[arg-type]  # a list of ints: _viewed_weight checked
            if param is not None and tuple(param.shape[:2]) == shape and all(d == 1 for d in param.shape[2:]):
                return name, param.detach().reshape(param.shape[0], param.shape[1]), param
        name, weight = self.weight_of(w)
        return name, weight, weight

    def drop_weight(self, node: fx.Node) -> None:
        """``remove_if_unused`` for a linear's weight node, through the ``[O, I]`` view of a
        rewritten convolution's weight (the view, then the parameter when nothing reads them)."""
        base = _viewed_weight(node)
        if base is not None:
            if not node.users:
                self.gm.graph.erase_node(node)
                self.remove_if_unused(base)
            return
        self.remove_if_unused(node)

    def kept_convolutions(self) -> list[KeptConvolution]:
        """Every convolution call still in the graph, in graph order, with why it is not run as a
        linear (``graph.modules.conv_refusal``, or why ``passes.conv_as_linear`` left it)."""
        from viditq_compile.graph.modules import conv_refusal

        out = []
        for node in self.gm.graph.nodes:
            c = conv_call(node)
            if c is None:
                continue
            wname, weight = self.weight_of(c.weight)
            val = weight if weight is not None else node_value(c.weight)
            shape = tuple(int(d) for d in val.shape) if isinstance(val, Tensor) else ()
            reason = conv_refusal(shape[2:], c.stride, c.padding, c.dilation, c.groups,
                                  c.transposed) if len(shape) > 2 else None
            if reason is None:
                reason = "weight is not a model parameter (computed in the graph or passed as an " \
                         "input)" if weight is None else \
                    "a linear convolution the conv_as_linear pass has not rewritten"
            out.append(KeptConvolution(_module_path(wname) if wname else _name_from_stack(node),
                                       shape, reason))
        return out


def _viewed_weight(w: fx.Node) -> fx.Node | None:
    """The node a ``WEIGHT_VIEW_TARGETS`` call views as a 2-D shape, or ``None``."""
    if w.op == "call_function" and w.target in WEIGHT_VIEW_TARGETS and len(w.args) == 2 \
            and isinstance(w.args[0], fx.Node) and isinstance(w.args[1], (list, tuple)) \
            and len(w.args[1]) == 2 and all(isinstance(d, int) for d in w.args[1]):
        return w.args[0]
    return None


def node_value(node):
    """The (fake) tensor a node was traced with: ``val`` in export graphs, ``example_value``
    in Dynamo graphs; ``None`` when the graph does not record one."""
    if not isinstance(node, fx.Node):
        return node
    return node.meta.get("val", node.meta.get("example_value"))


def fake_call(node: fx.Node) -> None:
    """Record ``node.meta["val"]`` for a node a pass created, by running its target on the fake
    values of its inputs (export graphs need it to save; Dynamo graphs are re-traced anyway)."""
    args = fx.node.map_aggregate(node.args, node_value)
    kwargs = fx.node.map_aggregate(node.kwargs, node_value)
    leaves = [a for a in torch.utils._pytree.tree_leaves((node.args, node.kwargs))
              if isinstance(a, fx.Node)]
    vals = [node_value(a) for a in leaves]
    if not vals or any(v is None for v in vals):
        return
    mode = next((v.fake_mode for v in vals if hasattr(v, "fake_mode")), None)
    if mode is None:
        return
    with mode:
        node.meta["val"] = node.target(*args, **kwargs)  # type: ignore[operator]  # a call_function node


def _module_path(weight_fqn: str) -> str:
    return weight_fqn[: -len(".weight")] if weight_fqn.endswith(".weight") else weight_fqn


def _name_from_stack(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return _clean_dynamo_path(path) if "L[" in path or "L__" in path else path
    return node.name


_DYNAMO_ATTR = re.compile(r"_(?:modules|parameters|buffers)(?:'\])?\['([^']+)'\]")


def _clean_dynamo_path(source: str) -> str:
    """``L['self'].__dict__['_modules']['blocks']._modules['0']._parameters['weight']``
    -> ``blocks.0.weight``."""
    parts = _DYNAMO_ATTR.findall(source)
    if parts:
        return ".".join(parts)
    s = re.sub(r"^L\['[^']*'\]\.?", "", source)
    return s.replace("__dict__", "").strip(".") or source


# ----------------------------------------------------------------------------------------------
class ExportedTensors(GraphTensors):
    """Tensors of a lifted ``ExportedProgram``; edits the program in place."""

    def __init__(self, ep: torch.export.ExportedProgram):
        from torch.export.graph_signature import InputKind

        self.ep = ep
        self.gm = ep.graph_module
        self._kind = InputKind
        self._spec = {s.arg.name: s for s in ep.graph_signature.input_specs
                      if hasattr(s.arg, "name")}
        self._new_specs: list = []
        self._fake_mode = None
        for n in self.gm.graph.nodes:
            val = n.meta.get("val")
            if n.op == "placeholder" and hasattr(val, "fake_mode"):
                self._fake_mode = val.fake_mode
                break

    def weight_of(self, node):
        spec = self._spec.get(node.name) if node.op == "placeholder" else None
        if spec is None:
            return None, None
        if spec.kind in (self._kind.PARAMETER, self._kind.BUFFER):
            return spec.target, self.ep.state_dict.get(spec.target)
        if spec.kind == self._kind.CONSTANT_TENSOR:
            return spec.target, self.ep.constants.get(spec.target)
        return None, None

    def add_tensor(self, name, tensor):
        from torch.export.graph_signature import InputSpec, TensorArgument

        g = self.gm.graph
        # lifted parameters and buffers come first among the placeholders
        state = (self._kind.PARAMETER, self._kind.BUFFER)
        first_user = next(n for n in g.nodes if n.op != "placeholder" or
                          self._spec.get(n.name) is None or self._spec[n.name].kind not in state)
        with g.inserting_before(first_user):
            node = g.placeholder("b_" + re.sub(r"\W", "_", name))
        node.meta["val"] = self._fake_mode.from_tensor(tensor, static_shapes=True) \
            if self._fake_mode is not None else tensor
        self.ep.state_dict[name] = tensor
        spec = InputSpec(self._kind.BUFFER, TensorArgument(node.name), name, persistent=True)
        self._spec[node.name] = spec
        self._new_specs.append(spec)
        return node

    def user_input(self, name):
        from torch.export.graph_signature import TensorArgument

        specs = [s for s in self.ep.graph_signature.input_specs if s.kind == self._kind.USER_INPUT]
        spec = _kwarg_spec(self.ep, specs, name)
        if spec is None:  # a positional argument: export names its placeholder after it
            spec = next((s for s in specs if getattr(s.arg, "name", None) == name), None)
        shown = [getattr(s.arg, "name", "?") for s in specs]
        if spec is None:
            raise PlanError(f"the plan dispatches on the model input {name!r}, but the exported "
                            f"program has no such input (its inputs: {shown})")
        if not isinstance(spec.arg, TensorArgument):
            raise PlanError(f"the plan dispatches on the model input {name!r}, but the program "
                            f"was exported with it as a {type(spec.arg).__name__} (a Python "
                            f"number is baked into the program): export with a tensor timestep")
        return next(n for n in self.gm.graph.nodes if n.op == "placeholder" and n.name == spec.arg.name)

    def remove_if_unused(self, node):
        if node.users or node.op != "placeholder":
            return
        spec = self._spec.pop(node.name, None)
        self.gm.graph.erase_node(node)
        if spec is None:
            return
        sig = self.ep.graph_signature
        if spec in self._new_specs:
            self._new_specs.remove(spec)
        else:
            sig.input_specs.remove(spec)
        if not any(s.target == spec.target for s in list(sig.input_specs) + self._new_specs):
            self.ep.state_dict.pop(spec.target, None)
            self.ep.constants.pop(spec.target, None)

    def finalize(self):
        sig = self.ep.graph_signature
        order = {n.name: i for i, n in enumerate(self.gm.graph.nodes) if n.op == "placeholder"}
        specs = list(sig.input_specs) + self._new_specs
        self._new_specs = []
        sig.input_specs[:] = sorted(specs, key=lambda s: order[s.arg.name])
        sync_output_specs(self.ep)
        super().finalize()


def sync_output_specs(ep: torch.export.ExportedProgram) -> None:
    """Point ``ep``'s output specs at the nodes the graph's output node now returns, in order: a
    pass that replaced a node the program returns (a model whose last op is a quantized linear)
    leaves the spec naming the old node, which ``torch.export.save`` refuses."""
    from torch.export.graph_signature import TensorArgument

    out = next(n for n in reversed(ep.graph_module.graph.nodes) if n.op == "output")
    returned = torch.utils._pytree.tree_leaves(out.args[0])
    specs = ep.graph_signature.output_specs
    if len(returned) != len(specs):
        raise RuntimeError(f"the graph returns {len(returned)} values but the program's signature "
                           f"has {len(specs)} outputs")
    for spec, node in zip(specs, returned):
        if isinstance(spec.arg, TensorArgument) and isinstance(node, torch.fx.Node):
            spec.arg.name = node.name


def _kwarg_spec(ep, user_specs, name):
    """The USER_INPUT spec of keyword argument ``name``: user inputs follow the leaves of the
    program's ``(args, kwargs)`` tree spec, in order."""
    in_spec = ep.call_spec.in_spec
    if in_spec is None or in_spec.num_leaves != len(user_specs):
        return None
    args_kwargs = torch.utils._pytree.tree_unflatten(list(range(len(user_specs))), in_spec)
    kwargs = args_kwargs[1] if isinstance(args_kwargs, tuple) and len(args_kwargs) == 2 else None
    leaf = kwargs.get(name) if isinstance(kwargs, dict) else None
    return user_specs[leaf] if isinstance(leaf, int) else None


class ModuleIndex:
    """Where the live parameters sit: one pass over the live ``nn.Module`` objects (``gc``, after
    a collection, so that garbage such as ``torch.export``'s wrapper of a model it captured is not
    taken for a parent) records each module's parents (parent, attribute) and each parameter's
    owners (module, attribute), by weak reference; a link is used only while it still holds. A
    ``torch.compile`` wrapper (``OptimizedModule``) is transparent: the module it wraps is the
    root. ``fresh()`` builds one (the backend: once per graph); ``recent(params)`` reuses the
    last one for a few seconds when it knows ``params`` (other modules running a compiled graph).
    """

    _last: ModuleIndex | None = None

    def __init__(self) -> None:
        from torch._dynamo.eval_frame import OptimizedModule

        gc.collect()
        self.built = time.monotonic()
        self._parents: dict[int, list[tuple[weakref.ref, str]]] = {}
        self._owners: dict[int, list[tuple[weakref.ref, str]]] = {}
        for m in gc.get_objects():
            if not issubclass(type(m), torch.nn.Module) or isinstance(m, OptimizedModule):
                continue
            d = m.__dict__
            ref = weakref.ref(m)
            for attr, child in (d.get("_modules") or {}).items():
                # torch.export's wrapper of the model it traces (``_export_root``) outlives a
                # failed export while its traceback does (an ``except CaptureError:`` block)
                if child is not None and attr != "_export_root":
                    self._parents.setdefault(id(child), []).append((ref, attr))
            for attr, p in (d.get("_parameters") or {}).items():
                if p is not None:
                    self._owners.setdefault(id(p), []).append((ref, attr))

    @classmethod
    def fresh(cls) -> ModuleIndex:
        cls._last = cls()
        return cls._last

    @classmethod
    def recent(cls, params: Sequence[Tensor], max_age: float = 10.0) -> ModuleIndex:
        last = cls._last
        if last is not None and time.monotonic() - last.built < max_age and \
                all(last._links(last._owners, p, "_parameters") for p in params):
            return last
        return cls.fresh()

    @staticmethod
    def _links(table, obj, kind: str) -> list[torch.nn.Module]:
        out = []
        for ref, attr in table.get(id(obj), ()):
            m = ref()
            if m is not None and (m.__dict__.get(kind) or {}).get(attr) is obj:
                out.append(m)
        return out

    def roots_of(self, param: Tensor) -> dict[int, torch.nn.Module]:
        """The modules without a parent that hold ``param`` (directly or below), by id."""
        roots: dict[int, torch.nn.Module] = {}
        todo = self._links(self._owners, param, "_parameters")
        seen: set[int] = set()
        while todo:
            m = todo.pop()
            if id(m) in seen:
                continue
            seen.add(id(m))
            parents = self._links(self._parents, m, "_modules")
            if parents:
                todo += parents
            else:
                roots[id(m)] = m
        return roots

    @staticmethod
    def names_in(root: torch.nn.Module) -> dict[int, list[str]]:
        """Parameter id -> every full name it has in ``root`` (more than one: shared)."""
        named: dict[int, list[str]] = {}
        for name, p in root.named_parameters(remove_duplicate=False):
            named.setdefault(id(p), []).append(name)
        return named

    def resolve(self, params: Sequence[Tensor]) -> Resolution:
        """Full names of ``params`` (the parameters of one graph) in the one root module holding
        them all; where there is no such root, or a parameter has several names in it, no name
        and the reason."""
        out = Resolution()
        roots = {id(p): self.roots_of(p) for p in params}
        held = [r for r in roots.values() if r]
        common = set.intersection(*(set(r) for r in held)) if held else set()
        candidates = {k: v for r in held for k, v in r.items() if k in common}
        if len(candidates) > 1:  # a program derived from the model (an unlifted export) also holds some
            plain = {k: v for k, v in candidates.items() if not _holds_graph_module(v)}
            candidates = plain or candidates
        if len(candidates) == 1:
            out.root = next(iter(candidates.values()))
            named = self.names_in(out.root)
            for p in params:
                names = named.get(id(p), [])
                if len(names) == 1:
                    out.names[id(p)] = names[0]
                elif names:
                    out.reasons[id(p)] = (f"the weight is shared by {', '.join(names[:4])} of "
                                          f"{type(out.root).__name__}: the graph's name is kept")
            return out
        every = {k: v for r in held for k, v in r.items()}
        shown = ", ".join(sorted({type(m).__name__ for m in (candidates or every).values()}))
        why = (f"its weights belong to {len(candidates)} root modules ({shown}), so the root is "
               f"ambiguous" if candidates else
               f"no one root module holds all its weights (they belong to {shown})")
        for p in params:
            if roots[id(p)]:
                out.reasons[id(p)] = f"{why}: the graph's name is kept"
        return out


def _holds_graph_module(m: torch.nn.Module) -> bool:
    return any(isinstance(sub, fx.GraphModule) for sub in m.modules())


@dataclass
class Resolution:
    """``ModuleIndex.resolve``'s answer: the root, parameter id -> full name, id -> why not."""

    root: torch.nn.Module | None = None
    names: dict[int, str] = field(default_factory=dict)
    reasons: dict[int, str] = field(default_factory=dict)


class DynamoTensors(GraphTensors):
    """Tensors of the graph a Dynamo backend receives (parameters lifted to placeholders).

    ``index``: the ``ModuleIndex`` that names the weights by identity (built on first use when
    ``None``; ``False``: the Dynamo sources' names only). After ``linear_sites``: ``root`` (the
    model the names are paths of, or ``None``), ``renamed`` (the source's name -> the full path,
    where they differ) and ``name_notes`` (layer name -> why it is not a full path)."""

    def __init__(self, gm: fx.GraphModule, example_inputs, index: ModuleIndex | None | bool = None):
        self.gm = gm
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self._value = {n: v for n, v in zip(placeholders, example_inputs)}
        self._added: list[str] = []
        self._index = index
        self._resolution: Resolution | None = None
        self.root: torch.nn.Module | None = None
        self.renamed: dict[str, str] = {}
        self.name_notes: dict[str, str] = {}

    def _resolve(self) -> Resolution:
        if self._resolution is None:
            if self._index is False:
                self._resolution = Resolution()
            else:
                if not isinstance(self._index, ModuleIndex):
                    self._index = ModuleIndex.fresh()
                params = list({id(v): v for v in self._value.values()
                               if isinstance(v, torch.nn.Parameter)}.values())
                self._resolution = self._index.resolve(params) if params else Resolution()
            self.root = self._resolution.root
        return self._resolution

    def tensor_of(self, node):
        val = self._value.get(node)  # without weight_of's naming, which records renames
        return val if isinstance(val, Tensor) else None

    def weight_of(self, node):
        val = self._value.get(node)
        if not isinstance(val, torch.nn.Parameter):
            return None, None
        arg = node.meta.get("grapharg")
        src = getattr(arg, "source", None)
        name = getattr(src, "name", None)
        name = name() if callable(name) else name
        from_source = _clean_dynamo_path(name) if name else node.name
        found = self._resolve()
        full = found.names.get(id(val))
        if full is None:
            reason = found.reasons.get(id(val))
            if reason:
                self.name_notes[_module_path(from_source)] = reason
            return from_source, val
        if full != from_source:
            self.renamed[_module_path(from_source)] = _module_path(full)
        return full, val

    def naming(self) -> str | None:
        """One line for the report: which sub-module of which model this graph compiles (its
        names were resolved to full paths), and the layers whose names are not full paths."""
        parts = []
        if self.renamed and self.root is not None:
            model = type(self.root).__name__
            prefixes = {full[: -len(rel) - 1] for rel, full in self.renamed.items()
                        if full.endswith("." + rel)}
            if len(prefixes) == 1 and len(self.renamed) == sum(
                    full.endswith("." + rel) for rel, full in self.renamed.items()):
                parts.append(f"compiles sub-module `{prefixes.pop()}` of {model}: names are "
                             f"full paths")
            else:
                shown = ", ".join(f"{rel} -> {full}" for rel, full in list(self.renamed.items())[:4])
                parts.append(f"{len(self.renamed)} layer name(s) of the Dynamo sources resolved "
                             f"to full paths of {model} ({shown}"
                             f"{', ...' if len(self.renamed) > 4 else ''})")
        if self.name_notes:
            reasons = sorted(set(self.name_notes.values()))
            parts.append(f"{len(self.name_notes)} layer(s) keep the graph's (maybe relative) name "
                         f"({', '.join(list(self.name_notes)[:4])}"
                         f"{', ...' if len(self.name_notes) > 4 else ''}): {'; '.join(reasons)}")
        return "; ".join(parts) or None

    def user_input(self, name):
        from torch._dynamo.source import LocalSource

        inputs = {}
        for n in self.gm.graph.nodes:
            src = getattr(n.meta.get("grapharg"), "source", None) if n.op == "placeholder" else None
            if isinstance(src, LocalSource):
                inputs[src.local_name] = n
        node = inputs.get(name)
        if node is None:
            raise PlanError(f"the plan dispatches on the model input {name!r}, but the graph "
                            f"Dynamo captured has no tensor input of that name (its inputs: "
                            f"{sorted(inputs)}). Dynamo specializes a Python-number timestep "
                            f"into the graph: pass it as a tensor, as diffusers does")
        val = node_value(node)
        if not isinstance(val, Tensor):
            raise PlanError(f"the plan dispatches on the model input {name!r}, but Dynamo traced "
                            f"it as a {type(val).__name__}, not a tensor (a Python number is "
                            f"specialized or made a SymInt): pass the timestep as a tensor")
        return node

    def add_tensor(self, name, tensor):
        attr = "_viditq_" + re.sub(r"\W", "_", name)
        self.gm.register_buffer(attr, tensor)
        self._added.append(attr)
        g = self.gm.graph
        first = next(n for n in g.nodes if n.op != "placeholder")
        with g.inserting_before(first):
            return g.get_attr(attr)

    def remove_if_unused(self, node):
        # Dynamo passes every placeholder at run time (the model keeps its weights anyway), but
        # a tensor this pass added and no longer reads is dropped.
        if node.users or node.op != "get_attr" or node.target not in self._added:
            return
        self.gm.graph.erase_node(node)
        self._added.remove(node.target)
        delattr(self.gm, node.target)

    def finalize(self):
        # AOTAutograd looks up a Dynamo source for every buffer of a Dynamo graph; the new
        # buffers have none. Give them constant sources and drop the Dynamo marker so both
        # lookups (torch 2.6 - 2.13) accept them.
        from torch._dynamo.source import ConstantSource

        sources = getattr(self.gm, "_param_name_to_source", None)
        if isinstance(sources, dict):
            for attr in self._added:
                sources[attr] = ConstantSource(attr)
        self.gm.meta.pop("dynamo_compile_id", None)
        super().finalize()
