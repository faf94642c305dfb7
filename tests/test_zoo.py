"""Tests for the built-in demo DiT (`viditq_demo.demo_model`) and the test model zoo
(`tests/zoo.py`): determinism, trained-looking weights, outlier channels, export, layer lists."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.export import Dim

from tests import zoo
from viditq_demo.demo_model import (
    DemoConfig,
    add_modulation_outliers_,
    build_demo_model,
    demo_inputs,
    heavy_tailed_,
    student_t,
)

TINY = DemoConfig.tiny()


def _demo_builder(seed: int = 0, batch: int = 2):
    return build_demo_model(TINY, seed=seed), demo_inputs(TINY, batch=batch, seed=seed)


BUILDERS = {**zoo.ALL_BUILDERS, "demo": _demo_builder}


def _out(model: nn.Module, kwargs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**kwargs)[0]


def _kurtosis(x: torch.Tensor) -> float:
    x = x.detach().double().flatten()
    x = x - x.mean()
    return float((x**4).mean() / (x**2).mean() ** 2)


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.fixture(scope="module")
def built():
    """One (model, kwargs, eager output) per builder, shared by the read-only tests."""
    cache = {}

    def get(name: str):
        if name not in cache:
            model, kwargs = BUILDERS[name]()
            cache[name] = (model, kwargs, _out(model, kwargs))
        return cache[name]

    return get


# --------------------------------------------------------------------------------------------
# determinism and weights
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILDERS)
def test_builder_is_deterministic(name, built):
    model_a, kwargs_a, out_a = built(name)
    rng_before = torch.get_rng_state()
    model_b, kwargs_b = BUILDERS[name](seed=0)
    assert torch.equal(torch.get_rng_state(), rng_before), "builder must not consume the global RNG"
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    assert list(sd_a) == list(sd_b)
    for key in sd_a:
        assert torch.equal(sd_a[key], sd_b[key]), key
    for key, value in kwargs_a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, kwargs_b[key]), key
        else:
            assert value == kwargs_b[key], key
    assert not model_b.training
    assert torch.equal(out_a, _out(model_b, kwargs_b))
    assert torch.isfinite(out_a).all()

    model_c, _ = BUILDERS[name](seed=1)
    differs = [k for k, v in model_c.state_dict().items() if v.numel() > 1 and not torch.equal(v, sd_a[k])]
    assert differs, "a different seed must give different weights"


@pytest.mark.parametrize("name", BUILDERS)
def test_weights_are_heavy_tailed(name, built):
    model = built(name)[0]
    biggest = max(_linears(model).values(), key=lambda m: m.weight.numel())
    assert biggest.weight.numel() >= 8192
    assert _kurtosis(biggest.weight) > 3.5  # uniform default init: 1.8, Gaussian: 3


def test_heavy_tailed_keeps_default_scale():
    layer = nn.Linear(512, 384)
    default_std = float(layer.weight.detach().std())
    heavy_tailed_(layer, torch.Generator().manual_seed(0))
    assert abs(float(layer.weight.detach().std()) / default_std - 1) < 0.1
    assert _kurtosis(layer.weight) > 4.5
    assert float(layer.bias.detach().abs().max()) < 0.2


def test_student_t_rejects_infinite_variance():
    with pytest.raises(ValueError, match="df=2"):
        student_t((4,), 2, torch.Generator())


# --------------------------------------------------------------------------------------------
# demo model: outliers, equivalence with diffusers, export
# --------------------------------------------------------------------------------------------


def test_demo_has_outlier_channels(built):
    model, kwargs, _ = built("demo")
    inputs = {}
    hooks = [
        block.attn1.to_q.register_forward_hook(lambda mod, args, out, i=i: inputs.__setitem__(i, args[0]))
        for i, block in enumerate(model.transformer_blocks)
    ]
    try:
        _out(model, kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(inputs) == TINY.num_layers
    for i, x in inputs.items():
        absmax = x.abs().amax(dim=(0, 1))  # per input channel
        ratio = absmax / absmax.median()
        assert int((ratio >= 10).sum()) >= TINY.num_outlier_channels, (i, ratio.topk(4).values)
        assert int((ratio >= 10).sum()) <= TINY.num_outlier_channels + 1, i


def test_demo_outliers_can_be_disabled():
    plain = build_demo_model(DemoConfig(num_outlier_channels=0), seed=0)
    table = plain.transformer_blocks[0].scale_shift_table
    assert float(table.detach().abs().max()) < 1.0


def test_add_modulation_outliers_on_stdit3():
    model, kwargs = zoo.build_stdit3_block()
    channels = add_modulation_outliers_(
        model, torch.Generator().manual_seed(0), num_channels=3, timestep_linear=model.t_block[1]
    )
    assert channels.shape == (3,)
    for block in (*model.spatial_blocks, *model.temporal_blocks):
        assert (block.scale_shift_table[1, channels] + 1 >= 15).all()
    assert torch.isfinite(_out(model, kwargs)).all()


def test_demo_matches_diffusers_pixart(built):
    from diffusers import PixArtTransformer2DModel

    model, kwargs, out = built("demo")
    pixart = PixArtTransformer2DModel(
        num_attention_heads=TINY.num_attention_heads,
        attention_head_dim=TINY.attention_head_dim,
        in_channels=TINY.in_channels,
        out_channels=TINY.out_channels,
        num_layers=TINY.num_layers,
        cross_attention_dim=TINY.hidden_size,
        sample_size=TINY.sample_size,
        patch_size=TINY.patch_size,
        caption_channels=TINY.caption_channels,
        use_additional_conditions=False,
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    ).eval()
    assert list(model.state_dict()) == list(pixart.state_dict())
    pixart.load_state_dict(model.state_dict())
    torch.testing.assert_close(_out(pixart, kwargs), out, rtol=1e-5, atol=1e-5)
    # same layer names as the PixArt zoo entry
    assert set(_linears(model)) == set(zoo.KEEP_FP["pixart"]) | set(zoo.QUANTIZE["pixart"])


def test_demo_return_dict(built):
    model, kwargs, out = built("demo")
    with torch.no_grad():
        result = model(**{**kwargs, "return_dict": True})
    assert torch.equal(result.sample, out)


def test_demo_inputs_layout():
    kwargs = demo_inputs(TINY, batch=4, seed=3, caption_length=5)
    assert kwargs["hidden_states"].shape == (4, 4, 16, 16)
    assert kwargs["encoder_hidden_states"].shape == (4, 5, 64)
    t = kwargs["timestep"]
    assert t.dtype == torch.float32 and t.shape == (4,)
    assert (t >= 0).all() and (t < 1000).all() and float(t.max() - t.min()) > 500
    assert kwargs["return_dict"] is False


def test_demo_exports_with_dynamic_batch_text_and_size(built):
    model, kwargs, out = built("demo")
    batch, text = Dim("batch", min=1, max=64), Dim("text", min=1, max=512)
    hh, ww = Dim("hh", min=2, max=128), Dim("ww", min=2, max=128)
    dynamic_shapes = {
        "hidden_states": {0: batch, 2: 2 * hh, 3: 2 * ww},
        "encoder_hidden_states": {0: batch, 1: text},
        "timestep": {0: batch},
        "return_dict": None,
    }
    program = torch.export.export(model, (), kwargs, dynamic_shapes=dynamic_shapes)
    module = program.module()
    torch.testing.assert_close(_out(module, kwargs), out, rtol=0, atol=1e-6)
    for b, length, h, w in [(1, 5, 16, 16), (3, 77, 16, 16), (2, 3, 24, 40)]:
        other = demo_inputs(TINY, batch=b, seed=7, caption_length=length)
        other["hidden_states"] = torch.randn(b, TINY.in_channels, h, w)
        torch.testing.assert_close(_out(module, other), _out(model, other), rtol=1e-5, atol=1e-5)


def test_demo_accepts_integer_timesteps(built):
    model, kwargs, _ = built("demo")
    as_int = {**kwargs, "timestep": kwargs["timestep"].round().long()}
    as_float = {**kwargs, "timestep": kwargs["timestep"].round()}
    assert torch.equal(_out(model, as_int), _out(model, as_float))


def test_demo_preset_shapes():
    cfg = DemoConfig.demo()
    assert (cfg.num_layers, cfg.hidden_size, cfg.sample_size // cfg.patch_size) == (8, 384, 16)
    with torch.device("meta"):
        from viditq_demo.demo_model import DemoDiT

        n_params = sum(p.numel() for p in DemoDiT(cfg).parameters())
    assert 15e6 < n_params < 25e6


@pytest.mark.parametrize(
    ("overrides", "bad"),
    [
        ({"sample_size": 15}, "sample_size=15"),
        ({"num_attention_heads": 3, "attention_head_dim": 5}, "hidden_size=15"),
        ({"num_layers": 0}, "num_layers=0"),
        ({"patch_size": -2}, "patch_size=-2"),
        ({"caption_channels": 8.0}, "caption_channels=8.0"),
        ({"num_outlier_channels": 65}, "num_outlier_channels=65"),
        ({"outlier_scale": (30.0, 10.0)}, r"outlier_scale=\(30.0, 10.0\)"),
    ],
)
def test_demo_config_rejects_bad_values(overrides, bad):
    with pytest.raises(ValueError, match=bad):
        DemoConfig(**overrides)


def test_bad_demo_arguments():
    with pytest.raises(ValueError, match="batch=0"):
        demo_inputs(TINY, batch=0)
    with pytest.raises(ValueError, match="config="):
        build_demo_model({"num_layers": 2})


# --------------------------------------------------------------------------------------------
# zoo: export and layer lists
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILDERS)
def test_exports_and_matches_eager(name, built):
    model, kwargs, out = built(name)
    program = torch.export.export(model, (), kwargs)
    torch.testing.assert_close(_out(program.module(), kwargs), out, rtol=1e-6, atol=1e-6)
    # every nn.Linear appears as an aten.linear whose weight is that module's parameter (DiT calls
    # transformer_blocks.0.norm1.emb twice: once in block 0, once for the final modulation)
    params = program.graph_signature.inputs_to_parameters
    weights = {
        params[node.args[1].name]
        for node in program.graph.nodes
        if node.target is torch.ops.aten.linear.default
    }
    assert weights == {f"{fqn}.weight" for fqn in _linears(model)}


@pytest.mark.parametrize("name", zoo.ALL_BUILDERS)
def test_layer_lists_cover_every_linear_once(name, built):
    linears = _linears(built(name)[0])
    keep, quant = zoo.KEEP_FP[name], zoo.QUANTIZE[name]
    listed = keep + quant
    assert len(listed) == len(set(listed)), "duplicate FQN"
    assert not set(keep) & set(quant)
    assert set(listed) == set(linears), (sorted(set(linears) - set(listed)), sorted(set(listed) - set(linears)))
    assert keep and quant


def test_zoo_registry():
    assert list(zoo.ZOO) == ["pixart", "dit", "latte", "flux"]
    assert set(zoo.KEEP_FP) == set(zoo.QUANTIZE) == set(zoo.ALL_BUILDERS)
