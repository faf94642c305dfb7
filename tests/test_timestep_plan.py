"""Timestep-aware plans end to end: eager (exported), saved/loaded and compiled programs that
switch layer widths at the plan's timestep boundaries, from one graph, without recompiling.

The fast tests use a tiny adaLN-modulated block; the PixArt ones (diffusers class, zoo) are
marked slow.
"""

import dataclasses

import pytest
import torch
from torch import nn

import viditq_compile as vq
from tests import zoo
from viditq_compile.backend import REPORTS
from viditq_compile.passes.quantize import QLINEAR_OP, QLINEAR_TIMESTEP_OP
from viditq_demo.demo_model import timestep_features

BOUNDS = (500.0,)
WIDTHS = ((4, 8, False), (8, 8, True))  # W4A8 asymmetric at t <= 500, W8A8 above


class TinyDiT(nn.Module):
    """adaLN-modulated block: a kept-FP timestep embedder, one attention-like projection and an
    MLP reading the same modulated input, a kept-FP output projection."""

    def __init__(self, d: int = 64, freq: int = 32):
        super().__init__()
        self.freq = freq
        self.t_embedder = nn.Linear(freq, 2 * d)
        self.norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.to_v = nn.Linear(d, d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.proj_out = nn.Linear(d, d)

    def forward(self, hidden_states, timestep):
        t = torch.as_tensor(timestep, dtype=torch.float32).expand(hidden_states.shape[0])
        shift, scale = self.t_embedder(timestep_features(t, self.freq)).chunk(2, dim=-1)
        h = self.norm(hidden_states) * (1 + scale[:, None]) + shift[:, None]
        h = hidden_states + self.to_v(h) + self.fc2(nn.functional.gelu(self.fc1(h)))
        return self.proj_out(h)


def _tiny_calls(n: int, seed: int, timesteps=None):
    g = torch.Generator().manual_seed(seed)
    ts = timesteps if timesteps is not None else torch.linspace(999, 0, n).round().long().tolist()
    return [((), {"hidden_states": torch.randn(2, 16, 64, generator=g),
                  "timestep": torch.full((2,), int(t))}) for t in ts]


def timestep_plan(base: vq.Plan, names, widths=WIDTHS, bounds=BOUNDS) -> vq.Plan:
    """``base`` with ``names`` switching widths per timestep range."""
    layers = dict(base.layers)
    for n in names:
        layers[n] = dataclasses.replace(layers[n], timestep_widths=widths)
    plan = dataclasses.replace(base, layers=layers, timestep_bounds=bounds, timestep_input="timestep")
    plan.validate()
    return plan


def static_plan(plan: vq.Plan, i: int) -> vq.Plan:
    """The static plan of timestep range ``i`` (``lp.at_range(i)`` for every layer)."""
    return dataclasses.replace(plan, layers={k: v.at_range(i) for k, v in plan.layers.items()},
                               timestep_bounds=(), timestep_input=None)


def _count(program, target):
    return sum(n.op == "call_function" and n.target == target for n in program.graph.nodes)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = TinyDiT().eval()
    calls = _tiny_calls(6, seed=1)
    stats = vq.calibrate(model, calls, progress=False)
    kwargs = calls[0][1]
    base = vq.quantize(model, (), kwargs, recipe="w4a8", calibration=stats).plan
    plan = timestep_plan(base, ["fc1", "fc2"])
    qm = vq.quantize(model, (), kwargs, plan=plan, calibration=stats)
    statics = [vq.quantize(model, (), kwargs, plan=static_plan(plan, i), calibration=stats) for i in range(2)]
    return model, kwargs, stats, plan, qm, statics


def test_tiny_program_dispatches_fc1_fc2_and_keeps_to_v_static(tiny):
    _, _, _, plan, qm, _ = tiny
    assert {lp.balance for lp in plan.quantized} == {"smooth+rotate"}
    assert _count(qm.program, QLINEAR_TIMESTEP_OP) == 2
    assert _count(qm.program, QLINEAR_OP) == 1  # to_v
    sd = qm.program.state_dict
    assert sd["fc1.viditq_w_q"].dtype == torch.uint8 and sd["fc1.viditq_w_q_r1"].dtype == torch.int8
    assert "fc1.viditq_w_zero" in sd and "fc1.viditq_w_zero_r1" not in sd  # range 1 is symmetric
    assert not any(k.endswith("_r1") for k in sd if k.startswith("to_v."))


@pytest.mark.parametrize("t", [0, 499, 500, 501, 999])
def test_tiny_each_range_equals_the_static_plan_of_that_range(tiny, t):
    model, kwargs, _, plan, qm, statics = tiny
    kw = dict(kwargs, timestep=torch.full((2,), t))
    i = plan.range_of(t)
    with torch.no_grad():
        out = qm(**kw)
        assert torch.equal(out, statics[i](**kw))
        assert not torch.equal(out, statics[1 - i](**kw))
        # float timesteps route the same way (the program keeps its traced int64 input dtype)
        assert torch.equal(qm(**dict(kw, timestep=torch.full((2,), float(t)).long())), out)


def test_tiny_mixed_batch_runs_each_sample_in_its_range(tiny):
    _, kwargs, _, _, qm, statics = tiny
    kw = dict(kwargs, timestep=torch.tensor([999, 20]))
    with torch.no_grad():
        out = qm(**kw)
        torch.testing.assert_close(out[0], statics[1](**kw)[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out[1], statics[0](**kw)[1], rtol=1e-6, atol=1e-6)


def test_tiny_save_load_gives_identical_outputs(tiny, tmp_path):
    _, kwargs, _, plan, qm, _ = tiny
    qm.save(tmp_path / "ts")
    loaded = vq.load(tmp_path / "ts")
    assert loaded.plan.layers == plan.layers and loaded.plan.timestep_bounds == BOUNDS
    assert _count(loaded.program, QLINEAR_TIMESTEP_OP) == 2
    with torch.no_grad():
        for t in ([10, 10], [900, 900], [10, 900]):
            kw = dict(kwargs, timestep=torch.tensor(t))
            assert torch.equal(loaded(**kw), qm(**kw)), t


def test_tiny_loaded_program_compiles_once_for_every_timestep(tiny, tmp_path):
    """``QuantizedModel.compile`` of a loaded program: the op stays one opaque call, so a
    sampling loop across the boundary runs one graph (outputs within fused-fp32 rounding)."""
    from torch._dynamo.utils import counters

    _, _, _, _, qm, _ = tiny
    qm.save(tmp_path / "ts")
    loaded = vq.load(tmp_path / "ts")
    compiled = loaded.compile()
    counters.clear()
    with torch.no_grad():
        for _, kw in _tiny_calls(6, seed=3):
            assert _rel(compiled(**kw), qm(**kw)) < 1e-5
    assert counters["stats"]["unique_graphs"] == 1


def test_load_refuses_a_timestep_plan_whose_program_lacks_a_version(tiny, tmp_path):
    from viditq_compile.io.artifact import ArtifactError
    from viditq_compile.program import QuantizedModel

    _, _, _, plan, _, statics = tiny
    QuantizedModel(statics[0].program, plan).save(tmp_path / "bad")
    with pytest.raises(ArtifactError, match="'fc1'.*per range .*, the program runs"):
        vq.load(tmp_path / "bad")


def test_tiny_compiled_sampling_loop_never_recompiles_and_switches_at_the_boundary(tiny):
    """Eight steps from t=999 to 0 through the viditq backend: one graph, compiled once; each
    step's output is the static plan of its range (within the fp32 rounding of the fused
    LayerNorm/modulation around the opaque op), and far from the other range's."""
    from torch._dynamo.utils import counters

    model, kwargs, stats, plan, _, statics = tiny
    compiled = torch.compile(model, backend="viditq", options={"plan": plan, "calibration": stats})
    steps = _tiny_calls(8, seed=2)
    counters.clear()
    with torch.no_grad():
        compiled(*steps[0][0], **steps[0][1])  # warm-up
        graphs, report = counters["stats"]["unique_graphs"], REPORTS[-1]
        assert graphs == 1 and report.num_multi_version == 2
        for (_, kw) in steps:
            t = int(kw["timestep"][0])
            out = compiled(**kw)
            i = plan.range_of(t)
            assert _rel(out, statics[i](**kw)) < 1e-4, t
            assert _rel(out, statics[1 - i](**kw)) > 1e-3, t
    assert counters["stats"]["unique_graphs"] == graphs and REPORTS[-1] is report
    assert {plan.range_of(int(kw["timestep"][0])) for _, kw in steps} == {0, 1}


def test_a_plan_on_an_input_the_model_lacks_is_refused(tiny):
    model, kwargs, stats, plan, _, _ = tiny
    bad = dataclasses.replace(plan, timestep_input="sigma")
    with pytest.raises(vq.PlanError, match=r"'sigma'.*its inputs: \['hidden_states', 'timestep'\]"):
        vq.quantize(model, (), kwargs, plan=bad, calibration=stats)
    with pytest.raises(Exception, match=r"'sigma'.*no tensor input of that name"):
        torch.compile(model, backend="viditq", options={"plan": bad, "calibration": stats})(**kwargs)


def test_a_python_number_timestep_is_refused_with_the_reason(tiny):
    model, kwargs, stats, plan, _, _ = tiny
    kw = dict(kwargs, timestep=700)
    with pytest.raises(vq.PlanError, match=r"'timestep'.*ConstantArgument.*tensor timestep"):
        vq.quantize(model, (), kw, plan=plan, calibration=stats)
    with pytest.raises(Exception, match=r"'timestep'.*specializes a Python-number timestep"):
        torch.compile(model, backend="viditq", options={"plan": plan, "calibration": stats})(**kw)


def test_report_shows_widths_per_range_and_the_extra_weight_memory(tiny):
    _, _, _, plan, qm, statics = tiny
    rep = qm.report
    rows = {r.name: r for r in rep.rows}
    assert rows["fc1"].widths() == ("4|8", "8|8") and rows["fc1"].op == "viditq.qlinear_timestep"
    assert rows["to_v"].widths() == ("4", "8") and rows["to_v"].op == "viditq.qlinear"
    assert rows["proj_out"].widths() == ("fp", "fp")
    assert "asymmetric weights in range(s) 0" in rows["fc1"].note
    # the extra version is the int8 one: N*K bytes + fp32 scales, no zero points
    expect = sum(plan.layers[n].out_features * plan.layers[n].in_features + 4 * plan.layers[n].out_features
                 for n in ("fc1", "fc2"))
    assert rep.num_multi_version == 2 and rep.extra_weight_bytes == expect
    stored = sum(t.numel() * t.element_size() for k, t in qm.program.state_dict.items() if k.endswith("_r1"))
    assert stored == expect == qm.weight_bytes - statics[0].weight_bytes
    text = str(rep)
    assert "4|8" in text and "8|8" in text and "viditq.qlinear_timestep" in text
    assert f"2 layer(s) keep more than one weight version: {expect} extra bytes (0.02 MiB)" in text
    assert "(t <= 500 | t > 500)" in text
    assert "weight version" not in str(statics[0].report)  # static plans: summary as before
    # fc1 (K=64, below the recipe's group 128: per channel) as packed int4 with zero points
    assert plan.layers["fc1"].weight_bytes(4, False) == 128 * 64 // 2 + (4 + 4) * 128


# --------------------------------------------------------------------------------------------
# PixArt (diffusers), slow: each quantize of it takes seconds on a 2-core CPU
# --------------------------------------------------------------------------------------------

PIXART_TS_LAYERS = [f"transformer_blocks.0.attn1.{n}" for n in ("to_q", "to_k", "to_v", "to_out.0")] + \
    ["transformer_blocks.1.ff.net.0.proj", "transformer_blocks.1.ff.net.2"]


@pytest.fixture(scope="module")
def pixart():
    model, kwargs = zoo.build_pixart()
    stats = vq.calibrate(model, zoo.trajectory_calls(kwargs, seed=100), progress=False)
    base = vq.quantize(model, (), kwargs, recipe="w4a8", calibration=stats).plan
    plan = timestep_plan(base, PIXART_TS_LAYERS)
    plan.calibration = stats  # used when quantize gets no calibration=
    qm = vq.quantize(model, (), kwargs, plan=plan)
    statics = [vq.quantize(model, (), kwargs, plan=static_plan(plan, i), calibration=stats) for i in range(2)]
    return model, kwargs, stats, plan, qm, statics


@pytest.mark.slow
def test_pixart_each_range_equals_its_static_plan_and_round_trips(pixart, tmp_path):
    model, kwargs, _, plan, qm, statics = pixart
    assert _count(qm.program, QLINEAR_TIMESTEP_OP) == len(PIXART_TS_LAYERS)
    calls = zoo.trajectory_calls(kwargs, seed=200, timesteps=(999, 501, 500, 20))
    qm.save(tmp_path / "pixart")
    loaded = vq.load(tmp_path / "pixart")
    with torch.no_grad():
        for _, kw in calls:
            t = int(kw["timestep"][0])
            out = qm(**kw)[0]
            assert torch.equal(out, statics[plan.range_of(t)](**kw)[0]), t
            assert not torch.equal(out, statics[1 - plan.range_of(t)](**kw)[0]), t
            assert torch.equal(loaded(**kw)[0], out), t
        kw = dict(calls[0][1], timestep=torch.tensor([999, 20]))  # CFG-like mixed batch
        out = qm(**kw)[0]
        torch.testing.assert_close(out[0], statics[1](**kw)[0][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out[1], statics[0](**kw)[0][1], rtol=1e-6, atol=1e-6)
    text = str(loaded.report)
    assert "6 layer(s) keep more than one weight version" in text


@pytest.mark.slow
def test_pixart_compiled_20_step_loop_compiles_one_graph(pixart):
    """A 20-step sampling loop as diffusers runs it (``t.expand(batch)`` of a scheduler tensor)
    through the viditq backend: one graph for all steps, the version switching at t=500."""
    from torch._dynamo.utils import counters

    model, kwargs, stats, plan, _, statics = pixart
    compiled = torch.compile(model, backend="viditq", options={"plan": plan, "calibration": stats})
    timesteps = torch.linspace(999, 0, 20).round().long()

    def step(t):  # an expanded 0-d tensor has stride 0: warm up with the same kind of input
        return dict(kwargs, timestep=t.expand(kwargs["hidden_states"].shape[0]))

    counters.clear()
    with torch.no_grad():
        compiled(**step(timesteps[0]))  # warm-up
        graphs, report = counters["stats"]["unique_graphs"], REPORTS[-1]
        assert graphs == 1
        seen = set()
        for t in timesteps:
            kw = step(t)
            out = compiled(**kw)[0]
            i = plan.range_of(int(t))
            seen.add(i)
            assert _rel(out, statics[i](**kw)[0]) < 1e-3, int(t)
            assert _rel(out, statics[1 - i](**kw)[0]) > 3 * _rel(out, statics[i](**kw)[0]), int(t)
    assert seen == {0, 1}
    assert counters["stats"]["unique_graphs"] == graphs and REPORTS[-1] is report
    assert report.num_multi_version == len(PIXART_TS_LAYERS)
