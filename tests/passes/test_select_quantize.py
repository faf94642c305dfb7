"""The select and quantize passes on exported programs: exact rewrite counts, plans, refusals."""

import pytest
import torch

from viditq_compile import Plan, PlanError, Recipe
from viditq_compile.graph.capture import capture
from viditq_compile.graph.sites import ExportedTensors
from viditq_compile.passes.quantize import W8A8_OP, quantize_linears
from viditq_compile.passes.select import match_plan, select_linears


def _sites(model, args):
    t = ExportedTensors(capture(model, args))
    return t, t.linear_sites()


def _count(gm, target):
    return sum(n.op == "call_function" and n.target == target for n in gm.graph.nodes)


def test_sites_carry_module_paths_and_shapes(mlp_block):
    _, sites = _sites(*mlp_block)
    assert [(s.name, s.out_features, s.in_features) for s in sites] == [
        ("fc1", 256, 64), ("fc2", 64, 256), ("proj_out", 64, 64)]


def test_quantize_rewrites_exactly_the_selected_linears(mlp_block):
    t, sites = _sites(*mlp_block)
    plan = select_linears(sites, Recipe.preset("w8a8"))
    assert [lp.name for lp in plan.quantized] == ["fc1", "fc2"]
    assert plan.layers["proj_out"].reason == "kept by remain_fp_regex"
    assert quantize_linears(t, sites, plan) == 2
    gm = t.ep.graph_module
    assert _count(gm, W8A8_OP) == 2
    assert _count(gm, torch.ops.aten.linear.default) == 1
    # no float copy of a quantized weight stays in the program
    assert "fc1.weight" not in t.ep.state_dict and "fc2.weight" not in t.ep.state_dict
    assert t.ep.state_dict["fc1.viditq_w_q"].dtype == torch.int8
    assert "proj_out.weight" in t.ep.state_dict


def test_fp_recipe_rewrites_nothing(mlp_block):
    t, sites = _sites(*mlp_block)
    plan = select_linears(sites, Recipe.preset("fp"))
    assert plan.quantized == []
    assert quantize_linears(t, sites, plan) == 0
    assert _count(t.ep.graph_module, W8A8_OP) == 0


def test_a_weight_computed_in_the_graph_stays_fp_with_a_reason(caplog):
    class Computed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(32, 32))

        def forward(self, x):
            return torch.nn.functional.linear(x, self.w * 2)

    t, sites = _sites(Computed(), (torch.randn(4, 32),))
    plan = select_linears(sites, Recipe.preset("w8a8"))
    assert plan.quantized == []
    assert "not a model parameter" in next(iter(plan.layers.values())).reason
    # a fallback the recipe did not ask for is also said outside the report
    assert any("stays in floating point" in r.getMessage() and r.levelname == "WARNING"
               for r in caplog.records)


def test_a_shared_weight_is_quantized_once():
    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(32, 32)

        def forward(self, x):
            return self.fc(torch.relu(self.fc(x)))

    t, sites = _sites(Shared(), (torch.randn(4, 32),))
    plan = select_linears(sites, Recipe.preset("w8a8"))
    assert len(plan.layers) == 1
    assert quantize_linears(t, sites, plan) == 2
    assert sum(k.endswith("viditq_w_q") for k in t.ep.state_dict) == 1


def test_match_plan_refuses_layers_the_model_lacks_and_wrong_shapes(mlp_block):
    _, sites = _sites(*mlp_block)
    good = select_linears(sites, Recipe.preset("w8a8"))
    bad = Plan.from_dict(good.to_dict())
    bad.layers["fc9"] = bad.layers.pop("fc1").__class__("fc9", 64, 256, 8, 8)
    with pytest.raises(PlanError, match="fc9"):
        match_plan(sites, bad)
    wrong = Plan.from_dict(good.to_dict())
    wrong.layers["fc1"] = wrong.layers["fc1"].__class__("fc1", 65, 256, 8, 8)
    with pytest.raises(PlanError, match="fc1"):
        match_plan(sites, wrong)
    partial = Plan(recipe="mine", layers={"fc2": good.layers["fc2"]})
    matched = match_plan(sites, partial)
    assert [lp.name for lp in matched.quantized] == ["fc2"]
    assert matched.layers["fc1"].reason == "not in the plan"


def test_plan_json_round_trip_and_refusals(tmp_path, mlp_block):
    _, sites = _sites(*mlp_block)
    plan = select_linears(sites, Recipe.preset("w8a8"))
    plan.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert again.layers == plan.layers
    d = plan.to_dict()
    d["layers"][0]["weight_bits"] = 3
    with pytest.raises(PlanError, match="weight_bits=3"):
        Plan.from_dict(d)
    d = plan.to_dict()
    d["format"] = 99
    with pytest.raises(PlanError, match="format"):
        Plan.from_dict(d)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(tmp_path / "bad.json")


def test_output_dtype_comes_from_the_trace_and_is_never_guessed():
    from viditq_compile.graph.sites import LinearSite
    from viditq_compile.passes.quantize import output_dtype

    g = torch.fx.Graph()
    x = g.placeholder("x")
    w = g.placeholder("w")
    y = g.call_function(torch.ops.aten.linear.default, (x, w))
    site = LinearSite(y, "fc", x, w, None, torch.randn(4, 4), 4, 4)
    with pytest.raises(ValueError, match="'fc'.*no traced value"):
        output_dtype(site)
    x.meta["val"] = torch.empty(2, 4, dtype=torch.bfloat16)
    assert output_dtype(site) == torch.bfloat16  # not the fp32 weight's dtype
    y.meta["val"] = torch.empty(2, 4, dtype=torch.float16)
    assert output_dtype(site) == torch.float16


class _Wide(torch.nn.Module):
    """A small linear and one whose K is at (or past) the int32 accumulator bound; tiny N."""

    def __init__(self, k):
        super().__init__()
        self.fc = torch.nn.Linear(32, k)
        self.big = torch.nn.Linear(k, 2)

    def forward(self, x):
        return self.big(self.fc(x))


def test_a_layer_past_the_int32_accumulator_bound_stays_fp_and_the_report_says_why(caplog):
    from viditq_compile.numerics import quant as numerics

    bound = numerics.max_k_for_int32(8, 8, True)
    assert bound == 133144  # (2^31 - 1) // (127 * 127)
    t, sites = _sites(_Wide(140000), (torch.randn(1, 32),))
    plan = select_linears(sites, Recipe.preset("w8a8"))
    assert [lp.name for lp in plan.quantized] == ["fc"]
    reason = plan.layers["big"].reason
    assert reason.startswith("K=140000 exceeds the int32 accumulator bound 133144 for W8A8"), reason
    assert "K=140000 exceeds the int32 accumulator bound 133144" in plan.report
    assert any("big" in r.getMessage() and "int32" in r.getMessage() and r.levelname == "WARNING"
               for r in caplog.records)
    assert quantize_linears(t, sites, plan) == 1
    # asymmetric int4 weights allow a longer K (15 * 127 per product): the same layer quantizes
    plan4 = select_linears(sites, Recipe.preset("w4a8-dynamic"))
    assert plan4.layers["big"].quantized and numerics.max_k_for_int32(8, 4, False) == 1127288


def test_a_layer_at_exactly_the_bound_quantizes_and_its_worst_case_sum_is_exact():
    from viditq_compile.numerics import quant as numerics

    k = numerics.max_k_for_int32(8, 8, True)
    m = _Wide(k)
    with torch.no_grad():
        m.big.weight.fill_(0.5)  # every weight on q = 127
        m.big.bias.zero_()
    t, sites = _sites(m, (torch.randn(1, 32),))
    plan = select_linears(sites, Recipe.preset("w8a8"))
    assert plan.layers["big"].quantized and plan.layers["big"].in_features == k
    assert quantize_linears(t, sites, plan) == 2
    # a row of equal values quantizes to q = 127 everywhere: acc = K * 127 * 127 <= 2^31 - 1
    h = torch.full((1, k), 2.0)
    out = torch.ops.viditq.w8a8_linear(h, *[t.ep.state_dict[f"big.viditq_w_{n}"] for n in ("q", "scale")],
                                       None, None)
    assert k * 127 * 127 <= 2 ** 31 - 1 < (k + 1) * 127 * 127
    torch.testing.assert_close(out, torch.full((1, 2), 2.0 * 0.5 * k), rtol=1e-6, atol=0)
    t1, sites1 = _sites(_Wide(k + 1), (torch.randn(1, 32),))
    assert not select_linears(sites1, Recipe.preset("w8a8")).layers["big"].quantized


def test_a_plan_quantizing_a_layer_past_the_bound_is_refused_by_name():
    from dataclasses import replace

    t, sites = _sites(_Wide(140000), (torch.randn(1, 32),))
    plan = select_linears(sites, Recipe.preset("w8a8"))
    forced = Plan.from_dict(plan.to_dict())
    forced.layers["big"] = replace(plan.layers["fc"], name="big", in_features=140000, out_features=2)
    with pytest.raises(PlanError, match=r"plan quantizes 'big'.*K=140000 exceeds the int32 accumulator bound 133144"):
        match_plan(sites, forced)
    # the quantize pass refuses it too, before rewriting anything
    with pytest.raises(PlanError, match=r"'big'.*int32 accumulator bound"):
        quantize_linears(t, sites, forced)
    assert _count(t.ep.graph_module, W8A8_OP) == 0


def test_accumulator_bound_counts_the_group_and_every_timestep_range():
    from viditq_compile.config.plan import LayerPlan
    from viditq_compile.passes.select import accumulator_overflow

    assert accumulator_overflow(LayerPlan("a", 140000, 2, 8, 8, weight_group=128)) is None  # per-group GEMMs
    assert accumulator_overflow(LayerPlan("a", 140000, 2)) is None  # floating point
    ranged = LayerPlan("a", 70000, 2, 4, 8, weight_sym=False, timestep_widths=((4, 8, False), (8, 8, False)))
    assert accumulator_overflow(ranged) == ("K=70000 exceeds the int32 accumulator bound 66311 for W8A8, "
                                            "asymmetric weights (the integer GEMM would wrap)")
    assert "static activation scales" in accumulator_overflow(LayerPlan("a", 133000, 2, 8, 8, act_static=True))


def test_a_nan_weight_is_refused_naming_the_layer_and_the_value(mlp_block):
    m, args = mlp_block
    with torch.no_grad():
        m.fc2.weight[3, 17] = float("nan")
        m.fc2.weight[5, 1] = float("-inf")
    t, sites = _sites(m, args)
    plan = select_linears(sites, Recipe.preset("w8a8"))
    with pytest.raises(ValueError, match=r"layer 'fc2': weight contains NaN or Inf \(1 NaN and 1 -Inf value\(s\), "
                                         r"the first at index \[3, 17\]\)"):
        quantize_linears(t, sites, plan)


def test_a_nan_weight_of_a_balanced_layer_is_refused_before_the_rotation_spreads_it(mlp_block):
    from viditq_compile.passes.balance import balance_linears

    m, args = mlp_block
    with torch.no_grad():
        m.fc1.weight[0, 5] = float("inf")
    t, sites = _sites(m, args)
    plan = select_linears(sites, Recipe.preset("w8a8-rotate"))
    with pytest.raises(ValueError, match=r"layer 'fc1': weight contains NaN or Inf \(1 \+Inf value\(s\), "
                                         r"the first at index \[0, 5\]\)"):
        balance_linears(t, sites, plan)
