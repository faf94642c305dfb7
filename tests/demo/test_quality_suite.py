"""The quality suite on the trained digits DiT, reduced (10 samples, 10 sampler steps)."""

import json
import re

import numpy as np
import pytest

pytest.importorskip("diffusers", reason="the digits DiT is a diffusers model")

from viditq_demo.quality import run_quality  # noqa: E402


def test_w8a8_keeps_the_digits_and_stays_close_to_fp(tmp_path):
    grid = tmp_path / "grid.png"
    result = run_quality(["w8a8"], per_class=1, num_steps=10, grid=str(grid), grid_columns=10)
    fp, w8a8 = result.row("fp"), result.row("w8a8")
    assert [r.recipe for r in result.rows] == ["fp", "w8a8"]  # fp always first, as the reference
    assert fp.accuracy >= 0.9 and np.isinf(fp.psnr_db) and fp.ssim == pytest.approx(1.0)
    assert w8a8.accuracy >= fp.accuracy - 0.1          # at most one of ten samples changes class
    assert w8a8.psnr_db >= 30 and w8a8.ssim > 0.95     # measured 53.8 dB / 0.999 on 50 samples
    assert w8a8.quantized_layers > 0 and w8a8.weight_bytes < fp.weight_bytes
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| `w8a8` |" in result.table()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="per_class"):
        run_quality(["w8a8"], per_class=0)
    with pytest.raises(ValueError, match="recipes"):
        run_quality("w8a8")
    with pytest.raises(ValueError, match="error_gain"):
        run_quality(["w8a8"], error_gain=-1.0)


def test_viditq_quality_writes_the_grid_table_and_json(tmp_path, capsys):
    from tests.report.test_heatmap import decode_png
    from viditq_compile.cli import main

    code = main(["quality", "--recipes", "w8a8-naive,w8a8", "--per-class", "1", "--steps", "4",
                 "--columns", "3", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    for recipe in ("fp", "w8a8-naive", "w8a8"):
        assert f"| `{recipe}` |" in out
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert [r["recipe"] for r in saved["rows"]] == ["fp", "w8a8-naive", "w8a8"]
    assert (tmp_path / "quality.md").read_text().strip() in out
    img = decode_png((tmp_path / "grid.png").read_bytes())
    tinted = (img[..., 0] == 255) & (img[..., 1] < 200)  # the |sample - fp| x 10 panel shows errors
    assert tinted.any()
    code = main(["quality", "--recipes", "w8a8", "--error-gain", "0", "--per-class", "1", "--steps", "2",
                 "--columns", "3", "--out", str(tmp_path / "plain")])
    assert code == 0
    plain = decode_png((tmp_path / "plain" / "grid.png").read_bytes())
    assert plain.shape[1] < img.shape[1] and not ((plain[..., 0] == 255) & (plain[..., 1] < 200)).any()


@pytest.mark.parametrize("argv,match", [
    (["--recipes", "w3a5"], "w3a5"),
    (["--error-gain", "-2"], "error_gain"),
])
def test_viditq_quality_refuses_bad_arguments_before_sampling(tmp_path, capsys, argv, match):
    from viditq_compile.cli import main

    code = main(["quality", *argv, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("viditq: error:") and match in err
    assert not (tmp_path / "grid.png").exists()


def test_viditq_quantize_digits_calibrates_on_sampler_trajectories_and_verifies(tmp_path, capsys):
    """The first step of `make demo`."""
    from viditq_compile.cli import main

    code = main(["quantize", "--model", "digits", "--calibration", "1", "--no-bench",
                 "--out", str(tmp_path / "digits")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "calls recorded from the model's sampler" in out and "smooth+rotate" in out
    assert "24 of 38 linear layers quantized" in out and "artifact verified" in out
    assert all(float(db) > 40 for db in re.findall(r"([\d.]+) dB", out))  # measured 54-59 dB
