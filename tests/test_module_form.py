"""The module form (``viditq_compile.module_form``): quantized layers as ``nn.Module``s that call the
``viditq`` ops with the program's own tensors, so a quantized model stays the user's module.

Specification: layer by layer, a ``QuantizedLinear`` given the input the program's op got returns
exactly the op's output (same ops, same tensors: bit-exact); a layout written and read back
rebuilds modules that reload the state dict bit-exact; ``.to(dtype)`` moves the bias but never
rounds the quantized tensors; a hostile layout is refused with the bad value named and nothing
changed."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import fx

import viditq_compile as vq
from tests import zoo
from viditq_compile import module_form as mf
from viditq_compile.ops.schema import QLINEAR, W8A8_LINEAR

PRESETS = ["w8a8", "w8a8-naive", "w4a8", "w4a8-naive", "w8a8-viditq", "w4a8-viditq", "w8a8-fp8-viditq"]


def _out(y):
    return y[0] if isinstance(y, tuple) else y.sample


@pytest.fixture(scope="module")
def pixart():
    model, kwargs = zoo.build_pixart(seed=3)
    calls = zoo.trajectory_calls(kwargs, seed=4)[:3]
    return model, kwargs, vq.calibrate(model, calls, progress=False)


def _module_form(pixart, preset):
    model, kwargs, stats = pixart
    qm = vq.quantize(model, (), kwargs, recipe=preset, calibration=stats)
    m = copy.deepcopy(model)
    n = mf.to_modules(m, qm)
    return qm, m, n


@pytest.mark.parametrize("preset", PRESETS)
def test_each_module_computes_what_the_program_op_computes(pixart, preset):
    model, kwargs, _ = pixart
    qm, m, n = _module_form(pixart, preset)
    assert n == len(qm.plan.quantized) > 0
    gm = qm.module
    rec = fx.Interpreter(gm, garbage_collect_values=False)
    rec.run(*torch.utils._pytree.tree_leaves(((), kwargs)))
    layers = mf.quantized_linears(m)
    seen = set()
    for node in gm.graph.nodes:
        if not (QLINEAR.calls(node) or W8A8_LINEAR.calls(node)):
            continue
        x = node.args[0] if W8A8_LINEAR.calls(node) else node.args[0].args[0].args[0]
        w = next(a for a in node.all_input_nodes if a.op == "get_attr" and ".viditq_w_q" in a.target)
        name = w.target.rpartition(".viditq_w_q")[0]
        got = layers[name](rec.env[x])
        assert torch.equal(got, rec.env[node]), f"{preset}: {name} differs from the program's op"
        seen.add(name)
    assert seen == set(layers) == {lp.name for lp in qm.plan.quantized}
    # the floating-point weights are gone from the quantized layers
    for q in layers.values():
        assert q.weight.dtype in (torch.int8, torch.uint8, torch.float8_e4m3fn)
        assert not q.weight.requires_grad


@pytest.mark.parametrize("preset", ["w4a8-viditq", "w8a8-fp8-viditq"])
def test_layout_and_state_dict_rebuild_the_model_bit_exact(pixart, preset):
    model, kwargs, _ = pixart
    _, m, _ = _module_form(pixart, preset)
    want = _out(m(**kwargs))
    fresh = copy.deepcopy(model)
    assert mf.from_layout(fresh, mf.layout(m), device="meta") == len(mf.quantized_linears(m))
    fresh.load_state_dict(m.state_dict(), assign=True)
    for q in mf.quantized_linears(fresh).values():  # recomputed, not stored
        q.to("cpu")
    assert torch.equal(_out(fresh(**kwargs)), want)
    assert not any(k.endswith("hadamard_0") for k in m.state_dict())


def test_to_dtype_moves_the_bias_and_keeps_the_quantized_tensors(pixart):
    _, m, _ = _module_form(pixart, "w8a8-fp8-viditq")
    q = next(iter(mf.quantized_linears(m).values()))
    before = {n: getattr(q, n).clone() for n in q.quantized_tensors()}
    m.to(torch.bfloat16)
    assert q.bias.dtype == torch.bfloat16
    for n, t in before.items():
        now = getattr(q, n)
        assert now.dtype == t.dtype and torch.equal(now.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else now,
                                                    t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t), n


def test_library_layer_discovery_skips_quantized_layers(pixart):
    from viditq_compile.graph.modules import linear_layers

    qm, m, _ = _module_form(pixart, "w8a8")
    left = set(linear_layers(m))
    assert not left & set(mf.quantized_linears(m))
    assert left == {lp.name for lp in qm.plan.layers.values() if not lp.quantized} & left


def _a_layout(pixart):
    _, m, _ = _module_form(pixart, "w4a8-viditq")
    return mf.layout(m)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(version=2), "layout.version"),
    (lambda d: d.pop("layers"), "expected a mapping"),
    (lambda d: d["layers"].update({"../etc": next(iter(d["layers"].values()))}), "not a module path"),
    (lambda d: d["layers"].update({"nope.to_q": next(iter(d["layers"].values()))}), "no linear layer"),
    (lambda d: next(iter(d["layers"].values())).update(weight_bits=3), "weight_bits=3"),
    (lambda d: next(iter(d["layers"].values())).update(op="exec"), "op='exec'"),
    (lambda d: next(iter(d["layers"].values())).update(in_features=7), "do not match the layer"),
    (lambda d: next(iter(d["layers"].values()))["shapes"]["weight"].__setitem__(1, [10 ** 9, 1]), "shapes="),
    (lambda d: next(iter(d["layers"].values())).update(extra=1), "expected a mapping with keys"),
    (lambda d: next(iter(d["layers"].values())).update(group_size=5), "group_size=5"),
])
def test_a_hostile_layout_is_refused_and_changes_nothing(pixart, edit, message):
    model = pixart[0]
    data = copy.deepcopy(_a_layout(pixart))
    edit(data)
    target = copy.deepcopy(model)
    before = {n: type(m) for n, m in target.named_modules()}
    with pytest.raises(mf.LayoutError, match=message.replace("(", r"\(").replace("[", r"\[")):
        mf.from_layout(target, data)
    assert {n: type(m) for n, m in target.named_modules()} == before


def test_to_modules_validates_its_arguments(pixart):
    model, kwargs, _ = pixart
    with pytest.raises(TypeError, match="QuantizedModel"):
        mf.to_modules(copy.deepcopy(model), object())
    qm = vq.quantize(model, (), kwargs, recipe="w8a8")
    with pytest.raises(ValueError, match="not a linear layer of the model"):
        mf.to_modules(torch.nn.Sequential(torch.nn.Linear(4, 4)), qm)


def test_the_backend_compiles_the_module_form_to_what_it_computes_eagerly(pixart):
    """Same ops in the graph as in the program: the backend compiles them as they are (with the
    ``fp`` recipe so that the layers the plan kept in floating point stay so) and fuses their
    epilogues; the result is the eager module form's within fp32 rounding (relative 1e-4: where
    Inductor's fp32 rounding moves an activation across a rounding boundary, one code differs)."""
    from viditq_compile import backend

    model, kwargs, _ = pixart
    qm, m, _ = _module_form(pixart, "w4a8-viditq")
    eager = _out(m(**kwargs))
    before = len(backend.REPORTS)
    compiled = torch.compile(m, backend="viditq", options={"recipe": "fp"})
    with torch.no_grad():
        got = _out(compiled(**kwargs))
    assert all(r.num_quantized == 0 for r in list(backend.REPORTS)[before:])  # nothing re-quantized
    assert (got - eager).abs().max().item() <= 1e-4 * eager.abs().max().item()
    torch._dynamo.reset()
