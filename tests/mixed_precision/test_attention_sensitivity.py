"""``mixed_precision.sensitivity.measure_attention_sensitivity``: each attention's damage when it
alone runs as int8 quantized attention, scored by its role's metric, per timestep range."""

import numpy as np
import pytest

from tests.zoo import TRAJECTORY, build_outlier_pixart, trajectory_calls
from viditq_compile.mixed_precision import metrics
from viditq_compile.mixed_precision.sensitivity import measure_attention_sensitivity, run_calls
from viditq_compile.numerics.quant import noise_to_signal

SELF = {"transformer_blocks.0.attn1": "self_attn", "transformer_blocks.1.attn1": "self_attn"}


@pytest.fixture(scope="module")
def model_calls():
    model, kwargs = build_outlier_pixart()
    model.eval()
    calls = trajectory_calls(kwargs, seed=3)
    return model, calls


def test_damage_per_attention_and_range(model_calls):
    model, calls = model_calls
    ranges = [0 if i < len(calls) // 2 else 1 for i in range(len(calls))]
    refs = run_calls(model, calls)
    got = measure_attention_sensitivity(model, calls, ranges, SELF, {"self_attn": metrics.output_error}, 2,
                                        reference=refs)
    assert set(got) == set(SELF)
    for name, d in got.items():
        assert d.shape == (2,) and np.all(d > 0) and np.all(d < 1e-1), (name, d)
    # the mean over all calls equals the calls' damages averaged by range
    one = measure_attention_sensitivity(model, calls, [0] * len(calls), SELF, {"self_attn": metrics.output_error},
                                        reference=refs)
    n0 = ranges.count(0)
    for name in SELF:
        mean = (got[name][0] * n0 + got[name][1] * (len(calls) - n0)) / len(calls)
        assert one[name][0] == pytest.approx(mean, rel=1e-9)
    assert len(TRAJECTORY) == len(calls)


def test_a_masked_cross_attention_is_refused(model_calls):
    model, calls = model_calls
    with pytest.raises(ValueError, match="attn2.*refused"):
        measure_attention_sensitivity(model, calls[:1], [0], {"transformer_blocks.0.attn2": "cross_attn"},
                                      {"cross_attn": noise_to_signal})
    with pytest.raises(ValueError, match="range"):
        measure_attention_sensitivity(model, calls[:2], [0, 2], SELF, {"self_attn": noise_to_signal}, 2)


def _recipe(min_db):
    import dataclasses

    from viditq_compile.config.recipe import PRESETS, AttentionRule

    return dataclasses.replace(PRESETS["w4a8"], name="w4a8+attn",
                               attention=AttentionRule(self_attn="int8", search_min_db=min_db))


@pytest.mark.parametrize("min_db", [None, 0.0, 200.0])
def test_the_search_scores_attentions_and_keeps_those_below_its_floor(model_calls, min_db):
    """``search`` with an int8 attention rule: every int8 self-attention is scored alone like a
    layer at a width and reported; with ``attention.search_min_db`` those below it stay SDPA, in the
    plan (``attention.kept``) and in the program built from it."""
    import viditq_compile as vq
    from viditq_compile.ops.schema import ATTENTION

    model, calls = model_calls
    from viditq_compile.mixed_precision.search import search_program

    plan, qm = search_program(model, calls[:2], vq.Budget(weight_bits=8), group="module",
                                 recipe=_recipe(min_db))
    rec = plan.search["attention"]
    assert set(rec) == set(SELF)
    for a in rec.values():
        assert a["kind"] == "self_attn" and a["metric"] == "output" and 0 < a["db"] < 200
    expect_kept = min_db == 200.0
    assert all(a["format"] == ("fp" if expect_kept else "int8") for a in rec.values())
    kept = plan.attention.get("kept", {})
    assert (set(SELF) <= set(kept)) == expect_kept
    if expect_kept:
        assert all("below attention.search_min_db 200" in kept[n] for n in SELF)
    ops = [n for n in qm.program.graph_module.graph.nodes if ATTENTION.calls(n)]
    assert len(ops) == (0 if expect_kept else len(SELF))
    text = plan.report
    assert "attention transformer_blocks.0.attn1 (self_attn, output metric)" in text
    # the plan file carries the floor and the keeps; loading it rebuilds the same attentions
    assert vq.Plan.from_dict(plan.to_dict()).attention == plan.attention
