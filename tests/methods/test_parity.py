"""One plan, one meaning: each method's eager reference (what the search scores layers with) computes,
layer by layer, what the program built from the same plan computes.

For every preset (the naive baselines included) the program is run once, recording every quantized
linear's input and output; each layer's eager reference (``methods.int_weight.EagerLinear`` with
``methods.balance.layer_transforms``) is then applied to the very input the program's op got, so
differences cannot compound. The activation codes are integers: bit-exact. The outputs are float
epilogues over the same integer GEMM: within fp32 rounding (relative 1e-5 of the layer's output
range)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import fx

import viditq_compile as vq
from tests import zoo
from viditq_compile.config.recipe import PRESETS
from viditq_compile.graph.capture import capture
from viditq_compile.graph.sites import ExportedTensors
from viditq_compile.methods import int_weight
from viditq_compile.methods.balance import layer_transforms
from viditq_compile.numerics import fp8
from viditq_compile.numerics import quant as numerics

OPS = {torch.ops.viditq.w8a8_linear.default, torch.ops.viditq.qlinear.default,
       torch.ops.viditq.qlinear_timestep.default}
SUFFIX = ".viditq_w_q"
# searching presets (a budget, balance="search") need the calibration calls, not statistics
PRESET_NAMES = sorted(n for n, r in PRESETS.items() if r.enabled and r.budget is None and r.balance_search is None)
# the balancing presets again with their out projections' balancing folded into the value projections
FOLDED = [f"{n}+fold" for n in ("w8a8-smooth", "w8a8-rotate", "w4a8-viditq")]


def _recipe(name: str):
    base, _, fold = name.partition("+")
    return dataclasses.replace(PRESETS[base], name=name, fold_balance=True) if fold else base


def _layer_of(node: fx.Node) -> str:
    found = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n))
    for n in found:
        if n.op == "get_attr" and SUFFIX in n.target:
            return n.target[: n.target.index(SUFFIX)]
    raise AssertionError(f"{node}: no integer weight among its arguments")


class _Recorder(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm, garbage_collect_values=False)


def _program_values(qm, kwargs):
    gm = qm.module
    rec = _Recorder(gm)
    flat = torch.utils._pytree.tree_leaves(((), kwargs))
    rec.run(*flat)
    return gm, rec.env


def _source_input(node: fx.Node) -> fx.Node:
    x = node.args[0]
    if node.target == torch.ops.viditq.qlinear.default:  # xq = getitem(quantize_act(src, ...), 0)
        return x.args[0].args[0]
    return x


@pytest.fixture(scope="module")
def pixart():
    torch.manual_seed(0)
    model, kwargs = zoo.build_pixart(seed=3)
    model.eval()
    calls = zoo.trajectory_calls(kwargs, seed=4)[:3]
    return model, kwargs, calls


@pytest.mark.parametrize("preset", PRESET_NAMES + FOLDED)
def test_eager_reference_matches_the_program_layer_by_layer(pixart, preset):
    model, kwargs, calls = pixart
    stats = vq.calibrate(model, calls, progress=False)
    qm = vq.quantize(model, (), kwargs, recipe=_recipe(preset), calibration=stats)
    plan = qm.plan
    if preset in FOLDED:
        assert sum(1 for lp in plan.layers.values() if lp.balance_folded_into) == 4, preset
    sites = ExportedTensors(capture(model, (), kwargs)).linear_sites()
    transforms = layer_transforms(sites, plan, stats)
    modules = dict(model.named_modules())
    gm, env = _program_values(qm, kwargs)

    compared = set()
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in OPS:
            continue
        name = _layer_of(node)
        lp = plan.layers[name]
        x = env[_source_input(node)]
        if lp.timestep_widths is not None:
            lp = lp.at_range(plan.range_of(float(kwargs[plan.timestep_input].reshape(-1)[0])))
        static = numerics.static_scale(stats.absmax(name), lp.act_bits) if lp.act_static else None
        eager = int_weight.EagerLinear(modules[name], lp, transforms.get(name), static)
        want = env[node]
        got = eager(modules[name], (x,), None)
        if node.target == torch.ops.viditq.qlinear.default:
            if eager.fp8:  # e4m3 codes compared bit for bit, as bytes
                xq_eager, _ = fp8.quantize_act_fp8(x, eager.vec, eager.rot)
                got_codes, xq_eager = env[node.args[0]].view(torch.uint8), xq_eager.view(torch.uint8)
            else:
                xq_eager, _ = numerics.quantize_act(x, eager.vec, eager.rot, eager.static, eager.act_bits)
                got_codes = env[node.args[0]]
            assert torch.equal(got_codes, xq_eager), f"{preset}: {name}: activation codes differ"
        scale = want.abs().max().item() or 1.0
        err = (got.float() - want.float()).abs().max().item() / scale
        assert err <= 1e-5, f"{preset}: layer {name}: eager reference differs from the program by {err:.2e}"
        compared.add(name)
    assert compared == {lp.name for lp in plan.quantized}, f"{preset}: layers not compared"
    assert compared, f"{preset}: quantizes nothing"
