"""passes.fuse_qkv: one GEMM for the quantized linears that read one activation, bit-exact."""

import dataclasses

import pytest
import torch
from torch.utils.weak import WeakIdKeyDictionary

from tests.zoo import build_flux, build_pixart
from viditq_compile import Recipe
from viditq_compile.backend import REPORTS
from viditq_compile.graph.capture import capture
from viditq_compile.graph.sites import ExportedTensors
from viditq_compile.ops.schema import QLINEAR, W8A8_LINEAR
from viditq_compile.passes.fuse_qkv import fuse_shared_inputs
from viditq_compile.passes.select import select_linears
from viditq_compile.pipeline import quantize_graph


def _linear_ops(ep) -> int:
    return sum(W8A8_LINEAR.calls(n) or QLINEAR.calls(n) for n in ep.graph_module.graph.nodes)


def _run(ep, kwargs):
    with torch.no_grad():
        return ep.module()(**kwargs)[0]


def _quantized(model, kwargs, recipe, fuse, plan=None, cache=None):
    ep = capture(model, (), kwargs, dynamic=False)
    done = quantize_graph(ExportedTensors(ep), None if plan else Recipe.preset(recipe), plan,
                          cache=cache, fuse=fuse)
    return ep, done


@pytest.fixture(scope="module")
def pixart():
    return build_pixart()


# (family, recipe, fused calls, fused GEMMs): PixArt's q/k/v per block (3 + 3) and the caption's
# k/v of both blocks (4: every block reads the same caption projection); Flux's q/k/v and
# add_q/k/v per double block, proj_mlp + q/k/v per single block.
CASES = [("pixart", "w8a8", 10, 3), ("pixart", "w4a8", 10, 3), ("flux", "w8a8", 20, 6)]


@pytest.mark.parametrize("family, recipe, calls, gemms", CASES)
def test_fused_program_is_bit_exact_with_the_unfused_one(pixart, family, recipe, calls, gemms):
    model, kwargs = pixart if family == "pixart" else build_flux()
    plain, plain_done = _quantized(model, kwargs, recipe, fuse=False)
    fused, done = _quantized(model, kwargs, recipe, fuse=True)
    assert plain_done.fusion is None
    assert (done.fusion.count, done.fusion.gemms) == (calls, gemms)
    assert done.fusion.refused == []
    assert _linear_ops(fused) == _linear_ops(plain) - calls + gemms
    assert all(len(g) >= 2 for g in done.fusion.groups)
    assert torch.equal(_run(fused, kwargs), _run(plain, kwargs))
    # the per-layer integer weights are gone, the concatenated ones hold every row
    sd = fused.state_dict
    q = "transformer_blocks.0.attn1.to_q" if family == "pixart" else "transformer_blocks.0.attn.to_q"
    assert f"{q}.viditq_w_q" not in sd
    (name,) = [k for k in sd if k.startswith(f"{q}.viditq_w_q_fused_")]
    assert sd[name].shape[0] == 3 * plain.state_dict[f"{q}.viditq_w_q"].shape[0]


def test_exported_programs_keep_one_op_per_layer_by_default(pixart):
    ep, done = _quantized(*pixart, "w8a8", fuse=None)
    assert done.fusion is None
    assert _linear_ops(ep) == 20  # 2 blocks x (4 + 4 attention + 2 MLP linears)


def test_different_widths_stay_separate_and_are_reported(pixart):
    model, kwargs = pixart
    ep = capture(model, (), kwargs, dynamic=False)
    plan = select_linears(ExportedTensors(ep).linear_sites(), Recipe.preset("w4a8"))
    k = "transformer_blocks.0.attn1.to_k"
    plan.layers[k] = dataclasses.replace(plan.layers[k], weight_bits=8, weight_sym=True)
    plain, _ = _quantized(model, kwargs, None, fuse=False, plan=plan)
    fused, done = _quantized(model, kwargs, None, fuse=True, plan=plan)
    assert done.fusion.refused == [((k,), "weight_bits differs: 8 vs 4")]
    assert ("transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_v") in done.fusion.groups
    assert (done.fusion.count, done.fusion.gemms) == (9, 3)
    assert k in done.fusion.summary()
    assert torch.equal(_run(fused, kwargs), _run(plain, kwargs))


def test_a_plain_and_a_two_op_layer_on_one_input_stay_separate(pixart):
    model, kwargs = pixart
    ep = capture(model, (), kwargs, dynamic=False)
    plan = select_linears(ExportedTensors(ep).linear_sites(), Recipe.preset("w8a8"))
    v = "transformer_blocks.1.attn1.to_v"
    plan.layers[v] = dataclasses.replace(plan.layers[v], weight_bits=4, weight_sym=False)
    _, done = _quantized(model, kwargs, None, fuse=True, plan=plan)
    assert done.fusion.refused == [((v,), "ops differ: qlinear vs w8a8_linear")]
    assert (done.fusion.count, done.fusion.gemms) == (9, 3)


def test_the_weight_cache_holds_views_of_the_fused_weights(pixart):
    cache = WeakIdKeyDictionary()
    ep, done = _quantized(*pixart, "w8a8", fuse=True, cache=cache)
    fused = {t.untyped_storage().data_ptr() for k, t in ep.state_dict.items() if "_fused_" in k}
    cached = [qw for per in cache.values() for qw in per.values()]
    shared = [qw for qw in cached if qw.q.untyped_storage().data_ptr() in fused]
    assert len(shared) == done.fusion.count
    assert all(qw.scale.untyped_storage().data_ptr() in fused for qw in shared)


def test_nothing_to_fuse_is_counted_zero(pixart):
    ep, done = _quantized(*pixart, "w8a8", fuse=True)
    again = fuse_shared_inputs(ExportedTensors(ep))
    assert (again.count, again.gemms, again.refused) == (0, 0, [])


def test_refuses_what_is_not_a_graph():
    with pytest.raises(TypeError, match="GraphTensors"):
        fuse_shared_inputs(torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph()))
    with pytest.raises(TypeError, match="fuse must be a bool"):
        quantize_graph(None, Recipe.preset("w8a8"), fuse="yes")  # type: ignore[arg-type]


@pytest.mark.slow
def test_backend_fuses_and_matches_the_unfused_compile(pixart, monkeypatch):
    import viditq_compile.pipeline as pipeline
    from viditq_compile.passes.fuse_qkv import Fusion

    model, kwargs = pixart
    seen: list[Fusion] = []

    def spy(tensors, cache=None):
        seen.append(fuse_shared_inputs(tensors, cache))
        return seen[-1]

    outs, reports = [], []
    for fake in (lambda tensors, cache=None: Fusion(), spy):
        torch._dynamo.reset()
        monkeypatch.setattr(pipeline, "fuse_shared_inputs", fake)
        compiled = torch.compile(model, backend="viditq", options={"recipe": "w8a8"})
        with torch.no_grad():
            outs.append(compiled(**kwargs)[0])
        reports.append(REPORTS[-1])
    torch._dynamo.reset()
    assert [(f.count, f.gemms) for f in seen] == [(10, 3)]
    assert torch.equal(outs[0], outs[1])
    # the backend's report says which layers share a GEMM (the unfused compile: none)
    assert reports[0].shared_gemms == [] and reports[1].shared_gemms == seen[0].groups
    assert "10 quantized layers run as 3 shared GEMMs" in reports[1].summary()
    assert " + ".join(seen[0].groups[0]) in str(reports[1])
