"""Latent sizes through ``vq.quantize``: a model that allows any H/W (the demo DiT) runs its
quantized program at other latent sizes and batch sizes; a model that pins H/W (diffusers'
PixArt, whose PatchEmbed pins them) refuses another size with ``InputShapeError`` naming the
dimension; both survive save/load."""

import pytest
import torch

import viditq_compile as vq
from tests import zoo
from viditq_compile.numerics.quant import sqnr_db
from viditq_compile.program import InputShapeError
from viditq_demo.demo_model import DemoConfig, build_demo_model, demo_inputs

TINY = DemoConfig.tiny()
SIZES = ((16, 16), (24, 16), (8, 32))  # (H, W) of the latent; captured at 16 x 16


@pytest.fixture(scope="module")
def demo():
    model = build_demo_model(TINY, seed=0)
    return model, vq.quantize(model, (), demo_inputs(TINY, batch=2), recipe="w8a8")


@pytest.fixture(scope="module")
def pixart():
    model, kwargs = zoo.build_pixart()
    return model, kwargs, vq.quantize(model, (), kwargs, recipe="w8a8")


def _demo_call(batch: int, h: int, w: int) -> dict:
    kwargs = demo_inputs(TINY, batch=batch, seed=1)
    kwargs["hidden_states"] = torch.randn(batch, TINY.in_channels, h, w, generator=torch.Generator().manual_seed(h * w))
    return kwargs


def _check_runs_at_other_sizes(model, qm):
    for batch in (2, 3):
        for h, w in SIZES:
            kwargs = _demo_call(batch, h, w)
            with torch.no_grad():
                ref, out = model(**kwargs)[0], qm(**kwargs)[0]
            assert out.shape == (batch, TINY.out_channels, h, w)
            assert sqnr_db(ref, out) > 25, (batch, h, w)


def test_dynamic_hw_runs_at_other_latent_sizes_and_batches(demo):
    model, qm = demo
    _check_runs_at_other_sizes(model, qm)
    dynamic = qm.input_shapes.dynamic()["hidden_states"]
    assert set(dynamic) == {0, 2, 3}  # B, H, W; channels are fixed by the patch embedding
    assert qm.input_shapes.fixed()["hidden_states"] == {1: TINY.in_channels}


def test_pinned_hw_is_refused_naming_the_dimension(pixart):
    model, kwargs, qm = pixart
    assert qm.input_shapes.fixed()["hidden_states"] == {1: 4}
    assert qm.input_shapes.dynamic()["hidden_states"] == {0: "any size", 2: "16 to 17", 3: "16 to 17"}
    with pytest.raises(InputShapeError) as e:
        qm(**dict(kwargs, hidden_states=torch.randn(2, 4, 16, 24)))
    text = str(e.value)
    assert isinstance(e.value, ValueError)
    assert text.startswith("hidden_states dim 3 (W) is 24 (shape [2, 4, 16, 24]), but this program takes "
                           "16 to 17 there")
    assert "quantize again with an example call at that size" in text
    assert "Guard failed" not in text
    with pytest.raises(InputShapeError, match=r"hidden_states dim 2 \(H\) is 32"):
        qm(**dict(kwargs, hidden_states=torch.randn(2, 4, 32, 16)))


def test_pinned_hw_still_takes_another_batch(pixart):
    model, kwargs, qm = pixart
    call = {k: torch.cat([v, v[:1]]) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    with torch.no_grad():
        assert sqnr_db(model(**call)[0], qm(**call)[0]) > 25


def test_save_and_load_keep_the_dynamic_dims_and_the_error(demo, pixart, tmp_path):
    model, qm = demo
    qm.save(tmp_path / "demo")
    loaded = vq.load(tmp_path / "demo")
    assert str(loaded.input_shapes) == str(qm.input_shapes)
    _check_runs_at_other_sizes(model, loaded)

    _, kwargs, qp = pixart
    qp.save(tmp_path / "pixart")
    loaded = vq.load(tmp_path / "pixart")
    assert str(loaded.input_shapes) == str(qp.input_shapes)
    with pytest.raises(InputShapeError, match=r"^hidden_states dim 3 \(W\) is 24 .* takes 16 to 17 there"):
        loaded(**dict(kwargs, hidden_states=torch.randn(2, 4, 16, 24)))
