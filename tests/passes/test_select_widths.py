"""The select pass on layers a width cannot take: odd K for int4 falls to W8 with a note, a layer
no integer width takes stays FP with the reasons, a given plan asking for it is refused by name."""

from dataclasses import replace

import pytest
import torch

import viditq_compile as vq
from viditq_compile import PlanError, Recipe
from viditq_compile.config.capabilities import weight_width_refusal
from viditq_compile.graph.capture import capture
from viditq_compile.graph.sites import ExportedTensors
from viditq_compile.numerics.quant import sqnr_db
from viditq_compile.passes.quantize import quantize_linears
from viditq_compile.passes.select import match_plan, select_linears

ODD = "K=63 is odd: int4 packs two values per byte"


class _OddK(torch.nn.Module):
    """fc2 sums over K=63: int4 cannot pack its rows."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(64, 63)
        self.fc2 = torch.nn.Linear(63, 64)
        self.fc3 = torch.nn.Linear(64, 64)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _sites(model, args):
    t = ExportedTensors(capture(model, args))
    return t, t.linear_sites()


def test_the_rule_names_the_width_and_the_shape():
    assert weight_width_refusal(63, 64, 4) == ODD
    assert weight_width_refusal(63, 64, 8) is None
    assert weight_width_refusal(64, 64, 4) is None
    assert weight_width_refusal(128, 8, 4, 64) is None
    assert "multiple of weight group 64" in weight_width_refusal(96, 8, 4, 64)
    assert "weight_bits=2" in weight_width_refusal(64, 8, 2)


def test_odd_k_at_w4a8_runs_w8_with_the_note_and_the_rest_w4(caplog):
    m = _OddK().eval()
    x = torch.randn(2, 16, 64)
    qm = vq.quantize(m, (x,), recipe="w4a8")
    widths = {r["name"]: r["weight_bits"] for r in qm.report.records()}
    assert widths == {"fc1": 4, "fc2": 8, "fc3": 4}
    note = {r["name"]: r["note"] for r in qm.report.records()}["fc2"]
    assert f"{ODD}; W8 instead" in note
    assert f"{ODD}; W8 instead" in str(qm.report)
    assert any("fc2" in r.getMessage() and "W8 instead" in r.getMessage() and r.levelname == "WARNING"
               for r in caplog.records)
    with torch.no_grad():
        assert sqnr_db(m(x), qm(x)) > 15


def test_a_layer_no_integer_width_takes_stays_fp_with_every_reason():
    # odd K past the int32 bound of W8A8 with w4a8's asymmetric weights (66311): int4 cannot pack
    # it, int8 would overflow
    class Big(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(32, 66313)
            self.big = torch.nn.Linear(66313, 2)

        def forward(self, x):
            return self.big(self.fc(x))

    t, sites = _sites(Big(), (torch.randn(1, 32),))
    plan = select_linears(sites, Recipe.preset("w4a8"))
    assert plan.layers["fc"].weight_bits == 4
    reason = plan.layers["big"].reason
    assert not plan.layers["big"].quantized
    assert reason.startswith("K=66313 is odd: int4 packs two values per byte; K=66313 exceeds the "
                             "int32 accumulator bound 66311 for W8A8, asymmetric weights"), reason
    assert "K=66313 is odd" in plan.report
    assert quantize_linears(t, sites, plan) == 1


def test_a_plan_asking_w4_on_odd_k_is_refused_by_name():
    m = _OddK().eval()
    t, sites = _sites(m, (torch.randn(2, 16, 64),))
    plan = select_linears(sites, Recipe.preset("w4a8"))
    assert plan.layers["fc2"].weight_bits == 8
    forced = vq.Plan.from_dict(plan.to_dict())
    forced.layers["fc2"] = replace(plan.layers["fc2"], weight_bits=4, note=None)
    with pytest.raises(PlanError, match=rf"layer 'fc2' cannot be quantized at W4: {ODD}; give it another weight width"):
        match_plan(sites, forced)
    # the quantize pass refuses it too, naming the layer, before rewriting anything
    with pytest.raises(PlanError, match=rf"layer 'fc2' cannot be quantized: {ODD}"):
        quantize_linears(t, sites, forced)
    # and so does vq.quantize with that plan
    with pytest.raises(PlanError, match="'fc2'"):
        vq.quantize(m, (torch.randn(2, 16, 64),), plan=forced)


def test_the_search_offers_no_width_a_layer_cannot_take():
    from viditq_compile.mixed_precision.search import _refuse_untakeable

    t, sites = _sites(_OddK().eval(), (torch.randn(2, 16, 64),))
    plan = select_linears(sites, Recipe.preset("w4a8"))
    layers = [lp.name for lp in plan.quantized]
    _refuse_untakeable(plan, layers, [(8, 8), (8, 4)])  # every layer takes int8
    with pytest.raises(ValueError, match=rf"layer 'fc2' cannot take the candidate width W4A8: {ODD}; "
                                         r"search without it \(candidates=\)"):
        _refuse_untakeable(plan, layers, [(8, 8), (4, 8)])
