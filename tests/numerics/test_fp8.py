"""The e4m3 numerics (``numerics.fp8``): the grid, the GEMM's stated tolerance, the refusals, and
the route through plans, programs and artifacts (W8A8 on e4m3, balancing unchanged)."""

import pytest
import torch

import viditq_compile as vq
from viditq_compile.config.plan import LayerPlan, PlanError
from viditq_compile.config.recipe import Recipe, RecipeError
from viditq_compile.numerics import fp8
from viditq_compile.numerics.quant import sqnr_db


def test_per_token_codes_are_e4m3_of_x_over_scale_and_the_row_max_hits_448():
    x = torch.randn(4, 7, 64) * torch.logspace(-3, 3, 64)
    q, scale = fp8.quantize_per_token_fp8(x)
    assert q.dtype == fp8.E4M3 and scale.shape == (4, 7, 1)
    assert torch.equal(q.float().abs().amax(-1, keepdim=True), torch.full_like(scale, 448.0))
    assert torch.equal(q.view(torch.uint8), (x / scale).to(fp8.E4M3).view(torch.uint8))
    assert sqnr_db(x, q.float() * scale) > 28  # 3 mantissa bits, whatever the channel's range


def test_weight_scales_are_per_channel_and_nonfinite_weights_are_refused():
    w = torch.randn(16, 32)
    qw = fp8.quantize_weight_fp8(w)
    assert qw.scale.shape == (16,) and qw.zero is None
    assert torch.allclose(qw.scale, w.abs().amax(-1) / 448)
    w[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fp8.quantize_weight_fp8(w)


def test_the_fp32_gemm_is_within_its_stated_bound_of_the_exact_one():
    g = torch.Generator().manual_seed(0)
    xq, _ = fp8.quantize_per_token_fp8(torch.randn(64, 1152, generator=g))
    wq = fp8.quantize_weight_fp8(torch.randn(96, 1152, generator=g)).q
    exact = fp8.fp8_gemm_ref(xq, wq).double()
    err = (fp8.fp8_gemm_fast(xq, wq).double() - exact).abs()
    assert bool((err <= fp8.gemm_bound(xq, wq)).all())
    assert err.max() > 0  # fp32 summation does round: the bound is not vacuous here


def test_an_fp8_layer_must_be_w8a8_symmetric_per_channel_dynamic():
    ok = LayerPlan("l", 64, 64, weight_bits=8, act_bits=8, number_format="fp8_e4m3")
    ok.validate()
    for bad, says in ((dict(weight_bits=4, weight_sym=False), "W8A8"), (dict(weight_group=32), "weight_group"),
                      (dict(act_static=True), "act_static")):
        with pytest.raises(PlanError, match=says):
            LayerPlan("l", 64, 64, **{**dict(weight_bits=8, act_bits=8, number_format="fp8_e4m3"), **bad}).validate()
    with pytest.raises(PlanError, match="number_format"):
        LayerPlan("l", 64, 64, weight_bits=8, act_bits=8, number_format="fp4").validate()


def test_recipes_refuse_fp8_with_what_it_cannot_take():
    with pytest.raises(RecipeError, match="number_format"):
        Recipe.from_dict({"weight": {"n_bits": [8]}, "act": {"n_bits": [8]}, "number_format": "e5m2"})
    r = Recipe.from_dict({"weight": {"n_bits": [4]}, "act": {"n_bits": [8]}, "number_format": "fp8_e4m3"})
    with pytest.raises(RecipeError, match="needs weight.n_bits: 8"):
        r.check_supported()


@pytest.mark.parametrize("recipe", ["w8a8-fp8", "w8a8-fp8-viditq"])
def test_fp8_programs_run_save_load_bit_exact_and_report_e4m3(recipe, tmp_path):
    from tests.conftest import ModulatedMLP

    torch.manual_seed(0)
    m = ModulatedMLP().eval()
    args = (torch.randn(2, 16, 64), torch.randn(2, 64))
    qm = vq.quantize(m, args, recipe=recipe)
    rows = {r.name: r for r in qm.report.rows}
    assert rows["fc1"].widths() == ("e4m3", "e4m3") and "quantize_act_fp8" in qm.program.graph_module.code
    assert "e4m3 Triton GEMM on sm_89+, reference elsewhere" in rows["fc1"].note
    assert "on CUDA the reference GEMM runs" not in rows["fc1"].note
    with torch.no_grad():
        out = qm(*args)
        assert sqnr_db(m(*args), out) > 25
        qm.save(tmp_path / "a")
        assert torch.equal(vq.load(tmp_path / "a")(*args), out)
        compiled = vq.compile(m, recipe=recipe)(*args)
    assert sqnr_db(out, compiled) > 60
