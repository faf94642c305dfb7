"""The digits demo: data, the trained demo DiT and classifier (assets), sampling, arguments."""

import json
import os

import pytest
import torch

from viditq_demo import digits
from viditq_demo.digits import (
    DIT_CONFIG,
    NULL_CLASS,
    balanced_labels,
    calibration_calls,
    classifier_accuracy,
    example_call,
    load_classifier,
    load_demo_dit,
    load_digits,
    make_scheduler,
    sample,
)
from viditq_demo.digits.data import ASSETS

pytest.importorskip("diffusers")

# the FP quality check below: 20 samples (2 per digit), 10 DDIM steps, default guidance
REDUCED_STEPS = 10
REDUCED_MIN_ACCURACY = 0.8


@pytest.fixture(scope="module")
def dit():
    return load_demo_dit()


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


def test_load_digits_shapes_and_range():
    x, y = load_digits()
    assert x.shape == (1797, 1, 16, 16) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert sorted(y.unique().tolist()) == list(range(10))
    assert torch.bincount(y).min().item() >= 170
    x8, y8 = load_digits(8)
    assert x8.shape == (1797, 1, 8, 8) and torch.equal(y8, y)
    levels = (x8 + 1) * 8  # the original gray levels 0..16, exactly
    assert torch.equal(levels, levels.round()) and levels.max().item() == 16
    assert load_digits(32)[0].shape == (1797, 1, 32, 32)


def test_splits_are_disjoint_and_fixed():
    train = digits.data.split_indices("train")
    test = digits.data.split_indices("test")
    assert len(train) + len(test) == 1797 and len(test) == 360
    assert not set(train.tolist()) & set(test.tolist())
    assert torch.equal(test, digits.data.split_indices("test"))
    xt, yt = load_digits(split="test")
    xa, ya = load_digits()
    assert torch.equal(xt, xa[test]) and torch.equal(yt, ya[test])


@pytest.mark.parametrize("size", [0, 7, -16, 16.0, True, "16", None, 1000])
def test_load_digits_bad_size(size):
    with pytest.raises(ValueError, match=repr(size).replace(".", r"\.")):
        load_digits(size)


def test_load_digits_bad_split():
    with pytest.raises(ValueError, match="'validation'"):
        load_digits(split="validation")


def test_checkpoint_loads_and_matches_config(dit):
    from diffusers import DiTTransformer2DModel

    assert isinstance(dit, DiTTransformer2DModel) and not dit.training
    assert all(p.dtype == torch.float32 for p in dit.parameters())
    for key, value in DIT_CONFIG.items():
        assert dit.config[key] == value, key
    with open(os.path.join(ASSETS, "dit_config.json")) as f:
        saved = json.load(f)
    assert {k: saved[k] for k in DIT_CONFIG} == DIT_CONFIG
    # the null class exists (classifier-free guidance)
    assert dit.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings == NULL_CLASS + 1
    for name in ("dit.safetensors", "classifier.safetensors", "digits.npz"):
        assert os.path.getsize(os.path.join(ASSETS, name)) < 4 * 2**20, name
    args, kwargs = example_call()
    out = dit(*args, **kwargs)
    assert isinstance(out, tuple) and out[0].shape == kwargs["hidden_states"].shape


def test_classifier_held_out_accuracy(classifier):
    x, y = load_digits(split="test")
    assert classifier_accuracy(classifier, x, y) >= 0.95
    with torch.no_grad():
        f = classifier.features(x[:5])
    assert f.shape == (5, digits.FEATURE_DIM) and (f >= 0).all()
    with pytest.raises(ValueError, match=r"\(2, 1, 8, 8\)"):
        classifier(torch.zeros(2, 1, 8, 8))


def test_sampling_is_deterministic_per_seed(dit):
    labels = torch.tensor([3, 7, 1])
    a = sample(dit, labels, [5, 6, 7], num_steps=4)
    b = sample(dit, labels, [5, 6, 7], num_steps=4)
    assert a.shape == (3, 1, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    # a sample depends on its own (seed, label), not on the rest of the batch
    c = sample(dit, labels[[1, 0]], [6, 5], num_steps=4)
    torch.testing.assert_close(c, a[[1, 0]], atol=1e-4, rtol=0)
    assert not torch.allclose(a[0], sample(dit, labels[:1], [8], num_steps=4)[0])
    # the noise is the per-seed generator's
    torch.testing.assert_close(digits.initial_noise([5])[0],
                               torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(5)))


def test_sample_accepts_wrappers_and_schedulers(dit):
    labels, seeds = torch.tensor([2, 9]), [0, 1]
    ref = sample(dit, labels, seeds, num_steps=3)
    calls = []

    def returns_sample_attr(**kwargs):
        calls.append(sorted(kwargs))
        return dit(**{**kwargs, "return_dict": True})

    torch.testing.assert_close(sample(returns_sample_attr, labels, seeds, num_steps=3), ref)
    assert calls == [["class_labels", "hidden_states", "return_dict", "timestep"]] * 3
    torch.testing.assert_close(sample(lambda **kw: dit(**kw)[0], labels, seeds, num_steps=3), ref)
    torch.testing.assert_close(sample(dit, labels, seeds, num_steps=3, scheduler=make_scheduler(20)), ref)
    # guidance 1: the conditional half only
    batches = []
    sample(lambda **kw: batches.append(kw["hidden_states"].shape[0]) or dit(**kw), labels, seeds, num_steps=2,
           guidance_scale=1.0)
    assert batches == [2, 2]
    # one label without guidance runs as two identical rows (exported programs take batch >= 2)
    batches.clear()
    one = sample(lambda **kw: batches.append(kw["hidden_states"].shape[0]) or dit(**kw), labels[:1], seeds[:1],
                 num_steps=2, guidance_scale=1.0)
    assert batches == [2, 2] and one.shape == (1, 1, 16, 16)


def test_reduced_fp_quality(dit, classifier):
    labels = balanced_labels(2)
    images = sample(dit, labels, list(range(100, 120)), num_steps=REDUCED_STEPS)
    assert classifier_accuracy(classifier, images, labels) >= REDUCED_MIN_ACCURACY


def test_make_scheduler():
    s = make_scheduler(25)
    assert len(s.timesteps) == 25 and int(s.timesteps[0]) == 999
    assert s.timesteps.tolist() == sorted(s.timesteps.tolist(), reverse=True)


def test_calibration_and_example_calls(dit):
    calls = calibration_calls(n=3, seed=1, num_steps=4, transformer=dit)
    assert len(calls) == 4
    steps = []
    for args, kwargs in calls:
        assert args == () and sorted(kwargs) == ["class_labels", "hidden_states", "return_dict", "timestep"]
        assert kwargs["hidden_states"].shape == (6, 1, 16, 16) and kwargs["return_dict"] is False
        assert kwargs["timestep"].dtype == torch.int64 and kwargs["timestep"].shape == (6,)
        assert kwargs["class_labels"][:3].tolist() == [NULL_CLASS] * 3
        assert (kwargs["class_labels"][3:] < 10).all()
        steps.append(int(kwargs["timestep"][0]))
    assert steps == make_scheduler(4).timesteps.tolist()
    again = calibration_calls(n=3, seed=1, num_steps=4, transformer=dit)
    assert all(torch.equal(a[1]["hidden_states"], b[1]["hidden_states"]) for a, b in zip(calls, again))
    args, kwargs = example_call()
    assert args == () and kwargs["hidden_states"].shape == (4, 1, 16, 16)
    assert kwargs["class_labels"][:2].tolist() == [NULL_CLASS] * 2
    assert torch.equal(kwargs["timestep"][:2], kwargs["timestep"][2:])


@pytest.mark.parametrize("labels, seeds, match", [
    (torch.tensor([3, 11]), [0, 1], "11"),
    (torch.tensor([-1]), [0], "-1"),
    (torch.tensor([1.0, 2.0]), [0, 1], "float"),
    (torch.tensor([[1, 2]]), [0, 1], r"\(1, 2\)"),
    (torch.tensor([1, 2]), [0], "got 1"),
    (torch.tensor([1, 2]), [0, 1, 2], "got 3"),
    (torch.tensor([1, 2]), [0, 1.5], "1.5"),
    (torch.tensor([1, 2]), 7, "7"),
])
def test_sample_bad_arguments(labels, seeds, match):
    with pytest.raises(ValueError, match=match):
        sample(lambda **kw: None, labels, seeds, num_steps=2)


@pytest.mark.parametrize("kwargs, match", [
    ({"num_steps": 0}, "got 0"), ({"num_steps": 1001}, "1001"), ({"num_steps": 2.5}, "2.5"),
    ({"guidance_scale": -1.0}, "-1.0"), ({"guidance_scale": float("nan")}, "nan"),
])
def test_sample_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample(lambda **kw: None, torch.tensor([1]), [0], **kwargs)


def test_other_bad_arguments():
    with pytest.raises(ValueError, match="got 0"):
        make_scheduler(0)
    with pytest.raises(ValueError, match="got 3"):
        example_call(batch=3)
    with pytest.raises(ValueError, match="got 0"):
        calibration_calls(n=0)
    with pytest.raises(ValueError, match="got 0"):
        balanced_labels(0)


@pytest.mark.slow
def test_w8a8_samples_are_recognised(dit, classifier):
    import viditq_compile as vq

    args, kwargs = example_call()
    qm = vq.quantize(load_demo_dit(), args, kwargs, recipe="w8a8")
    labels = balanced_labels(2)
    images = sample(qm, labels, list(range(100, 120)), num_steps=REDUCED_STEPS)
    assert classifier_accuracy(classifier, images, labels) >= REDUCED_MIN_ACCURACY
