"""Sequence / context parallelism (``viditq_compile.parallel.sequence`` / ``.ulysses``) on 2 CPU
ranks (gloo): a quantized tiny PixArt split over its image tokens computes what one process
computes, through diffusers' context parallel (module form) and through the FX pass over a saved
program; the refusals need no second rank."""

from __future__ import annotations

import os

import pytest
import torch

import viditq_compile as vq
from tests import zoo
from tests.parallel import ranks
from viditq_compile.config.recipe import AttentionRule, Recipe
from viditq_compile.parallel import sequence, ulysses
from viditq_compile.parallel.mesh import Group


def _quantized_pixart_modules():
    from viditq_compile.module_form import quantize_modules

    model, kwargs = zoo.build_pixart()
    quantize_modules(model, (), kwargs)
    return model, kwargs


# -- workers (module level: spawn pickles them by name) ------------------------------------------
def _cp_worker(rank, world, out_dir, compiled):
    from diffusers import ContextParallelConfig

    model, kwargs = _quantized_pixart_modules()
    run = torch.compile(model, backend="viditq", options={"recipe": "fp"}) if compiled else model
    with torch.no_grad():
        ref = run(**kwargs)[0]
    if compiled:
        torch._dynamo.reset()
    device_count = torch.accelerator.device_count
    source = sequence.enable_context_parallel(model, ContextParallelConfig(ulysses_degree=world))
    restored = torch.accelerator.device_count is device_count
    tokens = []
    model.transformer_blocks[0].register_forward_hook(lambda m, a, o: tokens.append(o.shape[1]))
    run = torch.compile(model, backend="viditq", options={"recipe": "fp"}) if compiled else model
    with torch.no_grad():
        out = run(**kwargs)[0]
    ranks.save(out_dir, rank, ref=ref, out=out, source=source, restored=restored,
               tokens=tokens[0] if tokens else -1)


def _sp_worker(rank, world, out_dir, path, compiled):
    qm = vq.load(path)
    kwargs = torch.load(os.path.join(path, "..", "inputs.pt"), weights_only=False)
    sp = sequence.sequence_parallel(qm)
    run = sp.compile() if compiled else sp
    with torch.no_grad():
        out = run(**kwargs)[0]
        one = run(**_first(kwargs))[0]  # batch 1: the exchanges' layouts differ (reshape is a view)
    ranks.save(out_dir, rank, out=out, one=one, ulysses=len(sp.report.ulysses), local=len(sp.report.local),
               gathered=",".join(sp.report.gathered), degree=sp.degree)


# -- the module route ------------------------------------------------------------------------------
def test_context_parallel_ulysses_matches_one_process():
    results = ranks.run(_cp_worker, False, timeout=120)
    for r in results:
        assert r["source"] == "viditq_compile"  # diffusers 0.42.1 has no _cp_plan for PixArt
        assert r["restored"]  # the CPU device_count patch is scoped to enable_parallelism
        assert r["tokens"] == 32  # each rank's blocks saw half of the 64 image tokens
        assert (r["out"] - r["ref"]).abs().max().item() <= 1e-6
    assert torch.equal(results[0]["out"], results[1]["out"])


@pytest.mark.slow
def test_context_parallel_ulysses_compiled_matches_one_process():
    for r in ranks.run(_cp_worker, True, timeout=300):
        assert r["tokens"] == 32
        assert (r["out"] - r["ref"]).abs().max().item() <= 1e-6


def _families_worker(rank, world, out_dir):
    results = {}
    for name in ("dit", "latte"):
        model, kwargs = getattr(zoo, f"build_{name}")()
        if name == "latte":  # one timestep per batch, as a pipeline calls it
            differing = dict(kwargs)
            kwargs["timestep"] = kwargs["timestep"][:1].expand_as(kwargs["timestep"]).clone()
        with torch.no_grad():
            ref = model(**kwargs)[0]
        sequence.enable_context_parallel(model, world)
        with torch.no_grad():
            results[name] = (model(**kwargs)[0] - ref).abs().max().item()
    try:
        with torch.no_grad():
            model(**differing)
        results["refused"] = ""
    except ValueError as e:
        results["refused"] = str(e)
    ranks.save(out_dir, rank, **results)


def test_context_parallel_dit_and_latte_match_one_process():
    for r in ranks.run(_families_worker, timeout=120):
        assert r["dit"] <= 1e-6
        assert r["latte"] <= 1e-6  # temporal attention local, its timestep rows split with the tokens
        assert "timesteps differ" in r["refused"]


# -- the artifact route ----------------------------------------------------------------------------
def _first(kwargs):
    return {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def _saved_pixart(tmp_path, recipe="w8a8"):
    model, kwargs = zoo.build_pixart()
    qm = vq.quantize(model, (), kwargs, recipe=recipe)
    path = tmp_path / "artifact"
    qm.save(path)
    torch.save(kwargs, tmp_path / "inputs.pt")
    loaded = vq.load(path)
    with torch.no_grad():
        ref, ref_one = loaded(**kwargs)[0], loaded(**_first(kwargs))[0]
    return str(path), ref, ref_one


@pytest.mark.parametrize("attention", ["fp", "int8"])
def test_sequence_parallel_program_matches_one_process(tmp_path, attention):
    """int8: the self-attentions are ``viditq.attention`` (per-token scales, K mean over every
    token of a head), which Ulysses exchanges like SDPA: each rank holds every token of its heads."""
    recipe = Recipe.preset("w8a8").with_(attention=AttentionRule(self_attn=attention))
    path, ref, ref_one = _saved_pixart(tmp_path, recipe)
    results = ranks.run(_sp_worker, path, False, timeout=120)
    for r in results:
        assert r["degree"] == 2
        assert (r["ulysses"], r["local"]) == (2, 2)  # 2 self-attentions exchanged, 2 cross local
        assert r["gathered"] == "squeeze"  # one gather: before the unpatchify
        assert (r["out"] - ref).abs().max().item() <= 1e-6
        assert (r["one"] - ref_one).abs().max().item() <= 1e-6
    assert torch.equal(results[0]["out"], results[1]["out"])


@pytest.mark.slow
def test_sequence_parallel_program_compiled_matches_one_process(tmp_path):
    path, ref, ref_one = _saved_pixart(tmp_path)
    compiled_ref = vq.load(path).compile()
    kwargs = torch.load(tmp_path / "inputs.pt", weights_only=False)
    with torch.no_grad():
        cref = compiled_ref(**kwargs)[0]
    for r in ranks.run(_sp_worker, path, True, timeout=300):
        assert (r["out"] - cref).abs().max().item() <= 1e-6
        assert (r["one"] - ref_one).abs().max().item() <= 1e-5
        assert (r["out"] - ref).abs().max().item() <= 1e-5


# -- refusals (one process: they come before any exchange) -----------------------------------------
class _MaskedSelfAttention(torch.nn.Module):
    def __init__(self, heads=4, width=64):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.out = torch.nn.Linear(width, width)

    def forward(self, hidden_states, mask=None):
        b, n, c = hidden_states.shape
        q, k, v = self.qkv(hidden_states).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(a.transpose(1, 2).reshape(b, n, c))


def _graph(module, *args):
    return torch.export.export(module.eval(), args).module()


def test_shard_tokens_counts_one_self_attention():
    gm = _graph(_MaskedSelfAttention(), torch.randn(2, 16, 64))
    report = ulysses.shard_tokens(gm, Group(None, 2, 0))  # type: ignore[arg-type]
    assert (len(report.ulysses), len(report.local), report.tokens) == (1, 0, 16)


def test_heads_not_divisible_refused():
    gm = _graph(_MaskedSelfAttention(heads=4), torch.randn(2, 12, 64))
    with pytest.raises(ulysses.SequenceParallelError, match="4 heads do not divide by 3"):
        ulysses.shard_tokens(gm, Group(None, 3, 0))  # type: ignore[arg-type]


def test_self_attention_mask_refused():
    x = torch.randn(2, 16, 64)
    gm = _graph(_MaskedSelfAttention(), x, torch.zeros(2, 1, 16, 16, dtype=torch.bool))
    with pytest.raises(ulysses.SequenceParallelError, match="attention mask"):
        ulysses.shard_tokens(gm, Group(None, 2, 0))  # type: ignore[arg-type]


def test_module_route_heads_not_divisible_refused():
    from diffusers import ContextParallelConfig

    model, _ = zoo.build_pixart()  # 4 heads
    with pytest.raises(ValueError, match="4 heads do not divide by ulysses_degree 3"):
        sequence.enable_context_parallel(model, ContextParallelConfig(ulysses_degree=3))


@pytest.mark.skipif(torch.accelerator.device_count() > 0, reason="the refusal is for CPU-only machines")
def test_module_route_ring_refused_on_cpu():
    from diffusers import ContextParallelConfig

    model, _ = zoo.build_pixart()
    with pytest.raises(ValueError, match="log-sum-exp"):
        sequence.enable_context_parallel(model, ContextParallelConfig(ring_degree=2))


def test_module_route_refuses_a_class_with_no_plan():
    from diffusers import ConfigMixin, ModelMixin

    class NoPlan(ModelMixin, ConfigMixin):
        pass

    with pytest.raises(ValueError, match="NoPlan has no _cp_plan"):
        sequence.enable_context_parallel(NoPlan(), 2)
    with pytest.raises(TypeError, match="ModelMixin"):
        sequence.enable_context_parallel(torch.nn.Linear(2, 2), 2)


def test_cp_processor_refuses_a_self_attention_mask():
    from diffusers.models.attention_processor import Attention

    attn = Attention(64, heads=4, dim_head=16)
    processor = sequence.ContextParallelAttnProcessor()
    processor._parallel_config = object()  # type: ignore[assignment]  # as enable_parallelism sets it
    with pytest.raises(ValueError, match="attention_mask"):
        processor(attn, torch.randn(1, 8, 64), attention_mask=torch.ones(1, 8))


def test_cp_processor_equals_the_default_processor_on_one_process():
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(64, heads=4, dim_head=16).eval()
    cross = Attention(64, cross_attention_dim=32, heads=4, dim_head=16).eval()
    x, text, mask = torch.randn(2, 8, 64), torch.randn(2, 5, 32), torch.ones(2, 5)
    mask[1, 3:] = 0
    ref = (attn(x), cross(x, encoder_hidden_states=text, attention_mask=mask))
    for m in (attn, cross):
        m.set_processor(sequence.ContextParallelAttnProcessor())  # type: ignore[arg-type]
    out = (attn(x), cross(x, encoder_hidden_states=text, attention_mask=mask))
    for a, b in zip(ref, out, strict=True):
        assert (a - b).abs().max().item() <= 1e-6


def test_cpu_device_count_patch_is_scoped():
    original = torch.accelerator.device_count
    with sequence._one_device_on_cpu() as patched:
        assert patched == (original() == 0)
        assert torch.accelerator.device_count() >= 1
    assert torch.accelerator.device_count is original


def test_plans_cover_the_families_diffusers_has_none_for():
    import diffusers

    for name in ("PixArtTransformer2DModel", "DiTTransformer2DModel", "LatteTransformer3DModel"):
        assert getattr(getattr(diffusers, name), "_cp_plan", None) is None
        assert name in sequence.CP_PLANS
        plan = sequence.CP_PLANS[name].plan()
        assert "pos_embed" in plan
