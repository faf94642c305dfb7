"""The ``viditq`` ops' names and arguments: the one place that spells them.

Each op is an ``OpSchema``: its name, its arguments in order (name, TorchScript schema type,
default) and what it returns. ``ops/library.py`` defines the ops from these (``custom_op(...,
schema=spec.signature)``); every module that finds, reads or builds calls of the ops (the
passes, ``lowering/``, ``io/consistency.py``, the report, the backend) goes through them, so
an argument is read by name whether a call passed it by position or by keyword
(``spec.bind`` / ``spec.get``) and a call is built in schema order (``spec.positional``).

Changing an op's name or arguments here changes the programs written from then on: a saved
program records the op's name and its arguments by position.

Plain data: importing this module imports no torch (``packet`` / ``overload`` / ``of`` do).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import fx

__all__ = ["NAMESPACE", "Arg", "OpSchema", "OPS", "BY_NAME", "LINEAR_OPS", "of",
           "W8A8_LINEAR", "BALANCE", "QUANTIZE_ACT", "QUANTIZE_ACT_FP8", "QLINEAR", "QLINEAR_FUSED", "QLINEAR_TIMESTEP",
           "ATTENTION", "INT8_MM"]

NAMESPACE = "viditq"


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""``Arg.default`` of an argument without a default."""


@dataclass(frozen=True)
class Arg:
    """One argument: ``type`` is its TorchScript schema type (``"Tensor"``, ``"Tensor?"``,
    ``"Tensor[]"``, ``"Tensor?[]"``, ``"SymInt"``, ``"SymInt[]"``, ``"float[]"``, ``"bool"``,
    ``"str"``, ``"ScalarType"``)."""

    name: str
    type: str
    default: Any = REQUIRED

    @property
    def has_default(self) -> bool:
        return self.default is not REQUIRED

    @property
    def is_tensor(self) -> bool:
        """A tensor, an optional tensor, or a list of (optional) tensors."""
        return self.type.startswith("Tensor")

    @property
    def declaration(self) -> str:
        """``"SymInt act_bits=8"``: the argument in a schema string."""
        if not self.has_default:
            return f"{self.type} {self.name}"
        d = self.default
        if not (d is None or isinstance(d, (bool, int, float))):
            raise TypeError(f"Arg {self.name}: default {d!r} has no schema spelling here")
        return f"{self.type} {self.name}={d}"


@dataclass(frozen=True)
class OpSchema:
    """One ``viditq`` op (see the module docstring)."""

    name: str
    args: tuple[Arg, ...]
    returns: str = "Tensor"

    @property
    def qualname(self) -> str:
        """``"viditq::qlinear"``: the name ``torch.library`` takes."""
        return f"{NAMESPACE}::{self.name}"

    @property
    def display(self) -> str:
        """``"viditq.qlinear"``: the op in messages and reports."""
        return f"{NAMESPACE}.{self.name}"

    @property
    def signature(self) -> str:
        """``"(Tensor x, ...) -> Tensor"``: ``torch.library.custom_op``'s ``schema``."""
        return f"({', '.join(a.declaration for a in self.args)}) -> {self.returns}"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.args)

    @property
    def tensor_args(self) -> tuple[str, ...]:
        """The names of the arguments that hold tensors (or lists of them)."""
        return tuple(a.name for a in self.args if a.is_tensor)

    def index(self, name: str) -> int:
        """The position of argument ``name``."""
        for i, a in enumerate(self.args):
            if a.name == name:
                return i
        raise KeyError(f"{self.display} has no argument {name!r} (arguments: {list(self.names)})")

    @property
    def packet(self) -> torch._ops.OpOverloadPacket:
        """``torch.ops.viditq.<name>`` (the op must be defined: import ``ops.library`` first)."""
        import torch

        return getattr(getattr(torch.ops, NAMESPACE), self.name)

    @property
    def overload(self) -> torch._ops.OpOverload:
        """``torch.ops.viditq.<name>.default``, the target of the op's graph nodes."""
        return self.packet.default

    def calls(self, node: fx.Node) -> bool:
        """``node`` calls this op, as its overload or through its packet (Dynamo records
        ``torch.ops.viditq.qlinear(...)`` written in user code as the packet)."""
        return node.op == "call_function" and of(node.target) is self

    def bind(self, args: Sequence = (), kwargs: Mapping | None = None) -> dict[str, Any]:
        """Argument name -> value of a call ``op(*args, **kwargs)``, defaults filled in.
        ``TypeError`` for a call the op would refuse (unknown, repeated or missing arguments)."""
        kwargs = dict(kwargs or {})
        if len(args) > len(self.args):
            raise TypeError(f"{self.display} takes {len(self.args)} arguments, got {len(args)}")
        out = dict(zip(self.names, args))
        for name, value in kwargs.items():
            if name not in self.names:
                raise TypeError(f"{self.display} has no argument {name!r}")
            if name in out:
                raise TypeError(f"{self.display}: argument {name!r} given twice")
            out[name] = value
        for a in self.args:
            if a.name not in out:
                if not a.has_default:
                    raise TypeError(f"{self.display}: missing argument {a.name!r}")
                out[a.name] = a.default
        return {name: out[name] for name in self.names}

    def node_args(self, node: fx.Node) -> dict[str, Any]:
        """``bind`` of a graph node's ``args`` and ``kwargs``."""
        return self.bind(node.args, node.kwargs)

    def get(self, node: fx.Node, name: str) -> Any:
        """Argument ``name`` of a call of this op (``node``), positional or keyword."""
        i = self.index(name)
        if i < len(node.args):
            return node.args[i]
        if name in node.kwargs:
            return node.kwargs[name]
        a = self.args[i]
        if not a.has_default:
            raise TypeError(f"{self.display} call {node.name}: missing argument {name!r}")
        return a.default

    def positional(self, values: Mapping[str, Any] | None = None, **more: Any) -> tuple:
        """Every argument in schema order, from ``values`` and ``more`` by name (defaults for the
        ones left out): the ``args`` of a node that calls this op."""
        return tuple(self.bind((), {**(values or {}), **more}).values())


# ---- the ops ----------------------------------------------------------------------------------

W8A8_LINEAR = OpSchema("w8a8_linear", (
    Arg("x", "Tensor"), Arg("w_q", "Tensor"), Arg("w_scale", "Tensor"), Arg("w_zero", "Tensor?"),
    Arg("bias", "Tensor?"), Arg("act_bits", "SymInt", 8)))

BALANCE = OpSchema("balance", (
    Arg("x", "Tensor"), Arg("smooth", "Tensor?"), Arg("rotation", "Tensor[]")))

QUANTIZE_ACT = OpSchema("quantize_act", (
    Arg("x", "Tensor"), Arg("smooth", "Tensor?"), Arg("rotation", "Tensor[]"),
    Arg("static_scale", "Tensor?"), Arg("act_bits", "SymInt", 8)), returns="(Tensor, Tensor)")

QUANTIZE_ACT_FP8 = OpSchema("quantize_act_fp8", (
    Arg("x", "Tensor"), Arg("smooth", "Tensor?"), Arg("rotation", "Tensor[]")), returns="(Tensor, Tensor)")

_QLINEAR_ARGS = (
    Arg("xq", "Tensor"), Arg("x_scale", "Tensor"), Arg("w_q", "Tensor"), Arg("w_scale", "Tensor"),
    Arg("w_zero", "Tensor?"), Arg("bias", "Tensor?"), Arg("weight_bits", "SymInt"),
    Arg("group_size", "SymInt"), Arg("out_dtype", "ScalarType"))

QLINEAR = OpSchema("qlinear", _QLINEAR_ARGS)

QLINEAR_FUSED = OpSchema("qlinear_fused", (
    *_QLINEAR_ARGS, Arg("activation", "str"), Arg("gate", "Tensor?"), Arg("residual", "Tensor?"),
    Arg("packed_act", "bool")))

QLINEAR_TIMESTEP = OpSchema("qlinear_timestep", (
    Arg("x", "Tensor"), Arg("smooth", "Tensor?"), Arg("rotation", "Tensor[]"), Arg("timestep", "Tensor"),
    Arg("bounds", "float[]"), Arg("w_q", "Tensor[]"), Arg("w_scale", "Tensor[]"),
    Arg("w_zero", "Tensor?[]"), Arg("bias", "Tensor?"), Arg("weight_bits", "SymInt[]"),
    Arg("act_bits", "SymInt[]"), Arg("group_size", "SymInt"), Arg("out_dtype", "ScalarType")))

ATTENTION = OpSchema("attention", (
    Arg("q", "Tensor"), Arg("k", "Tensor"), Arg("v", "Tensor"), Arg("scale", "float"),
    Arg("block_q", "SymInt", 128), Arg("block_k", "SymInt", 128)))
"""SageAttention-style quantized attention (``numerics.attention``); not a linear layer."""

INT8_MM = OpSchema("int8_mm", (
    Arg("xq", "Tensor"), Arg("w_q", "Tensor"), Arg("w_zero", "Tensor?"), Arg("weight_bits", "SymInt"),
    Arg("w_scale", "Tensor?"), Arg("out_dtype", "ScalarType")))
"""The integer GEMM with a float product (``numerics.int8_mm`` on ``numerics.zero_adjusted_weight``
of the unpacked weight): what the CPU decompositions of the linear ops call
(``lowering/inductor.py``); no pass writes it into a saved program."""

OPS: tuple[OpSchema, ...] = (W8A8_LINEAR, BALANCE, QUANTIZE_ACT, QUANTIZE_ACT_FP8, QLINEAR, QLINEAR_FUSED,
                             QLINEAR_TIMESTEP, ATTENTION, INT8_MM)
BY_NAME: dict[str, OpSchema] = {op.name: op for op in OPS}

LINEAR_OPS: tuple[OpSchema, ...] = (W8A8_LINEAR, QLINEAR, QLINEAR_FUSED, QLINEAR_TIMESTEP)
"""The ops that are a linear layer (a GEMM with a weight)."""


def of(target: Any) -> OpSchema | None:
    """The schema of a ``viditq`` op, given its overload or packet (a node's ``target``); None
    for anything else."""
    import torch

    if isinstance(target, torch._ops.OpOverload):
        qualified = target._schema.name
    elif isinstance(target, torch._ops.OpOverloadPacket):
        qualified = target._qualified_op_name
    else:
        return None
    namespace, _, name = qualified.partition("::")
    return BY_NAME.get(name) if namespace == NAMESPACE else None
