"""Resolution buckets: a model whose code pins latent H/W (diffusers' PixArt: PatchEmbed's position
table) gets one program per resolution, all from one plan, sharing one copy of the weights; a call
runs on the bucket that takes it, bit-exact with a program quantized alone at that size by the same
plan; a size no bucket takes is refused naming every bucket and how to add one; the buckets
survive save/load (format 3) and a tampered bucket artifact is refused."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import viditq_compile as vq
from tests import zoo
from tests.io.hostile_artifacts import resum
from viditq_compile.io.artifact import BUCKETS_VERSION
from viditq_compile.numerics.quant import sqnr_db
from viditq_demo.demo_model import DemoConfig, build_demo_model, demo_inputs

WIDE = (16, 24)  # (H, W) of the second bucket; the first is the zoo's 16 x 16


def _at(kwargs: dict, h: int, w: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(kwargs, hidden_states=torch.randn(2, 4, h, w, generator=g))


@pytest.fixture(scope="module")
def pixart():
    model, kwargs = zoo.build_pixart()
    calls = [((), _at(kwargs, 16, 16, seed=s)) for s in (3, 4)]
    qm = vq.quantize(model, (), kwargs, recipe="w4a8", calibration=calls,
                     buckets=[((), _at(kwargs, *WIDE))])
    return model, kwargs, qm


@pytest.fixture(scope="module")
def saved(pixart, tmp_path_factory):
    _, _, qm = pixart
    path = tmp_path_factory.mktemp("buckets") / "art"
    qm.save(path)
    return path


def _run(qm, kwargs):
    with torch.no_grad():
        return qm(**kwargs)[0]


def test_each_bucket_runs_its_resolution_as_a_program_quantized_alone_would(pixart):
    model, kwargs, qm = pixart
    assert len(qm.programs) == 2
    alone = vq.quantize(model, (), _at(kwargs, *WIDE), plan=qm.plan)
    for h, w in ((16, 16), WIDE):
        call = _at(kwargs, h, w, seed=7)
        assert _run(qm, call).shape == (2, 8, h, w)
    call = _at(kwargs, *WIDE, seed=7)
    assert torch.equal(_run(qm, call), _run(alone, call))


def test_the_buckets_hold_one_copy_of_the_weights(pixart):
    model, kwargs, qm = pixart
    one = vq.quantize(model, (), kwargs, plan=qm.plan)
    assert qm.weight_bytes == one.weight_bytes
    # the balanced (rotated) weights are recomputed by each capture: shared by value
    names = [k for k in qm.programs[1].state_dict if k.endswith("viditq_w_q")]
    assert names and all(qm.programs[1].state_dict[k] is qm.programs[0].state_dict[k] for k in names)


def test_a_size_no_bucket_takes_names_every_bucket_and_how_to_add_one(pixart):
    model, kwargs, qm = pixart
    with pytest.raises(vq.InputShapeError) as e:
        _run(qm, _at(kwargs, 24, 24))
    text = str(e.value)
    assert "none of the 2 resolution buckets" in text
    assert "bucket 0: hidden_states dim 2 (H) is 24" in text and "bucket 1:" in text
    assert "qm.add_bucket(model, args, kwargs)" in text


def test_add_bucket_refuses_a_call_a_bucket_already_takes(pixart):
    model, kwargs, qm = pixart
    with pytest.raises(ValueError, match="already takes"):
        qm.add_bucket(model, (), _at(kwargs, *WIDE, seed=9))
    with pytest.raises(TypeError, match="args must be a tuple"):
        qm.add_bucket(model, [], kwargs)  # type: ignore[arg-type]


def test_buckets_on_a_model_that_pins_nothing_are_refused():
    cfg = DemoConfig.tiny()
    model = build_demo_model(cfg, seed=0)
    kwargs = demo_inputs(cfg, batch=2)
    other = dict(kwargs, hidden_states=torch.randn(2, cfg.in_channels, 24, 16))
    with pytest.raises(ValueError, match=r"buckets\[0\]: the program already takes"):
        vq.quantize(model, (), kwargs, buckets=[((), other)])


@pytest.mark.parametrize("bad, match", [
    ("not a list", "buckets must be a list"),
    ([({}, {})], r"buckets\[0\] must be an \(args tuple, kwargs dict\) pair"),
    ([((), {})] * 64, "at most 63"),
])
def test_buckets_argument_is_validated(bad, match):
    with pytest.raises((TypeError, ValueError), match=match):
        vq.quantize(torch.nn.Linear(4, 4), (torch.randn(2, 4),), buckets=bad)


def test_save_load_keeps_every_bucket_bit_exact_and_shared(pixart, saved):
    _, kwargs, qm = pixart
    manifest = json.loads((saved / "manifest.json").read_text())
    assert manifest["version"] == BUCKETS_VERSION
    assert manifest["programs"] == ["program.pt2", "program.1.pt2"]
    keys = load_file(str(saved / "weights.safetensors"))
    assert not any(k.startswith("bucket1/") and k.endswith("viditq_w_q") for k in keys)
    loaded = vq.load(saved)
    assert len(loaded.programs) == 2
    assert loaded.weight_bytes == qm.weight_bytes
    for h, w in ((16, 16), WIDE):
        call = _at(kwargs, h, w, seed=5)
        assert torch.equal(_run(loaded, call), _run(qm, call))
    assert "2 resolution buckets" in (saved / "report.txt").read_text()


@pytest.fixture
def copy(saved, tmp_path):
    path = tmp_path / "art"
    shutil.copytree(saved, path)
    return path


def _refused(path, match):
    with pytest.raises(vq.ArtifactError, match=match):
        vq.load(path)


@pytest.mark.parametrize("programs, match", [
    (["program.pt2", "weights.safetensors"], "expected"),
    (["program.pt2", "../program.1.pt2"], "expected"),
    (["program.pt2"], "2 to 64"),
    ("program.pt2", "2 to 64"),
])
def test_a_tampered_program_list_is_refused(copy, programs, match):
    resum(copy, programs=programs)
    _refused(copy, match)


def test_a_program_list_in_a_format_2_manifest_is_refused(copy):
    resum(copy, version=2)
    _refused(copy, "'programs' is a format-3 key")


def test_a_bucket_weight_for_no_bucket_or_read_by_none_is_refused(copy):
    w = load_file(str(copy / "weights.safetensors"))
    save_file({**w, "bucket7/state_dict/evil": torch.zeros(1)}, str(copy / "weights.safetensors"))
    resum(copy)
    _refused(copy, "bucket 7, but the artifact has 2")
    save_file({**w, "bucket1/state_dict/evil": torch.zeros(1)}, str(copy / "weights.safetensors"))
    resum(copy)
    _refused(copy, "no program reads")


def test_a_bucket_weight_of_the_wrong_shape_is_refused(copy):
    w = load_file(str(copy / "weights.safetensors"))
    name = next(k for k in w if k.startswith("state_dict/") and k.endswith("viditq_w_q"))
    w[f"bucket1/{name}"] = torch.zeros(3, 3, dtype=torch.int8)
    save_file(w, str(copy / "weights.safetensors"))
    resum(copy)
    _refused(copy, "program.1.pt2")


@pytest.mark.slow
def test_compile_keeps_the_dispatch_and_each_bucket_matches_eager(pixart):
    _, kwargs, qm = pixart
    compiled = qm.compile()
    for h, w in ((16, 16), WIDE):
        call = _at(kwargs, h, w, seed=11)
        with torch.no_grad():
            got = compiled(**call)[0]
        # Inductor reorders float epilogues: an activation may round to the next integer step
        assert sqnr_db(_run(qm, call), got) > 40
    with pytest.raises(vq.InputShapeError, match="none of the 2 resolution buckets"):
        compiled(**_at(kwargs, 24, 24))


@pytest.mark.parametrize("short", ["chroma", pytest.param("mochi", marks=pytest.mark.slow)])
def test_a_batch_size_the_model_pins_gets_a_bucket_of_its_own(short):
    """Chroma's and Mochi's code pins the batch of the example: a batch-3 bucket beside the batch-2
    program, as a program quantized alone at batch 3 by the same plan, with the weights shared."""
    dz = pytest.importorskip("tests.diffusers_zoo")
    build = getattr(dz, f"build_{short}")
    model, kwargs = build(seed=0)
    _, three = build(seed=0, batch=3)
    qm = vq.quantize(model, (), kwargs, recipe="w8a8")
    with pytest.raises(vq.InputShapeError, match="add a resolution bucket|add_bucket"):
        qm(**three)
    assert qm.add_bucket(model, (), three) == 1
    alone = vq.quantize(model, (), three, plan=qm.plan)
    with torch.no_grad():
        assert torch.equal(dz.denoiser_output(qm(**three)), dz.denoiser_output(alone(**three)))
        assert dz.denoiser_output(qm(**kwargs)).shape[0] == 2
    assert qm.weight_bytes < 1.01 * alone.weight_bytes
