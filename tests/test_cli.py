"""``viditq`` command line: quantize (built-in and diffusers models), load, and its errors."""

import contextlib
import io
import json
import re
import subprocess
import sys

import pytest
import torch

import viditq_compile as vq
from viditq_compile.cli import Timing, default_out, format_latency, main


def _sqnrs(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"([\d.]+) dB", text)]


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    """One `viditq quantize --model tiny --no-bench` run, shared by the tests that read it
    (capsys is function-scoped, so output is captured by hand)."""
    out = tmp_path_factory.mktemp("cli") / "tiny-w8a8"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["quantize", "--model", "tiny", "--out", str(out), "--no-bench"])
    torch._dynamo.reset()
    return code, stdout.getvalue(), stderr.getvalue(), out


def test_quantize_tiny_prints_report_quality_and_writes_artifact(tiny_artifact):
    code, out, err, path = tiny_artifact
    assert code == 0, err
    assert "transformer_blocks.0.attn1.to_q" in out and "viditq.w8a8_linear" in out
    assert "20 of 26 linear layers quantized" in out
    sqnrs = _sqnrs(out)
    assert len(sqnrs) == 2 and min(sqnrs) > 30, out  # example inputs and batch-3 inputs
    assert "(batch 3, seed 1)" in out
    assert "cosine" in out and re.search(r"compression [\d.]+x", out)
    assert "latency" not in out  # --no-bench
    assert "artifact verified" in out and str(path) in out
    loaded = vq.load(path)
    assert loaded.report.num_quantized == 20


def test_load_prints_the_report_of_an_artifact(tiny_artifact, capsys):
    _, _, _, path = tiny_artifact
    assert main(["load", str(path)]) == 0
    out = capsys.readouterr().out
    assert "20 of 26 linear layers quantized" in out


@pytest.mark.slow  # two cold Inductor compiles: ~30 s on 2 cores
def test_quantize_with_bench_prints_latency_table(tmp_path, capsys):
    code = main(["quantize", "--model", "tiny", "--out", str(tmp_path / "a"), "--repeats", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "latency (batch 2" in out
    for row in ("fp32 eager", "fp32 torch.compile (inductor)", "w8a8 qm.compile() (viditq)"):
        assert re.search(re.escape(row) + r"\s+[\d.]+ ms\s+[\d.]+x", out), row
    assert "artifact verified" in out


def test_latency_table_is_aligned_with_speedups():
    table = format_latency([Timing("fp32 eager", 0.120), Timing("fp32 torch.compile", 0.100, 15.0),
                            Timing("w8a8 qm.compile() (viditq)", 0.080, 12.04)])
    lines = table.splitlines()
    assert "compile (cold)" in lines[0] and len({len(line) for line in lines}) == 1
    assert lines[2].split()[-4:] == ["120.0", "ms", "1.00x", "-"]  # eager: no compile time
    assert lines[4].split()[-5:] == ["80.0", "ms", "1.50x", "12.0", "s"]


def test_a_quantized_program_slower_than_inductor_gets_a_note_naming_its_largest_layer():
    from types import SimpleNamespace

    from viditq_compile.cli import slow_note
    from viditq_compile.report.tables import LayerReport

    rows = [LayerReport("a", 128, 512, 8, 8, "viditq.qlinear"), LayerReport("b", 256, 128, None, None, "aten.linear")]
    qm = SimpleNamespace(report=SimpleNamespace(rows=rows))
    fast = [Timing("eager", 0.010), Timing("inductor", 0.008, 1.0), Timing("viditq", 0.006, 1.0)]
    slow = [Timing("eager", 0.010), Timing("inductor", 0.008, 1.0), Timing("viditq", 0.009, 1.0)]
    assert slow_note(qm, fast) == ""
    note = slow_note(qm, slow)
    assert "not faster than fp32 Inductor" in note and "512 x 128" in note
    assert "--model demo" in note
    wide = [LayerReport("w", 1152, 4608, 8, 8, "viditq.qlinear")]
    assert "--model demo" not in slow_note(SimpleNamespace(report=SimpleNamespace(rows=wide)), slow)
    assert "no layer is quantized" in slow_note(SimpleNamespace(report=SimpleNamespace(rows=rows[1:])), slow)


def test_fp_recipe_quantizes_nothing(tmp_path, capsys):
    code = main(["quantize", "--model", "tiny", "--recipe", "fp", "--no-bench",
                 "--out", str(tmp_path / "fp")])
    out = capsys.readouterr().out
    assert code == 0
    assert "0 of 26 linear layers quantized" in out
    assert min(_sqnrs(out)) > 100  # only decomposition rounding differs from eager


def test_mixed_precision_recipe_searches_on_the_calibration_calls(tmp_path, capsys):
    code = main(["quantize", "--model", "tiny", "--recipe", "w4a8-mp", "--calibration", "2",
                 "--no-bench", "--out", str(tmp_path / "mp")])
    out = capsys.readouterr().out
    assert code == 0
    assert "viditq search" in out and "achieved: weight_bits" in out
    assert min(_sqnrs(out)) > 10
    code = main(["quantize", "--model", "tiny", "--recipe", "w4a8-mp", "--no-bench",
                 "--calibration", str(tmp_path / "stats.safetensors"), "--out", str(tmp_path / "x")])
    assert code == 2 and "give a number of calls" in capsys.readouterr().err


def test_balance_search_recipe_searches_on_the_calibration_calls(tmp_path, capsys):
    code = main(["quantize", "--model", "tiny", "--recipe", "w8a8-search", "--calibration", "2",
                 "--no-bench", "--out", str(tmp_path / "bs")])
    out = capsys.readouterr().out
    assert code == 0
    assert "balance search:" in out and min(_sqnrs(out)) > 10
    code = main(["quantize", "--model", "tiny", "--recipe", "w8a8-search", "--no-bench",
                 "--calibration", str(tmp_path / "stats.safetensors"), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "searches the balancing per layer" in err and "give a number of calls" in err


def test_bad_recipe_exits_2_naming_it(tmp_path, capsys):
    code = main(["quantize", "--model", "tiny", "--recipe", "w3a5", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("viditq: error:") and "'w3a5'" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_unsupported_yaml_recipe_exits_2(tmp_path, capsys):
    recipe = tmp_path / "w4.yaml"
    recipe.write_text("weight:\n  n_bits: 4\nact:\n  n_bits: 8\n  sym: false\n")
    code = main(["quantize", "--model", "tiny", "--recipe", str(recipe), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "act.sym" in err


def test_missing_model_dir_exits_2_with_the_path(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert main(["quantize", "--model", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("viditq: error:") and str(missing) in err


def test_dir_without_config_and_unknown_class_exit_2(tmp_path, capsys):
    assert main(["quantize", "--model", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    assert main(["quantize", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no example-input builder for AutoencoderKL" in err and "Python API" in err
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "NoSuchModel"}))
    assert main(["quantize", "--model", str(tmp_path)]) == 2
    assert "NoSuchModel" in capsys.readouterr().err


def test_pipeline_dir_error_points_at_its_transformer(tmp_path, capsys):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text("{}")
    assert main(["quantize", "--model", str(tmp_path)]) == 2
    assert f"--model {tmp_path / 'transformer'}" in capsys.readouterr().err


def test_default_artifact_path_names_model_and_recipe():
    assert default_out("demo", "w8a8") == "artifacts/demo-w8a8"
    assert default_out("pixart", "configs/pixart_w8a8.yaml") == "artifacts/pixart-pixart_w8a8"


def test_load_of_a_non_artifact_exits_2(tmp_path, capsys):
    (tmp_path / "stuff.txt").write_text("hello")
    assert main(["load", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("viditq: error:") and "manifest.json" in err
    assert "Traceback" not in err


def test_usage_errors_and_help(capsys):
    assert main(["quantize", "--batch", "1"]) == 2  # batch 1 would pin the batch dimension
    assert "--batch" in capsys.readouterr().err
    assert main([]) == 2
    assert main(["quantize", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--model" in out and "--recipe" in out and "--no-bench" in out
    assert main(["generate", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--pipeline" in out and "--prompt" in out and "--class-label" in out and "--steps" in out
    assert main(["generate", "--prompt", "a"]) == 2  # --pipeline is required
    assert "--pipeline" in capsys.readouterr().err


def test_module_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "viditq_compile.cli", "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "quantize" in r.stdout and "load" in r.stdout and "generate" in r.stdout


def test_console_script_is_declared():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "viditq"]
    assert ep.value == "viditq_compile.cli:main"


# diffusers model directories, one per family: tests/families/test_family_cli.py


def test_w4a8_with_calibration_calls_balances_and_verifies(tmp_path, capsys):
    out = tmp_path / "tiny-w4a8"
    code = main(["quantize", "--model", "tiny", "--recipe", "w4a8", "--calibration", "3",
                 "--no-bench", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "calibrated on 3 calls" in text and "smooth+rotate a=0.5" in text
    assert "artifact verified" in text
    assert all(db > 15 for db in _sqnrs(text))
    plan = json.loads((out / "plan.json").read_text())
    assert {row["weight_bits"] for row in plan["layers"] if row["weight_bits"]} == {4}


def test_bad_calibration_argument_exits_2(tmp_path, capsys):
    code = main(["quantize", "--model", "tiny", "--recipe", "w4a8", "--calibration",
                 str(tmp_path / "missing.safetensors"), "--no-bench", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "missing.safetensors" in err


# ----------------------------------------------------------------------------------------------
# hostile inputs: one line `viditq: error: ...` on stderr, exit 2, no traceback
def _one_error_line(capsys, code, *expected):
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("viditq: error: "), err
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def _plant(path, content):
    """A hostile file at ``path``: ``content`` bytes, or a directory where ``content`` is None."""
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    return path


BOMB = "\n".join(['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
                 + [f"{n}: &{n} [" + ",".join([f"*{p}"] * 9) + "]" for p, n in zip("abcdefgh", "bcdefghi")]) + "\n"


@pytest.mark.parametrize("content,expected", [
    (None, "is a directory"),
    (b"\x7fELF\x02\x01\x01\x00\x00\xff\xfe", "not UTF-8"),
    (BOMB.encode(), "alias"),
    (b"[" * 100_000, "nested more than 100"),
    (b"weight: {n_bits: 8}\nact: {n_bits: 8}\nweight: {n_bits: 4}\n", "duplicate key 'weight'"),
    (b"weight: {n_bits: 8}\nact: {n_bits: 8}\nremain_fp_regex: '^(([\\w.])+)+!$'\n", "nested quantifiers"),
])
def test_hostile_recipe_files_exit_2_with_one_line(tmp_path, capsys, content, expected):
    recipe = _plant(tmp_path / "hostile.yaml", content)
    code = main(["quantize", "--model", "tiny", "--recipe", str(recipe), "--no-bench", "--out", str(tmp_path / "o")])
    _one_error_line(capsys, code, expected, str(recipe))


@pytest.mark.parametrize("content,expected", [
    (None, "is a directory"),
    (b"\x00" * 3, "not a readable safetensors file"),
    ((10**12).to_bytes(8, "little") + b"{}", "runs past the end"),
])
def test_hostile_calibration_files_exit_2_with_one_line(tmp_path, capsys, content, expected):
    calib = _plant(tmp_path / "calib.safetensors", content)
    code = main(["quantize", "--model", "tiny", "--recipe", "w4a8", "--calibration", str(calib), "--no-bench",
                 "--out", str(tmp_path / "o")])
    _one_error_line(capsys, code, expected)


def test_load_of_hostile_paths_exits_2_with_one_line(tmp_path, capsys):
    _one_error_line(capsys, main(["load", str(tmp_path / "absent")]), str(tmp_path / "absent"))
    (tmp_path / "file").write_bytes(b"x")
    _one_error_line(capsys, main(["load", str(tmp_path / "file")]))
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_error_line(capsys, main(["load", str(empty)]), "manifest.json")


def test_an_unexpected_error_while_loading_an_artifact_is_one_line(tmp_path, capsys, monkeypatch):
    import viditq_compile.cli as cli

    def explode(path):
        raise RecursionError("maximum recursion depth exceeded\nwhile unpickling")

    monkeypatch.setattr(cli, "load", explode)
    line = _one_error_line(capsys, main(["load", str(tmp_path)]), "cannot load the artifact", "RecursionError")
    assert "unpickling" not in line


def test_a_model_config_nested_too_deeply_exits_2(tmp_path, capsys):
    (tmp_path / "config.json").write_bytes(b"[" * 100_000)
    _one_error_line(capsys, main(["quantize", "--model", str(tmp_path)]), "config.json: not valid JSON")


def _pipeline_dir(tmp_path, index, with_config=True):
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    (tmp_path / "transformer").mkdir(exist_ok=True)
    if with_config:
        (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    return str(tmp_path)


def test_a_pipeline_directory_quantizes_its_denoiser(tmp_path):
    from viditq_compile.cli import model_directory

    index = {"_class_name": "PixArtSigmaPipeline", "vae": ["diffusers", "AutoencoderKL"],
             "transformer": ["diffusers", "PixArtTransformer2DModel"]}
    assert model_directory(_pipeline_dir(tmp_path, index)) == str(tmp_path / "transformer")


@pytest.mark.parametrize("index, says", [
    ({"vae": ["diffusers", "AutoencoderKL"]}, "lists no denoiser"),
    ({"transformer": "PixArtTransformer2DModel"}, "lists no denoiser"),
    ([1, 2], "expected a JSON object"),
])
def test_a_bad_pipeline_index_is_refused_by_name(tmp_path, capsys, index, says):
    assert main(["quantize", "--model", _pipeline_dir(tmp_path, index), "--no-bench"]) == 2
    err = capsys.readouterr().err
    assert says in err and "model_index.json" in err and "Traceback" not in err


def test_a_pipeline_whose_transformer_is_missing_or_leads_outside_is_refused(tmp_path, capsys):
    index = {"transformer": ["diffusers", "PixArtTransformer2DModel"]}
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    _pipeline_dir(pipe, index, with_config=False)
    assert main(["quantize", "--model", str(pipe), "--no-bench"]) == 2
    assert "no such subfolder" in capsys.readouterr().err
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    (pipe / "transformer").rmdir()
    (pipe / "transformer").symlink_to(outside)
    assert main(["quantize", "--model", str(pipe), "--no-bench"]) == 2
    assert "outside the pipeline directory" in capsys.readouterr().err


def test_a_duplicate_key_in_a_model_config_is_refused(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"_class_name": "A", "_class_name": "B"}')
    assert main(["quantize", "--model", str(tmp_path), "--no-bench"]) == 2
    assert "duplicate" in capsys.readouterr().err
