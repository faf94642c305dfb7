"""The balance pass: folding is exact, one transform per producer, and every fallback is said."""

import pytest
import torch

from tests import zoo
from viditq_compile import Plan, Recipe
from viditq_compile.calibration.observe import calibrate
from viditq_compile.graph.capture import capture
from viditq_compile.graph.sites import ExportedTensors
from viditq_compile.numerics.quant import sqnr_db
from viditq_compile.passes.balance import BALANCE_OP, balance_linears
from viditq_compile.passes.select import select_linears

METHODS = {"smooth": "w8a8-smooth", "rotate": "w8a8-rotate", "smooth+rotate": "w8a8-viditq"}


def _balanced(model, kwargs, recipe, stats):
    ep = capture(model, (), kwargs)
    t = ExportedTensors(ep)
    sites = t.linear_sites()
    plan = select_linears(sites, Recipe.preset(recipe), stats)
    n = balance_linears(t, sites, plan, stats)
    return ep, plan, n


def _count(gm, target):
    return sum(node.op == "call_function" and node.target == target for node in gm.graph.nodes)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", ["pixart", pytest.param("flux", marks=pytest.mark.slow)])
def test_folding_is_exact_without_quantization(name, method):
    """x' W'^T = x W^T: a balanced program with quantization switched off is the FP model up to
    fp32 rounding, on models with outlier activations."""
    model, kwargs = zoo.ZOO[name]()
    if name == "pixart":
        model, kwargs = zoo.build_outlier_pixart()
    stats = calibrate(model, [((), kwargs)], progress=False)
    ep, plan, n = _balanced(model, kwargs, METHODS[method], stats)
    assert n > 0 and all(lp.balance == method for lp in plan.quantized)
    with torch.no_grad():
        ref = model(**kwargs)[0]
        out = ep.module()(**kwargs)[0]
    assert sqnr_db(ref, out) > 90  # fp32 rounding only (quantization would be < 60 dB)


def test_one_transform_per_producer_shared_by_its_consumers():
    model, kwargs = zoo.build_pixart()
    stats = calibrate(model, [((), kwargs)], progress=False)
    ep, plan, n = _balanced(model, kwargs, "w8a8-viditq", stats)
    # per block: q/k/v (one input), attn1.to_out, attn2.to_q, attn2.to_out, ff.net.0, ff.net.2;
    # plus one for attn2.to_k/to_v of both blocks, which all read the projected caption
    assert n == 2 * 6 + 1
    gm = ep.graph_module
    assert _count(gm, BALANCE_OP) == n
    users = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == BALANCE_OP:
            users[node.name] = [u.name for u in node.users]
    assert sorted(len(u) for u in users.values()) == [1] * 10 + [3] * 2 + [4]
    # the float weights the balancing replaced are gone; balanced ones took their place
    assert "transformer_blocks.0.attn1.to_q.weight" not in ep.state_dict
    assert "transformer_blocks.0.attn1.to_q.viditq_balanced_weight" in ep.state_dict


def test_without_statistics_smoothing_becomes_rotation_and_the_plan_says_so(caplog):
    model, kwargs = zoo.build_pixart()
    ep, plan, n = _balanced(model, kwargs, "w8a8-viditq", None)
    assert n == 13
    for lp in plan.quantized:
        assert lp.balance == "rotate" and "no calibration statistics" in lp.note
    assert "smoothing skipped" in caplog.text
    with torch.no_grad():
        assert sqnr_db(model(**kwargs)[0], ep.module()(**kwargs)[0]) > 90


def test_w8a8_preset_balances_only_with_calibration():
    model, kwargs = zoo.build_pixart()
    _, plan, n = _balanced(model, kwargs, "w8a8", None)
    assert n == 0 and all(lp.balance is None and lp.note is None for lp in plan.quantized)
    stats = calibrate(model, [((), kwargs)], progress=False)
    _, plan, n = _balanced(model, kwargs, "w8a8", stats)
    assert n == 13 and {lp.balance for lp in plan.quantized} == {"smooth+rotate"}


def test_a_width_without_hadamard_construction_stays_unrotated(caplog):
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(10, 32)  # 10 = 5 * 2: no Hadamard matrix of order 10
            self.fc2 = torch.nn.Linear(32, 8)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    model, x = Odd().eval(), torch.randn(4, 10)
    stats = calibrate(model, [((x,), {})], progress=False)
    ep = capture(model, (x,))
    t = ExportedTensors(ep)
    sites = t.linear_sites()
    plan = select_linears(sites, Recipe.preset("w8a8-viditq"), stats)
    assert plan.layers["fc1"].balance == "smooth"
    assert "no Hadamard construction for width 10" in plan.layers["fc1"].note
    assert plan.layers["fc2"].balance == "smooth+rotate" and plan.layers["fc2"].note is None
    assert "width 10" in caplog.text
    assert balance_linears(t, sites, plan, stats) == 2


def test_balanced_plan_round_trips_through_json(tmp_path):
    model, kwargs = zoo.build_pixart()
    stats = calibrate(model, [((), kwargs)], progress=False)
    _, plan, _ = _balanced(model, kwargs, "w4a8", stats)
    plan.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert again.layers == plan.layers
    lp = again.layers["transformer_blocks.0.attn1.to_q"]
    assert (lp.weight_bits, lp.weight_sym, lp.balance, lp.rotation_seed) == (4, False, "smooth+rotate", 0)
