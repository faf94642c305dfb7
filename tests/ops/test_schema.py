"""``ops/schema.py``: the one place that spells the ``viditq`` ops' names and arguments."""

from __future__ import annotations

import ast
import inspect
import pathlib
import re

import pytest
import torch
from torch import fx

import viditq_compile
from viditq_compile.ops import library, schema
from viditq_compile.ops.schema import QLINEAR, QLINEAR_FUSED, QUANTIZE_ACT, W8A8_LINEAR

OPS = pytest.mark.parametrize("op", schema.OPS, ids=lambda op: op.name)


@OPS
def test_the_registered_op_has_the_schema(op):
    assert str(op.overload._schema) == f"{op.qualname}{op.signature}"
    assert op.overload is getattr(torch.ops.viditq, op.name).default


@OPS
def test_the_python_definition_agrees_with_the_schema(op):
    """``library`` defines each op from its schema; the Python signature under it (what the CPU
    implementation and the fake take) must say the same."""
    definition = getattr(library, op.name)
    assert torch.library.infer_schema(definition._init_fn, mutates_args=()) == op.signature
    fake = inspect.signature(definition._abstract_fn)
    assert tuple(fake.parameters) == op.names
    for a in op.args:
        default = fake.parameters[a.name].default
        assert (default is inspect.Parameter.empty) == (not a.has_default)
        if a.has_default:
            assert default == a.default


def test_every_op_of_the_namespace_is_in_the_schema():
    namespace = torch.ops.viditq
    defined = {n for n in dir(namespace) if isinstance(getattr(namespace, n), torch._ops.OpOverloadPacket)}
    assert defined == set(schema.BY_NAME)


def test_names_positions_and_tensor_arguments():
    assert QLINEAR_FUSED.index("activation") == 9 and QLINEAR_FUSED.index("packed_act") == 12
    assert QLINEAR_FUSED.names[:9] == QLINEAR.names
    assert QUANTIZE_ACT.tensor_args == ("x", "smooth", "rotation", "static_scale")
    assert W8A8_LINEAR.qualname == "viditq::w8a8_linear" and W8A8_LINEAR.display == "viditq.w8a8_linear"
    assert {op.name for op in schema.LINEAR_OPS} == {"w8a8_linear", "qlinear", "qlinear_fused", "qlinear_timestep"}
    with pytest.raises(KeyError, match="no argument 'act'"):
        QLINEAR_FUSED.index("act")


def test_bind_reads_positional_and_keyword_arguments_alike():
    by_position = W8A8_LINEAR.bind(("x", "w", "s", None, "b", 4))
    by_keyword = W8A8_LINEAR.bind(("x",), dict(bias="b", w_scale="s", w_zero=None, w_q="w", act_bits=4))
    assert by_position == by_keyword == dict(x="x", w_q="w", w_scale="s", w_zero=None, bias="b", act_bits=4)
    assert W8A8_LINEAR.bind(("x", "w", "s", None, "b"))["act_bits"] == 8  # the default
    assert W8A8_LINEAR.positional(x="x", w_q="w", w_scale="s", w_zero=None, bias="b") == ("x", "w", "s", None, "b", 8)


@pytest.mark.parametrize("args,kwargs,match", [
    (("x", "w", "s", None, "b", 8, 9), {}, "takes 6 arguments"),
    (("x", "w", "s", None, "b"), dict(bits=8), "no argument 'bits'"),
    (("x", "w", "s", None, "b"), dict(x="x"), "'x' given twice"),
    (("x", "w"), {}, "missing argument 'w_scale'"),
])
def test_bind_refuses_what_the_op_would_refuse(args, kwargs, match):
    with pytest.raises(TypeError, match=match):
        W8A8_LINEAR.bind(args, kwargs)


def test_get_and_calls_on_graph_nodes():
    g = fx.Graph()
    x = g.placeholder("x")
    by_keyword = g.call_function(QUANTIZE_ACT.overload, (x,), dict(smooth=None, rotation=[], static_scale=None))
    through_packet = g.call_function(QUANTIZE_ACT.packet, (x, None, [], None, 4))
    other = g.call_function(torch.ops.aten.relu.default, (x,))
    assert QUANTIZE_ACT.calls(by_keyword) and QUANTIZE_ACT.calls(through_packet) and not QUANTIZE_ACT.calls(other)
    assert not QLINEAR.calls(by_keyword)
    assert QUANTIZE_ACT.get(by_keyword, "x") is x and QUANTIZE_ACT.get(by_keyword, "act_bits") == 8
    assert QUANTIZE_ACT.get(through_packet, "act_bits") == 4
    assert schema.of(torch.ops.aten.relu.default) is None and schema.of(len) is None


# ---- nobody else spells the ops -----------------------------------------------------------------

_QUALIFIED = re.compile(r"\bviditq(\.|::)(" + "|".join(schema.BY_NAME) + r")\b")


def test_no_module_but_the_schema_spells_an_op():
    """``torch.ops.viditq`` attribute chains and ``"viditq.qlinear"`` / ``"viditq::qlinear"``
    strings (docstrings aside) appear only in ``ops/schema.py``; everything else asks the schema."""
    root = pathlib.Path(viditq_compile.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        if path == root / "ops" / "schema.py":
            continue
        tree = ast.parse(path.read_text())
        docs = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
        for n in ast.walk(tree):
            if isinstance(n, ast.Attribute) and n.attr == schema.NAMESPACE and isinstance(n.value, ast.Attribute) \
                    and n.value.attr == "ops":
                found.append(f"{path.relative_to(root)}:{n.lineno}: {ast.unparse(n)}")
            elif isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs \
                    and _QUALIFIED.search(n.value):
                found.append(f"{path.relative_to(root)}:{n.lineno}: {n.value!r}")
    assert not found, "\n".join(found)
