"""``passes/quantize_attention.py``: SDPA -> ``viditq.attention`` where the recipe's ``attention``
rule asks, by the attention kind the graph shows; end to end on the tiny PixArt of ``tests/zoo.py``
(exported, saved / loaded and compiled with the ``viditq`` backend)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import viditq_compile as vq
from tests.zoo import build_latte, build_outlier_pixart, build_pixart
from viditq_compile.backend import REPORTS
from viditq_compile.config.recipe import AttentionRule, Recipe, RecipeError
from viditq_compile.graph.sites import ExportedTensors
from viditq_compile.methods.attention import EagerAttention
from viditq_compile.numerics.quant import sqnr_db
from viditq_compile.ops.schema import ATTENTION
from viditq_compile.passes.quantize_attention import (
    SDPA_TARGETS,
    AttentionChoice,
    choose_attentions,
    program_attentions,
    quantize_attention,
)

SELF = AttentionRule(self_attn="int8", temporal_attn="int8")
PIXART_SELF = ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]


def _with(recipe: str, rule: AttentionRule) -> Recipe:
    return dataclasses.replace(Recipe.preset(recipe), attention=rule)


def _count(gm, targets) -> int:
    return sum(n.op == "call_function" and n.target in targets for n in gm.graph.nodes)


@pytest.fixture(scope="module")
def pixart():
    model, kwargs = build_pixart()
    model.eval()
    with torch.no_grad():
        ref = model(**kwargs)[0]
    return model, kwargs, ref


def _exported(model, kwargs):
    ep = torch.export.export(model, (), kwargs)
    return ep, ExportedTensors(ep)


def test_self_attention_is_replaced_and_masked_cross_attention_is_kept(pixart):
    model, kwargs, _ = pixart
    ep, t = _exported(model, kwargs)
    rule = AttentionRule(self_attn="int8", cross_attn="int8")
    choices = choose_attentions(t.gm, t.linear_sites(), rule)
    assert [(c.name, c.kind, c.format) for c in choices] == [
        ("transformer_blocks.0.attn1", "self_attn", "int8"), ("transformer_blocks.0.attn2", "cross_attn", "fp"),
        ("transformer_blocks.1.attn1", "self_attn", "int8"), ("transformer_blocks.1.attn2", "cross_attn", "fp")]
    assert all("attention mask" in c.reason for c in choices if c.kind == "cross_attn")
    assert quantize_attention(t.gm, choices) == 2
    t.finalize()
    assert _count(ep.graph_module, {ATTENTION.overload}) == 2
    assert _count(ep.graph_module, set(SDPA_TARGETS)) == 2
    assert [name for name, _, _ in program_attentions(ep.graph_module)] == PIXART_SELF


def test_a_rule_that_quantizes_nothing_rewrites_nothing(pixart):
    model, kwargs, _ = pixart
    ep, t = _exported(model, kwargs)
    choices = choose_attentions(t.gm, t.linear_sites(), AttentionRule())
    assert len(choices) == 4 and not any(c.quantized for c in choices)
    assert {c.reason for c in choices} == {"the recipe quantizes no attention"}
    assert quantize_attention(t.gm, choices) == 0
    keep_cross = choose_attentions(t.gm, t.linear_sites(), AttentionRule(cross_attn="int8"))
    assert [c.format for c in keep_cross] == ["fp"] * 4
    assert "keeps it in floating point" in keep_cross[0].reason


def test_latte_temporal_attention_is_told_from_spatial():
    """Latte's temporal blocks attend over the frames: a temporal-only rule rewrites exactly those."""
    model, kwargs = build_latte()
    model.eval()
    with torch.no_grad():
        ref = model(**kwargs)[0]
    ep, t = _exported(model, kwargs)
    choices = choose_attentions(t.gm, t.linear_sites(), AttentionRule(temporal_attn="int8"))
    kinds = {c.name: c.kind for c in choices}
    assert kinds == {"transformer_blocks.0.attn1": "self_attn", "transformer_blocks.0.attn2": "cross_attn",
                     "temporal_transformer_blocks.0.attn1": "temporal_attn",
                     "transformer_blocks.1.attn1": "self_attn", "transformer_blocks.1.attn2": "cross_attn",
                     "temporal_transformer_blocks.1.attn1": "temporal_attn"}
    assert [c.name for c in choices if c.quantized] == ["temporal_transformer_blocks.0.attn1",
                                                        "temporal_transformer_blocks.1.attn1"]
    assert quantize_attention(t.gm, choices) == 2
    t.finalize()
    with torch.no_grad():
        assert sqnr_db(ref, ep.module()(**kwargs)[0]) > 40


def test_refusals():
    g = torch.fx.Graph()
    g.output(None)
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    with pytest.raises(TypeError, match="AttentionRule"):
        choose_attentions(gm, [], {"self": "int8"})
    with pytest.raises(ValueError, match="not an SDPA call"):
        quantize_attention(gm, [AttentionChoice("a", "nope", "self_attn", "int8", "")])


class _Causal(torch.nn.Module):
    """One self-attention block: the role analysis finds it; causal SDPA is refused."""

    def __init__(self, causal: bool):
        super().__init__()
        self.qkv, self.out, self.causal = torch.nn.Linear(32, 96), torch.nn.Linear(32, 32), causal

    def forward(self, hidden_states):
        b, n, _ = hidden_states.shape
        q, k, v = self.qkv(hidden_states).view(b, n, 3, 2, 16).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out(o.transpose(1, 2).reshape(b, n, 32))


@pytest.mark.parametrize("causal", [False, True])
def test_causal_attention_is_refused_by_name(causal):
    m = _Causal(causal).eval()
    x = torch.randn(2, 20, 32)
    ep, t = _exported(m, {"hidden_states": x})
    (c,) = choose_attentions(t.gm, t.linear_sites(), SELF)
    assert c.kind == "self_attn" and c.quantized == (not causal)
    if causal:
        assert "causal" in c.reason
    assert quantize_attention(t.gm, [c]) == (0 if causal else 1)
    t.finalize()
    with torch.no_grad():
        assert sqnr_db(m(x), ep.module()(hidden_states=x)) > 30


def test_recipe_key_is_parsed_and_validated():
    r = Recipe.from_dict({"weight": {"n_bits": 8}, "act": {"n_bits": 8},
                          "attention": {"self": "int8", "temporal": "int8", "cross": "fp", "block": 64}})
    assert r.attention == AttentionRule(self_attn="int8", temporal_attn="int8", cross_attn="fp", block=64)
    assert r.attention.quantizes and not Recipe.preset("w8a8").attention.quantizes
    floor = Recipe.from_dict({"weight": {"n_bits": 8}, "act": {"n_bits": 8},
                              "attention": {"self": "int8", "search_min_db": 30}}).attention
    assert floor.search_min_db == 30 and floor.to_dict()["search_min_db"] == 30
    assert "search_min_db" not in r.attention.to_dict()  # plan files without a floor are unchanged
    for bad, match in [({"self": "int4"}, "attention.self"), ({"block": 0}, "attention.block"),
                       ({"spatial": "int8"}, "attention.spatial"), ("int8", "attention"),
                       ({"search_min_db": -1}, "attention.search_min_db"),
                       ({"search_min_db": "high"}, "attention.search_min_db"),
                       ({"search_min_db": True}, "attention.search_min_db")]:
        with pytest.raises(RecipeError, match=match):
            Recipe.from_dict({"weight": {"n_bits": 8}, "act": {"n_bits": 8}, "attention": bad})


# ---- end to end -----------------------------------------------------------------------------------


def test_quantize_saves_loads_and_reports_the_attentions(pixart, tmp_path):
    model, kwargs, ref = pixart
    qm = vq.quantize(model, (), kwargs, recipe=_with("w8a8", SELF))
    assert [name for name, _, _ in qm.report.attentions] == PIXART_SELF
    assert "2 attention(s) quantized" in qm.report.summary() and PIXART_SELF[0] in str(qm.report)
    with torch.no_grad():
        out = qm(**kwargs)[0]
    # measured: 55.8 dB with int8 attention and without (this seeded PixArt's attention is mild)
    assert sqnr_db(ref, out) > 45
    qm.save(tmp_path / "a")
    loaded = vq.load(tmp_path / "a")
    assert [name for name, _, _ in loaded.report.attentions] == PIXART_SELF
    with torch.no_grad():
        assert torch.equal(loaded(**kwargs)[0], out)
    from viditq_compile.module_form import to_modules

    with pytest.raises(ValueError, match="module form has no quantized attention"):
        to_modules(model, qm)  # refused before anything changes


def test_the_plan_records_the_attention_rule_and_rebuilds_the_same_program(pixart, tmp_path):
    """One plan, one meaning: the plan of a program with int8 attention carries the rule, so the
    plan re-applied (from its file, with no recipe) quantizes the same attentions, bit-exact; a bad
    rule in a plan file is refused naming the key."""
    model, kwargs, _ = pixart
    qm = vq.quantize(model, (), kwargs, recipe=_with("w8a8", SELF))
    assert qm.plan.attention == SELF.to_dict()
    qm.plan.save(tmp_path / "plan.json")
    again = vq.quantize(model, (), kwargs, plan=vq.Plan.load(tmp_path / "plan.json"))
    assert [name for name, _, _ in again.report.attentions] == PIXART_SELF
    with torch.no_grad():
        assert torch.equal(again(**kwargs)[0], qm(**kwargs)[0])
    plain = vq.quantize(model, (), kwargs, recipe="w8a8").plan
    assert plain.attention is None and "attention" not in plain.to_dict()
    # asked int8, refused (masked cross-attention): named with the reason in the plan and the report
    cross = vq.quantize(model, (), kwargs, recipe=_with("w8a8", AttentionRule(cross_attn="int8")))
    kept = cross.plan.attention["kept"]
    assert sorted(kept) == ["transformer_blocks.0.attn2", "transformer_blocks.1.attn2"]
    assert all("attention mask" in why for why in kept.values())
    assert cross.report.attentions_kept == kept and "2 attention(s) the recipe asks int8 for kept" in \
        cross.report.summary() and "transformer_blocks.0.attn2" in str(cross.report)
    cross.plan.save(tmp_path / "cross.json")
    assert vq.Plan.load(tmp_path / "cross.json").attention == cross.plan.attention
    bad = qm.plan.to_dict()
    bad["attention"]["self"] = "int4"
    with pytest.raises(vq.PlanError, match="plan 'attention'.*attention.self.*int4"):
        vq.Plan.from_dict(bad)


@pytest.mark.slow
def test_outlier_pixart_attention_alone_and_with_w8a8():
    """The outlier PixArt (channels 10-100x through adaLN) makes attention matter: int8 attention
    alone (linears FP) costs measurable quality, and on top of W8A8 it costs little."""
    model, kwargs = build_outlier_pixart()
    model.eval()
    with torch.no_grad():
        ref = model(**kwargs)[0]
        alone = vq.quantize(model, (), kwargs, recipe=_with("fp", SELF))(**kwargs)[0]
        w8a8 = vq.quantize(model, (), kwargs, recipe="w8a8")(**kwargs)[0]
        both = vq.quantize(model, (), kwargs, recipe=_with("w8a8", SELF))(**kwargs)[0]
    # measured (per-token scales, the rule's default): 38.3 dB alone; 26.2 dB W8A8, 26.0 dB W8A8 +
    # int8 attention (32.3 / 25.2 dB with 128-token blocks)
    assert 33 < sqnr_db(ref, alone) < 80
    assert sqnr_db(ref, both) > sqnr_db(ref, w8a8) - 3
    # the eager reference (methods.attention) computes what the program does
    with torch.no_grad(), EagerAttention(model, PIXART_SELF, block=SELF.block) as eager:
        eager_out = model(**kwargs)[0]
    assert (eager.calls, eager.refused) == (2, 0)
    # measured 92.8 dB: the float parts round differently, flipping a few int8 codes of q / k
    assert sqnr_db(alone, eager_out) > 75


def test_eager_reference_refuses_masked_calls_and_unknown_modules(pixart):
    model, kwargs, _ = pixart
    with torch.no_grad(), EagerAttention(model, ["transformer_blocks.0.attn2"]) as eager:
        model(**kwargs)
    assert (eager.calls, eager.refused) == (0, 1)  # the caption mask
    with pytest.raises(KeyError, match="attn9"):
        EagerAttention(model, ["transformer_blocks.0.attn9"])


def test_compiled_with_the_viditq_backend(pixart):
    model, kwargs, ref = pixart
    recipe = _with("w8a8", SELF)
    exported = vq.quantize(model, (), kwargs, recipe=recipe)
    n0 = len(REPORTS)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="viditq", options={"recipe": recipe})
    with torch.no_grad():
        out = compiled(**kwargs)[0]
        want = exported(**kwargs)[0]
    reports = list(REPORTS)[n0:]
    assert sum(len(r.attentions) for r in reports) == 2
    assert sqnr_db(want, out) > 40 and sqnr_db(ref, out) > 45
