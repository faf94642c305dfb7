"""The ViDiT-Q recipe end to end: calibration -> balancing -> W4A8 / W8A8 on real model classes.

The outlier model is the diffusers PixArt class with a few hidden channels 10-100x larger than the
rest through the adaLN scale/shift table and a timestep-dependent modulation; calibration and
evaluation run over a short sampling trajectory with different latents and captions.
"""

import os

import pytest
import torch

import viditq_compile as vq
from tests import zoo
from viditq_compile.calibration.observe import calibrate
from viditq_compile.numerics.quant import sqnr_db
from viditq_compile.passes.quantize import QLINEAR_OP, QUANTIZE_ACT_OP, W8A8_OP

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "viditq_configs")


def _count(program, target):
    return sum(n.op == "call_function" and n.target == target for n in program.graph.nodes)


@pytest.fixture(scope="module")
def outlier():
    model, kwargs = zoo.build_outlier_pixart()
    stats = calibrate(model, zoo.trajectory_calls(kwargs, seed=100), progress=False)
    evals = zoo.trajectory_calls(kwargs, seed=200)
    with torch.no_grad():
        refs = [model(*a, **k)[0] for a, k in evals]
    return model, kwargs, stats, evals, refs


def _mean_sqnr(qm, evals, refs):
    with torch.no_grad():
        return sum(sqnr_db(r, qm(*a, **k)[0]) for (a, k), r in zip(evals, refs)) / len(refs)


@pytest.fixture(scope="module")
def ablation(outlier):
    model, kwargs, stats, evals, refs = outlier
    table = {}
    for wa in ("w8a8", "w4a8"):
        for variant in ("naive", "dynamic", "smooth", "rotate", "viditq"):
            qm = vq.quantize(model, (), kwargs, recipe=f"{wa}-{variant}", calibration=stats)
            table[wa, variant] = _mean_sqnr(qm, evals, refs)
    return table


@pytest.mark.slow  # the ablation fixture quantizes ten recipes (~90 s)
@pytest.mark.parametrize("wa", ["w8a8", "w4a8"])
def test_ablation_ordering_of_the_paper_holds(ablation, wa):
    """naive per-tensor < dynamic per-token < smooth-only and rotate-only < smooth + rotate."""
    t = {v: ablation[wa, v] for v in ("naive", "dynamic", "smooth", "rotate", "viditq")}
    assert t["naive"] < t["dynamic"], t
    assert t["dynamic"] < min(t["smooth"], t["rotate"]), t
    assert max(t["smooth"], t["rotate"]) < t["viditq"], t


@pytest.mark.slow
def test_balancing_makes_w4a8_usable(ablation):
    assert ablation["w4a8", "viditq"] >= ablation["w4a8", "dynamic"] + 3.0, ablation
    assert ablation["w8a8", "viditq"] >= 30.0, ablation


def test_w4a8_program_is_packed_and_each_input_is_quantized_once(outlier):
    model, kwargs, stats, _, _ = outlier
    qm = vq.quantize(model, (), kwargs, recipe="w4a8", calibration=stats)
    assert _count(qm.program, QLINEAR_OP) == len(zoo.QUANTIZE["pixart"]) == 20
    assert _count(qm.program, W8A8_OP) == 0
    # q/k/v share one input, attn2.to_k/to_v of both blocks read the same caption projection
    assert _count(qm.program, QUANTIZE_ACT_OP) == 2 * 6 + 1
    sd = qm.program.state_dict
    wq = sd["transformer_blocks.0.ff.net.0.proj.viditq_w_q"]
    assert wq.dtype == torch.uint8 and wq.shape == (512, 64)  # [N, K/2]: two int4 per byte
    fp32_bytes = sum(model.get_submodule(n).weight.numel() * 4 for n in zoo.QUANTIZE["pixart"])
    q_bytes = sum(t.numel() * t.element_size() for k, t in sd.items()
                  if ".viditq_w_" in k and k.rsplit(".viditq", 1)[0] in zoo.QUANTIZE["pixart"])
    assert q_bytes <= 0.15 * fp32_bytes
    report = str(qm.report)
    assert "smooth+rotate a=0.5" in report and "viditq.qlinear" in report


def test_balanced_w4a8_save_load_reproduces_outputs_exactly(outlier, tmp_path):
    model, kwargs, stats, evals, _ = outlier
    qm = vq.quantize(model, (), kwargs, recipe="w4a8", calibration=stats)
    qm.save(tmp_path / "w4a8")
    loaded = vq.load(tmp_path / "w4a8")
    with torch.no_grad():
        for a, k in evals[:2]:
            assert torch.equal(qm(*a, **k)[0], loaded(*a, **k)[0])
    assert loaded.plan.layers == qm.plan.layers


def test_saved_statistics_quantize_identically(outlier, tmp_path):
    model, kwargs, stats, evals, _ = outlier
    stats.save(tmp_path / "calib.safetensors")
    a = vq.quantize(model, (), kwargs, recipe="w8a8", calibration=stats)
    b = vq.quantize(model, (), kwargs, recipe="w8a8", calibration=str(tmp_path / "calib.safetensors"))
    with torch.no_grad():
        assert torch.equal(a(**evals[0][1])[0], b(**evals[0][1])[0])
    assert {lp.balance for lp in a.plan.quantized} == {"smooth+rotate"}


def test_a_sampler_callable_calibrates(outlier):
    model, kwargs, _, evals, refs = outlier

    def sampler(m):
        for a, k in zoo.trajectory_calls(kwargs, seed=100)[::2]:
            m(*a, **k)

    qm = vq.quantize(model, (), kwargs, recipe="w8a8", calibration=sampler)
    assert {lp.balance for lp in qm.plan.quantized} == {"smooth+rotate"}
    assert _mean_sqnr(qm, evals[:2], refs[:2]) > 25


def test_backend_takes_calibration_and_agrees_with_export(outlier):
    model, kwargs, stats, evals, _ = outlier
    qm = vq.quantize(model, (), kwargs, recipe="w4a8", calibration=stats)
    compiled = torch.compile(model, backend="viditq", options={"recipe": "w4a8", "calibration": stats})
    with torch.no_grad():
        a, k = evals[1]
        assert sqnr_db(qm(*a, **k)[0], compiled(*a, **k)[0]) > 30
    rep = vq.backend.last_report()
    assert rep.num_quantized == 20 and all(r.balance.startswith("smooth+rotate") for r in rep.rows if r.quantized)
    with pytest.raises(Exception, match="option .calibration. must be CalibrationStats"):
        torch.compile(model, backend="viditq", options={"calibration": [1, 2]})(**kwargs)


def test_reference_pixart_configs_apply_to_diffusers_pixart():
    model, kwargs = zoo.build_pixart()
    stats = calibrate(model, [((), kwargs)], progress=False)
    for cfg, fp_extra in (("pixart_config.yaml", set()),
                          ("pixart_w8a8.yaml", {f"transformer_blocks.{i}.attn2.to_{c}" for i in (0, 1) for c in "kv"})):
        qm = vq.quantize(model, (), kwargs, recipe=os.path.join(CONFIGS, cfg), calibration=stats)
        fp = {r.name for r in qm.report.rows if not r.quantized}
        assert fp == set(zoo.KEEP_FP["pixart"]) | fp_extra, cfg


@pytest.mark.slow
def test_reference_opensora_w8a8_config_balances_blocks_11_to_14():
    model, kwargs = zoo.build_stdit3_block(depth=15)
    stats = calibrate(model, [((), kwargs)], progress=False)
    qm = vq.quantize(model, (), kwargs, recipe=os.path.join(CONFIGS, "opensora_w8a8.yaml"), calibration=stats)
    balanced = {lp.name for lp in qm.plan.quantized if lp.balance}
    expect = {n for n in zoo.stdit3_quantize(15) if any(f"blocks.{i}." in n for i in (11, 12, 13, 14))}
    assert balanced == expect and len(expect) == 2 * 4 * 7
    assert {qm.plan.layers[n].alpha for n in balanced} == {0.75}
    assert {lp.name for lp in qm.plan.layers.values() if not lp.quantized} == set(zoo.stdit3_keep_fp())
    with torch.no_grad():
        assert sqnr_db(model(**kwargs)[0], qm(**kwargs)[0]) > 30


def test_a_saved_plan_reapplies_to_identical_outputs_and_needs_the_statistics(outlier, tmp_path):
    """The plan records method, alpha and rotation seed, and saves the statistics its smoothing
    needs next to itself: re-applied, with them given or loaded, it rebuilds the same program;
    without statistics it is refused, not silently unsmoothed."""
    model, kwargs, stats, evals, _ = outlier
    qm = vq.quantize(model, (), kwargs, recipe="w4a8", calibration=stats)
    qm.plan.save(tmp_path / "plan.json")
    assert (tmp_path / "plan.calibration.safetensors").exists()
    plan = vq.Plan.load(tmp_path / "plan.json")
    again = vq.quantize(model, (), kwargs, plan=plan, calibration=stats)
    loaded = vq.quantize(model, (), kwargs, plan=plan)  # the statistics saved with the plan
    with torch.no_grad():
        assert torch.equal(qm(**evals[0][1])[0], again(**evals[0][1])[0])
        assert torch.equal(qm(**evals[0][1])[0], loaded(**evals[0][1])[0])
    bare = vq.Plan.from_dict(qm.plan.to_dict())  # the JSON alone
    with pytest.raises(vq.PlanError, match="calibration"):
        vq.quantize(model, (), kwargs, plan=bare)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("latte", "flux") else n
                                  for n in sorted(zoo.ALL_BUILDERS)])
def test_balanced_w4a8_and_w8a8_on_every_model_class(name):
    """Every zoo model class (diffusers PixArt, DiT, Latte, Flux, and the STDiT3 stack) takes the
    ViDiT-Q recipe: every eligible linear becomes viditq.qlinear, balanced, and the output stays
    close to FP (these are seeded models without planted outliers)."""
    model, kwargs = zoo.ALL_BUILDERS[name]()
    stats = calibrate(model, [((), kwargs)], progress=False)
    with torch.no_grad():
        ref = model(**kwargs)[0]
    for recipe, floor in (("w8a8-viditq", 35.0), ("w4a8", 12.0)):
        qm = vq.quantize(model, (), kwargs, recipe=recipe, calibration=stats)
        assert {lp.name for lp in qm.plan.quantized} == set(zoo.QUANTIZE[name])
        assert all(lp.balance == "smooth+rotate" for lp in qm.plan.quantized)
        assert _count(qm.program, QLINEAR_OP) >= len(zoo.QUANTIZE[name])
        with torch.no_grad():
            assert sqnr_db(ref, qm(**kwargs)[0]) > floor, (name, recipe)


def test_reference_pixart_mixed_precision_config_applies_per_layer_widths():
    """pixart_w4a8_mixed_precision.yaml: W4A8 by default, block 0 and every MLP at W8
    (`blocks\\.0|ff|blocks\\.27`), embedders/adaLN/caption/output FP, ViDiT-Q (alpha 0.99) on
    attn|ff."""
    model, kwargs = zoo.build_pixart()
    stats = calibrate(model, [((), kwargs)], progress=False)
    qm = vq.quantize(model, (), kwargs, recipe=os.path.join(CONFIGS, "pixart_w4a8_mixed_precision.yaml"),
                     calibration=stats)
    bits = {lp.name: (lp.weight_bits, lp.act_bits) for lp in qm.plan.quantized}
    assert set(bits) == set(zoo.QUANTIZE["pixart"])
    for name, wa in bits.items():
        assert wa == ((8, 8) if "blocks.0." in name or ".ff." in name else (4, 8)), name
    assert {lp.alpha for lp in qm.plan.quantized} == {0.99}
    with torch.no_grad():
        assert sqnr_db(model(**kwargs)[0], qm(**kwargs)[0]) > 20


@pytest.mark.slow
def test_reference_opensora_mixed_precision_config_runs_w4a4_layers():
    """opensora_w4a8_mixed_precision.yaml as written: cross-attention FP, blocks 11-14 at W4A4
    except their MLPs (the later 'mlp' entry gives W8A8), everything else W8A8."""
    model, kwargs = zoo.build_stdit3_block(depth=15)
    stats = calibrate(model, [((), kwargs)], progress=False)
    qm = vq.quantize(model, (), kwargs, recipe=os.path.join(CONFIGS, "opensora_w4a8_mixed_precision.yaml"),
                     calibration=stats)
    layers = qm.plan.layers
    assert all(not layers[n].quantized for n in layers if "cross_attn" in n)
    for n in zoo.stdit3_quantize(15):
        if "cross_attn" in n:
            continue
        late = any(f"blocks.{i}." in n for i in (11, 12, 13, 14))
        expect = (4, 4) if late and ".mlp." not in n else (8, 8)
        assert (layers[n].weight_bits, layers[n].act_bits) == expect, n
    assert sum(layers[n].act_bits == 4 for n in layers if layers[n].quantized) == 2 * 4 * 2
    with torch.no_grad():
        assert sqnr_db(model(**kwargs)[0], qm(**kwargs)[0]) > 15
