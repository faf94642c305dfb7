"""``viditq generate``: a saved diffusers pipeline sampled in floating point and quantized from one
seed; per-step latency of both, SQNR of the pictures (and final latents where the pipeline hands
them to a step callback), the pictures side by side as PNG. Hostile directories and arguments fail
with one ``viditq: error:`` line naming the bad value, before anything runs."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import struct

import pytest

from tests import tiny_pipelines
from viditq_compile.cli import main

pytest.importorskip("diffusers")

STEPS = 3


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _png_size(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    w, h = struct.unpack(">II", head[16:24])
    return w, h


def _sqnr(text: str, what: str) -> float:
    m = re.search(rf"{what} ([\d.]+|inf) dB", text)
    assert m, text
    return float(m.group(1))


def _step_rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if re.match(r"\s+\d+\s", line)]


def _save(tmp_path_factory, name: str):
    if name == "pixart":
        pipe, kwargs = tiny_pipelines.build_pixart_sigma(text_encoder=True)
    else:
        pipe, kwargs = tiny_pipelines.BUILDERS[name]()
    path = tmp_path_factory.mktemp(name) / "pipe"
    pipe.save_pretrained(path)
    return str(path), kwargs


def _argv(path: str, name: str, kwargs: dict, out) -> list[str]:
    argv = ["generate", "--pipeline", path, "--steps", str(STEPS), "--seed", "3", "--out", str(out)]
    if name == "dit":
        argv += ["--class-label", "1", "--class-label", "7"]
    else:
        for p in tiny_pipelines.PROMPTS:
            argv += ["--prompt", p]
        argv += ["--height", str(kwargs["height"]), "--width", str(kwargs["width"])]
    if "num_frames" in kwargs:
        argv += ["--frames", str(kwargs["num_frames"])]
    return argv


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    return _save(tmp_path_factory, "dit")[0]


# SQNR floors (w8a8, 3 steps, seed 3), 5 dB under what was measured: the pictures (pixart 63.2,
# dit 43.0, flux 80.8, sd3 69.4, sana 43.4, wan 22.9: the tiny Wan VAE amplifies the differences)
# and the final latents where the pipeline hands them to a step callback (pixart 50.3, flux 68.0,
# sd3 57.5, sana 42.9, wan 51.4)
PICTURE_DB = {"pixart": 58.0, "dit": 38.0, "flux": 75.0, "sd3": 64.0, "sana": 38.0, "wan": 18.0}
LATENT_DB = {"pixart": 45.0, "flux": 63.0, "sd3": 52.0, "sana": 38.0, "wan": 46.0}


@pytest.mark.parametrize("name", ["pixart", "dit",
                                  *(pytest.param(n, marks=pytest.mark.slow) for n in ("flux", "sd3", "sana", "wan"))])
def test_generate_samples_fp_and_quantized_and_writes_them_side_by_side(tmp_path_factory, name):
    path, kwargs = _save(tmp_path_factory, name)
    out = tmp_path_factory.mktemp(f"{name}-out")
    code, text, err = _run(_argv(path, name, kwargs, out))
    assert code == 0, err
    rows = _step_rows(text)
    assert [r[0] for r in rows] == [str(i) for i in range(STEPS)], text
    calls = 2 if name == "wan" else 1  # Wan: guidance as two calls a step; the others one batched call
    assert all(r[2] == str(calls) and r[-1].endswith("x") for r in rows), text
    assert "quantized the transformer (w8a8)" in text and "linear layers quantized" in text
    assert _sqnr(text, "pictures") > PICTURE_DB[name]
    if name == "dit":
        assert "final latents not compared: DiTPipeline takes no step callback" in text
    else:
        assert _sqnr(text, "final latents") > LATENT_DB[name]
    pngs = sorted(os.listdir(out))
    assert pngs == ["sample-0.png", "sample-1.png"]
    h, w = (kwargs.get("height"), kwargs.get("width")) if name != "dit" else (8, 8)
    frames = (kwargs["num_frames"] if name == "wan" else 1)
    assert _png_size(out / "sample-0.png") == (2 * w + 2, frames * h + (frames - 1) * 2)


def _error(argv, capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("viditq: error: "), err
    return lines[-1]


def _edited(dit_dir: str, tmp_path, edit) -> str:
    path = tmp_path / "pipe"
    shutil.copytree(dit_dir, path)
    index = json.loads((path / "model_index.json").read_text())
    edit(index, path)
    (path / "model_index.json").write_text(json.dumps(index))
    return str(path)


def test_generate_refuses_what_is_no_pipeline_directory(tmp_path, capsys, dit_dir):
    assert "not found" in _error(["generate", "--pipeline", str(tmp_path / "nope"), "--class-label", "1"], capsys)
    (tmp_path / "file").write_text("x")
    assert "a file" in _error(["generate", "--pipeline", str(tmp_path / "file"), "--class-label", "1"], capsys)
    msg = _error(["generate", "--pipeline", os.path.join(dit_dir, "transformer"), "--class-label", "1"], capsys)
    assert "no model_index.json" in msg and "viditq quantize --model" in msg
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model_index.json").write_text("[1, 2")
    assert "model_index.json" in _error(["generate", "--pipeline", str(tmp_path / "bad"), "--class-label", "1"],
                                        capsys)


def _custom_class(index, path):
    index["_class_name"] = ["pipeline", "EvilPipeline"]


def _unknown_class(index, path):
    index["_class_name"] = "EvilPipeline"


def _not_a_pipeline(index, path):
    index["_class_name"] = "DiTTransformer2DModel"


def _local_module(index, path):
    index["transformer"] = ["evil_module", "EvilTransformer"]


def _link_out(index, path):
    shutil.rmtree(path / "vae")
    os.symlink(os.path.realpath(path / ".." / ".."), path / "vae")


@pytest.mark.parametrize("edit, message", [
    (_custom_class, "custom pipelines are not loaded"),
    (_unknown_class, "'EvilPipeline' is not a class of diffusers"),
    (_not_a_pipeline, "'DiTTransformer2DModel' is not a diffusers pipeline class"),
    (_local_module, "comes from 'evil_module'"),
    (_link_out, "leads outside the pipeline directory"),
])
def test_generate_never_runs_code_from_the_directory(dit_dir, tmp_path, capsys, edit, message):
    path = _edited(dit_dir, tmp_path, edit)
    marker = tmp_path / "ran"
    for code_file in ("pipeline.py", "evil_module.py"):
        (tmp_path / "pipe" / code_file).write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                                   "class EvilPipeline: pass\nclass EvilTransformer: pass\n")
    assert message in _error(["generate", "--pipeline", path, "--class-label", "1"], capsys)
    assert not marker.exists()


def test_generate_loads_safetensors_only(tmp_path, capsys):
    pipe, _ = tiny_pipelines.build_dit()
    pipe.save_pretrained(tmp_path / "pipe", safe_serialization=False)  # pickled .bin weights
    msg = _error(["generate", "--pipeline", str(tmp_path / "pipe"), "--class-label", "1"], capsys)
    assert "cannot load DiTPipeline" in msg and "safetensors" in msg


def test_generate_refuses_a_pipeline_without_a_transformer(tmp_path, capsys):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 8), layers_per_block=1,
                       norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "pipe")
    msg = _error(["generate", "--pipeline", str(tmp_path / "pipe"), "--class-label", "1"], capsys)
    assert "DDPMPipeline" in msg and "no transformer" in msg


@pytest.mark.parametrize("extra, message", [
    (["--recipe", "w9a9"], "unknown recipe 'w9a9'"),
    (["--prompt", "a cat"], "DiTPipeline takes class labels, not prompts"),
    (["--class-label", "1000"], "--class-label 1000: DiTPipeline has classes 0..999"),
    (["--class-label", "1", "--height", "16"], "--height: DiTPipeline takes no height"),
    (["--class-label", "1", "--prompt", "a"], "not both"),
    ([], "DiTPipeline needs --class-label N"),
])
def test_generate_refuses_bad_arguments_with_the_value_named(dit_dir, capsys, extra, message):
    assert message in _error(["generate", "--pipeline", dit_dir, *extra], capsys)


@pytest.mark.parametrize("extra, message", [
    (["--steps", "0"], "--steps: must be >= 1, got 0"),
    (["--steps", "many"], "--steps: expected an integer, got 'many'"),
    (["--class-label", "-1"], "--class-label: must be >= 0, got -1"),
    (["--dtype", "int8"], "--dtype: invalid choice: 'int8'"),
])
def test_generate_argument_types_are_checked_by_the_parser(dit_dir, capsys, extra, message):
    code = main(["generate", "--pipeline", dit_dir, "--class-label", "1", *extra])
    assert code == 2
    assert message in capsys.readouterr().err
