"""Tests for the diffusers model zoo (`tests/diffusers_zoo.py`): determinism, finite outputs of
the latent's shape, the KEEP_FP / QUANTIZE split covering every linear, and the listed sizes."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("diffusers")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from tests import diffusers_zoo as dz  # noqa: E402
from viditq_compile.graph.modules import linear_layers  # noqa: E402

NAMES = list(dz.ZOO)


def _out(model: nn.Module, kwargs: dict) -> torch.Tensor:
    with torch.no_grad():
        return dz.denoiser_output(model(**kwargs))


def _latent(kwargs: dict) -> torch.Tensor:
    x = kwargs["x"] if "x" in kwargs else kwargs["hidden_states"]
    return torch.stack(x) if isinstance(x, list) else x


def _expected_shape(latent: torch.Tensor, out: torch.Tensor) -> None:
    """Same batch and layout as the latent; only the channel count may differ (learned sigma)."""
    assert out.dim() == latent.dim(), (tuple(out.shape), tuple(latent.shape))
    assert out.shape[0] == latent.shape[0]
    if latent.dim() == 3:  # packed tokens [B, N, C]
        assert out.shape[1] == latent.shape[1]
    else:  # [B, C, (F,) H, W]
        assert out.shape[2:] == latent.shape[2:]
        assert out.shape[1] in (latent.shape[1], 2 * latent.shape[1])


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(name: str):
        if name not in cache:
            model, kwargs = dz.ZOO[name]()
            cache[name] = (model, kwargs, _out(model, kwargs))
        return cache[name]

    return get


def test_registries_agree():
    assert set(dz.ZOO) == set(dz.CLASS_NAMES) == set(dz.SIZES) == set(dz.KEEP_FP) == set(dz.QUANTIZE)
    assert len(dz.ZOO) == 21
    import diffusers

    for name, cls in dz.CLASS_NAMES.items():
        assert hasattr(diffusers, cls), cls
        assert len(dz.SIZES[name]) == 3 and len(set(dz.SIZES[name])) == 3
        assert all(len(s) == (3 if name in dz.VIDEO else 2) for s in dz.SIZES[name]), name


@pytest.mark.parametrize("name", NAMES)
def test_builder_is_deterministic(name, built):
    model_a, kwargs_a, out_a = built(name)
    assert type(model_a).__name__ == dz.CLASS_NAMES[name]
    rng_before = torch.get_rng_state()
    model_b, kwargs_b = dz.ZOO[name](seed=0)
    assert torch.equal(torch.get_rng_state(), rng_before), "builder must not consume the global RNG"
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    assert list(sd_a) == list(sd_b)
    for key in sd_a:
        assert torch.equal(sd_a[key], sd_b[key]), key
    assert _same(kwargs_a, kwargs_b)
    assert not model_b.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model_b.parameters())
    assert torch.equal(out_a, _out(model_b, kwargs_b))
    assert torch.equal(torch.get_rng_state(), rng_before), "forward must not consume the global RNG"

    model_c, kwargs_c = dz.ZOO[name](seed=1)
    assert any(v.numel() > 1 and not torch.equal(v, sd_a[k]) for k, v in model_c.state_dict().items())
    assert not torch.equal(_latent(kwargs_c), _latent(kwargs_a)), "inputs must follow the seed"


@pytest.mark.parametrize("name", NAMES)
def test_output_is_finite_and_latent_shaped(name, built):
    _, kwargs, out = built(name)
    assert torch.isfinite(out).all()
    _expected_shape(_latent(kwargs), out)


@pytest.mark.parametrize("name", NAMES)
def test_layer_lists_cover_every_linear(name, built):
    """Every linear layer: nn.Linear and the 1x1 convolutions the passes run as linears."""
    model = built(name)[0]
    linears = list(linear_layers(model))
    keep, quant = dz.KEEP_FP[name], dz.QUANTIZE[name]
    assert len(keep) == len(set(keep)) and len(quant) == len(set(quant)), "duplicate entries"
    assert not set(keep) & set(quant), set(keep) & set(quant)
    assert set(keep) | set(quant) == set(linears), (
        sorted(set(linears) - set(keep) - set(quant)), sorted(set(keep) | set(quant) - set(linears)))
    assert quant, "a DiT has compute linears"


@pytest.mark.parametrize("name", NAMES)
def test_every_size_runs(name, built):
    sizes = dz.SIZES[name]
    assert _latent(built(name)[1]).shape == _latent(dz.ZOO[name](size=sizes[0])[1]).shape, "SIZES[0] is the default"
    for size in sizes:
        model, kwargs = dz.ZOO[name](batch=1, size=size)
        latent = _latent(kwargs)
        if latent.dim() > 3:
            assert tuple(latent.shape[-len(size):]) == tuple(size)
        out = _out(model, kwargs)
        assert torch.isfinite(out).all(), size
        _expected_shape(latent, out)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_static_export_matches_docstring(name, built):
    """`torch.export` (non-strict, static shapes) works, output equal to eager, except for the
    classes in EXPORT_ERRORS, which fail with the recorded error."""
    model, kwargs, out = built(name)
    if name in dz.EXPORT_ERRORS:
        with pytest.raises(Exception, match=re.escape(dz.EXPORT_ERRORS[name])):
            torch.export.export(model, (), kwargs, strict=False)
        return
    program = torch.export.export(model, (), kwargs, strict=False)
    with torch.no_grad():
        exported = program.module()(**kwargs)[0]
    exported = torch.stack(exported) if isinstance(exported, list) else exported
    torch.testing.assert_close(exported, out, rtol=0, atol=0)
    torch.testing.assert_close(_out(model, kwargs), out, rtol=0, atol=0)  # eager unchanged by export
