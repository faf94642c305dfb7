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
  local of the traced ``forward`` (``L['timestep']``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import Tensor

from viditq_compile.config.plan import PlanError

LINEAR_TARGETS = (torch.ops.aten.linear.default, torch._C._nn.linear)


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
        """Every linear call in graph order, with its module path and real weight."""
        sites = []
        for node in self.gm.graph.nodes:
            if node.op != "call_function" or node.target not in LINEAR_TARGETS:
                continue
            x, w, b = _linear_args(node)
            wname, weight = self.weight_of(w) if isinstance(w, fx.Node) else (None, None)
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
            sites.append(LinearSite(node, name, x, w, b, weight, int(shape[-1]), int(shape[0]),
                                    reason))
        return sites


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
        super().finalize()


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


class DynamoTensors(GraphTensors):
    """Tensors of the graph a Dynamo backend receives (parameters lifted to placeholders)."""

    def __init__(self, gm: fx.GraphModule, example_inputs):
        self.gm = gm
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self._value = {n: v for n, v in zip(placeholders, example_inputs)}
        self._added: list[str] = []

    def weight_of(self, node):
        val = self._value.get(node)
        if not isinstance(val, torch.nn.Parameter):
            return None, None
        arg = node.meta.get("grapharg")
        src = getattr(arg, "source", None)
        name = getattr(src, "name", None)
        name = name() if callable(name) else name
        return (_clean_dynamo_path(name) if name else node.name), val

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
