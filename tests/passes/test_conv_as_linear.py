"""The conv-as-linear pass: 1×1 convolutions (and 1×1×1, k=1) become linears named after their
module, exact in floating point, on both graph kinds; every other convolution stays and is listed
with its reason; calibration, the eager reference and the backend's coverage take the same layers."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import viditq_compile as vq
from viditq_compile import backend
from viditq_compile.calibration.observe import calibrate
from viditq_compile.config.plan import LayerPlan
from viditq_compile.graph.capture import capture
from viditq_compile.graph.modules import conv_refusal, linear_layers
from viditq_compile.graph.sites import DynamoTensors, ExportedTensors
from viditq_compile.methods import int_weight
from viditq_compile.methods.balance import layer_transforms
from viditq_compile.numerics import quant as numerics
from viditq_compile.passes.conv_as_linear import convs_as_linears
from viditq_compile.report.tables import build_report

LINEAR_CONVS = ["inv", "point", "seq", "vol"]
KEPT = {"depth": "convolution (3×3 kernel, padding 1, groups 16): not a linear",
        "down": "convolution (stride 2): not a linear",
        "grouped": "convolution (groups 2): not a linear"}


class ConvNet(nn.Module):
    """Every kind of convolution a DiT holds, around a linear: 1×1 (with and without bias), k=1
    conv1d, 1×1×1 conv3d, and the ones that are not linears (depthwise 3×3, strided, grouped)."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.inv = nn.Conv2d(c, 2 * c, 1)
        self.depth = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c)
        self.point = nn.Conv2d(2 * c, c, 1, bias=False)
        self.grouped = nn.Conv2d(c, c, 1, groups=2)
        self.down = nn.Conv2d(c, c, 1, stride=2)
        self.seq = nn.Conv1d(c, c, 1)
        self.vol = nn.Conv3d(c, c, (1, 1, 1))
        self.fc = nn.Linear(c, c)
        g = torch.Generator().manual_seed(0)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.3

    def forward(self, x):  # x: [B, C, H, W]
        h = self.point(torch.nn.functional.silu(self.depth(self.inv(x))))
        h = self.grouped(h) + h
        b, c, hh, ww = h.shape
        s = self.seq(h.flatten(2))  # [B, C, H*W]
        v = self.vol(h.unsqueeze(2)).squeeze(2)  # [B, C, 1, H, W] -> [B, C, H, W]
        y = self.fc((s.view(b, c, hh, ww) + v).flatten(2).transpose(1, 2))
        return y, self.down(h)


@pytest.fixture
def net():
    torch.manual_seed(0)
    return ConvNet().eval(), torch.randn(2, 8, 6, 4)


def test_conv_refusal_says_what_makes_a_conv_not_a_linear():
    assert conv_refusal((1, 1)) is None and conv_refusal((1,), 1, "valid") is None
    assert conv_refusal((1, 1), padding="same", dilation=2) is None  # no effect on a kernel of ones
    assert conv_refusal((3, 3), 1, 1, 1, 384) == "convolution (3×3 kernel, padding 1, groups 384): not a linear"
    assert conv_refusal((2, 2), 2) == "convolution (2×2 kernel, stride 2): not a linear"
    assert conv_refusal((1, 1), transposed=True) == "convolution (transposed): not a linear"
    with pytest.raises(ValueError, match="'full'"):
        conv_refusal((1, 1), padding="full")


def test_export_rewrites_exactly_the_linear_convs_exactly_in_fp(net):
    model, x = net
    ep = capture(model, (x,))
    tensors = ExportedTensors(ep)
    assert convs_as_linears(tensors) == 4
    assert convs_as_linears(tensors) == 0  # nothing left to rewrite
    sites = tensors.linear_sites()
    assert [s.name for s in sites] == ["inv", "point", "seq", "vol", "fc"]
    assert {s.name: (s.out_features, s.in_features) for s in sites}["inv"] == (16, 8)
    inv = next(s for s in sites if s.name == "inv")
    assert inv.param is model.inv.weight and inv.weight.shape == (16, 8)
    assert {k.name: k.reason for k in tensors.kept_convolutions()} == KEPT
    with torch.no_grad():
        want = model(x)
        got = ep.module()(x)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_a_graph_without_linear_convs_is_left_alone():
    model = nn.Sequential(nn.Conv2d(4, 4, 2, stride=2), nn.Flatten(2)).eval()
    tensors = ExportedTensors(capture(model, (torch.randn(1, 4, 4, 4),)))
    before = [n.target for n in tensors.gm.graph.nodes]
    assert convs_as_linears(tensors) == 0
    assert [n.target for n in tensors.gm.graph.nodes] == before
    assert [k.reason for k in tensors.kept_convolutions()] == ["convolution (2×2 kernel, stride 2): not a linear"]


def test_dynamo_graphs_rewrite_the_same_convs_named_by_module(net):
    model, x = net
    seen = {}

    def grab(gm, example_inputs):
        tensors = DynamoTensors(gm, example_inputs)
        seen["count"] = convs_as_linears(tensors)
        seen["names"] = [s.name for s in tensors.linear_sites()]
        seen["kept"] = {k.name: k.reason for k in tensors.kept_convolutions()}
        return tensors.gm

    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, backend=grab, fullgraph=True)(x)
        want = model(x)
    assert seen == {"count": 4, "names": ["inv", "point", "seq", "vol", "fc"], "kept": KEPT}
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_quantize_quantizes_the_linear_convs_and_the_report_lists_the_rest(net):
    model, x = net
    qm = vq.quantize(model, (x,))
    quantized = {lp.name for lp in qm.plan.quantized}
    assert quantized == set(LINEAR_CONVS) | {"fc"} == set(qm.plan.layers)  # no attention: no graph keep-FP
    # the float weight of a quantized conv is gone from the program; a kept conv's stays
    state = set(qm.program.state_dict)
    assert not {"inv.weight", "point.weight", "vol.weight"} & state and "depth.weight" in state
    report = build_report(qm.plan, convolutions=ExportedTensors(qm.program).kept_convolutions())
    assert {c.name: c.reason for c in report.convolutions} == KEPT
    assert "3 convolution(s) kept in floating point" in report.summary()
    assert re.search(r"\n  depth +16 x 1 x 3 x 3  convolution \(3×3 kernel", str(report))
    with torch.no_grad():
        assert numerics.sqnr_db(model(x)[0], qm(x)[0]) > 30


def test_backend_quantizes_the_linear_convs_reports_the_rest_and_counts_them_reached(net):
    model, x = net
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(model, backend="viditq")
        compiled(x)
    report = backend.last_report()
    assert {r.name for r in report.rows if r.quantized} == set(LINEAR_CONVS) | {"fc"}
    assert {c.name: c.reason for c in report.convolutions} == KEPT
    cov = backend.coverage(model, warn=False)
    assert set(cov.reached) == {"inv", "point", "seq", "vol", "fc"} and not cov.missing
    assert cov.reached["point"] == "quantized"


def test_calibration_observes_linear_convs_per_channel(net):
    model, x = net
    stats = calibrate(model, [((x,), {})], progress=False)
    assert set(stats.absmax_per_call) == set(linear_layers(model)) == {"inv", "point", "seq", "vol", "fc"}
    torch.testing.assert_close(stats.absmax("inv"), x.abs().amax(dim=(0, 2, 3)))


@pytest.mark.parametrize("preset", ["w8a8", "w4a8", "w4a8-dynamic"])
def test_eager_reference_of_a_conv_is_what_the_program_computes(preset):
    """The search scores a conv layer with ``EagerLinear`` on the conv module: it must compute
    what the program's rewritten (and, for w4a8, balanced) conv computes, to fp32 rounding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 1)).eval()
    with torch.no_grad():
        model[0].weight.mul_(torch.rand(16).pow(4).view(1, 16, 1, 1) * 10)  # outlier channels
    scale = torch.ones(1, 16, 1, 1)
    scale[:, 3] = 20  # an outlier input channel
    x = torch.randn(2, 16, 4, 6) * scale
    calls = [((torch.randn(2, 16, 4, 6) * scale,), {}) for _ in range(3)]
    stats = calibrate(model, calls + [((x,), {})], progress=False)
    recipe = vq.Recipe.preset(preset).with_(keep_fp_from_graph=False)  # one layer: not a patch embedding
    qm = vq.quantize(model, (x,), recipe=recipe, calibration=stats)
    lp = qm.plan.layers["0"]
    assert lp.quantized and (lp.balance == "smooth+rotate") == (preset != "w4a8-dynamic")
    tensors = ExportedTensors(capture(model, (x,)))
    convs_as_linears(tensors)
    transforms = layer_transforms(tensors.linear_sites(), qm.plan, stats)
    eager = int_weight.EagerLinear(model[0], lp, transforms.get("0"))
    with torch.no_grad():
        want = qm(x)
        got = eager(model[0], (x,), None)
    assert got.shape == want.shape == (2, 32, 4, 6)
    err = (got - want).abs().max().item() / want.abs().max().item()
    assert err <= 1e-5, err
    with torch.no_grad():
        # unbalanced W4A8 loses the outlier channel (~10 dB): balancing works on a conv too
        assert numerics.sqnr_db(model(x), want) > {"w8a8": 30, "w4a8": 12, "w4a8-dynamic": 5}[preset]


def test_eager_reference_refuses_a_conv_that_is_not_a_linear():
    with pytest.raises(TypeError, match="3×3 kernel"):
        int_weight.EagerLinear(nn.Conv2d(4, 4, 3), LayerPlan("c", 36, 4, weight_bits=8, act_bits=8))


def test_one_compiled_graph_serves_each_blocks_own_conv_weights():
    """Dynamo runs one graph for every block with the same code (regional compilation): the
    quantized inputs are re-derived per set of parameters, which must include the conv weights
    behind the rewritten linears (not the views the graph reads)."""
    torch.manual_seed(0)
    blocks = [_Block().eval() for _ in range(2)]
    x = torch.randn(2, 8, 4, 4)
    torch._dynamo.reset()
    backend.REPORTS.clear()
    for b in blocks:
        b.compile(backend="viditq")
    with torch.no_grad():
        for b in blocks:
            assert numerics.sqnr_db(b.forward(x), b(x)) > 30  # forward: eager; the call: compiled
    assert len(backend.REPORTS) == 1 and backend.REPORTS[0].num_quantized == 2  # one graph for both


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Conv2d(8, 16, 1), nn.Conv2d(16, 8, 1)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))
