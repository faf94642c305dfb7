"""The fold step: an out projection's balancing moves into its value projection, exactly in floating
point; what cannot fold stays balanced at run time with the reason in the plan."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import viditq_compile as vq
from tests.graph.test_head_layout import Attention, D, H, N
from viditq_compile.config.plan import Plan, PlanError
from viditq_compile.config.recipe import PRESETS, Recipe, RecipeError
from viditq_compile.graph.capture import capture
from viditq_compile.graph.sites import ExportedTensors
from viditq_compile.methods.balance import EagerFolded, layer_transforms
from viditq_compile.passes.select import select_linears


def _setup(model, preset):
    model.eval()
    torch.manual_seed(1)
    x = torch.randn(2, N, H * D)
    x[..., 3] *= 20  # an outlier channel, for the smoothing to have something to move
    stats = vq.calibrate(model, [((x,), {})], progress=False)
    sites = ExportedTensors(capture(model, (x,), {})).linear_sites()
    recipe = dataclasses.replace(PRESETS[preset], fold_balance=True)
    return x, stats, sites, select_linears(sites, recipe, stats)


@pytest.mark.parametrize("layout,preset", [("major", "w8a8-viditq"), ("major", "w8a8-rotate"),
                                           ("minor", "w8a8-smooth"), ("mixed", "w8a8-smooth")])
def test_folded_pair_computes_the_float_model_exactly(layout, preset):
    model = Attention(*{"major": ("major", "major"), "minor": ("minor", "minor"),
                        "mixed": ("minor", "major")}[layout])
    x, stats, sites, plan = _setup(model, preset)
    assert plan.layers["to_out"].balance_folded_into == "to_v"
    transforms = layer_transforms(sites, plan, stats)
    assert not transforms["to_out"].balances_input and transforms["to_v"].partner == "to_out"
    with torch.no_grad():
        want = model(x)
        hooks = [getattr(model, n).register_forward_hook(EagerFolded(getattr(model, n), n, transforms[n]))
                 for n in ("to_v", "to_out")]
        got = model(x)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_rotation_folds_one_block_per_head():
    _, _, _, plan = _setup(Attention(), "w8a8-viditq")
    lp = plan.layers["to_out"]
    assert (lp.balance, lp.rotation_blocks, lp.balance_folded_into) == ("smooth+rotate", H, "to_v")
    # no other layer folds: q / k / v read no attention
    assert [n for n, p in plan.layers.items() if p.balance_folded_into] == ["to_out"]


def test_a_rotation_over_non_contiguous_heads_is_not_folded_and_says_why():
    _, _, _, plan = _setup(Attention("minor", "minor"), "w8a8-rotate")
    lp = plan.layers["to_out"]
    assert lp.balance_folded_into is None and lp.rotation_blocks is None
    assert "not folded" in lp.note and "not contiguous" in lp.note


def test_a_residual_read_of_the_attention_output_keeps_the_runtime_balancing():
    _, _, _, plan = _setup(Attention(out_op="residual"), "w8a8-viditq")
    lp = plan.layers["to_out"]
    assert lp.balance_folded_into is None and "read by 2 ops" in lp.note


def test_the_program_balances_no_out_projection_input_and_matches_the_eager_pair():
    model = Attention()
    x, stats, _, _ = _setup(model, "w8a8-viditq")
    recipe = dataclasses.replace(PRESETS["w8a8-viditq"], fold_balance=True)
    folded = vq.quantize(model, (x,), recipe=recipe, calibration=stats)
    unfolded = vq.quantize(model, (x,), recipe="w8a8-viditq", calibration=stats)
    quant = [n for n in folded.module.graph.nodes if n.target == torch.ops.viditq.quantize_act.default]
    # q / k / v share one balanced quantization; the out projection's has no smoothing, no rotation
    assert len(quant) == 2
    assert sum(1 for n in quant if n.args[1] is None and not n.args[2]) == 1
    assert "balancing folded into to_v" in str(folded.report)
    with torch.no_grad():
        want = model(x)
        sqnr = [10 * torch.log10(want.pow(2).mean() / (m(x) - want).pow(2).mean()).item()
                for m in (folded, unfolded)]
    assert sqnr[0] > 30 and abs(sqnr[0] - sqnr[1]) < 6, sqnr


def test_the_plan_round_trips_and_rejects_broken_folds():
    _, _, _, plan = _setup(Attention(), "w8a8-viditq")
    plan.calibration = None
    again = Plan.loads(json.dumps(plan.to_dict()), "test")
    assert again.layers["to_out"] == plan.layers["to_out"]
    layers = dict(plan.layers)
    bad = [(dataclasses.replace(layers["to_out"], balance_folded_into="to_out"), "another layer"),
           (dataclasses.replace(layers["to_out"], rotation_blocks=None), "one block per head"),
           (dataclasses.replace(layers["to_out"], balance_folded_into="nope"), "not a quantized layer")]
    for lp, msg in bad:
        with pytest.raises(PlanError, match=msg):
            dataclasses.replace(plan, layers={**layers, "to_out": lp}).validate()
    two = {**layers, "to_k": dataclasses.replace(layers["to_k"], balance_folded_into="to_v", rotation_blocks=H)}
    with pytest.raises(PlanError, match="both fold"):
        dataclasses.replace(plan, layers=two).validate()


def test_fold_balance_must_be_a_bool():
    with pytest.raises(RecipeError, match="fold_balance"):
        Recipe(name="x", fold_balance="yes")  # type: ignore[arg-type]


def test_the_search_scores_one_layer_of_a_pair_beside_its_folded_float_partner():
    from viditq_compile.mixed_precision.sensitivity import install_hooks

    model = Attention()
    x, stats, sites, plan = _setup(model, "w8a8-viditq")
    transforms = layer_transforms(sites, plan, stats)

    def sqnr(widths):
        handles = install_hooks(model, widths, plan, transforms, stats)
        try:
            with torch.no_grad():
                got = model(x)
        finally:
            for h in handles:
                h.remove()
        return 10 * torch.log10(want.pow(2).mean() / (got - want).pow(2).mean()).item()

    with torch.no_grad():
        want = model(x)
    # either layer quantized alone: its partner computes the fold in floating point
    assert sqnr({"to_out": (8, 8)}) > 35 and sqnr({"to_v": (8, 8)}) > 35
    handles = install_hooks(model, {"to_out": (8, 8)}, plan, transforms, stats)
    for h in handles:
        h.remove()
    assert len(handles) == 2


def test_the_backend_still_gives_q_k_and_the_folded_v_one_gemm():
    from viditq_compile import backend

    model = Attention()
    x, stats, _, _ = _setup(model, "w8a8-viditq")
    recipe = dataclasses.replace(PRESETS["w8a8-viditq"], fold_balance=True)
    compiled = torch.compile(model, backend="viditq", options={"recipe": recipe, "calibration": stats})
    with torch.no_grad():
        got, want = compiled(x), model(x)
    report = backend.last_report()
    assert [sorted(g) for g in report.shared_gemms] == [["to_k", "to_q", "to_v"]]
    assert "1 out projection(s) with their balancing folded" in report.summary()
    assert 10 * torch.log10(want.pow(2).mean() / (got - want).pow(2).mean()) > 30
