"""The quality suite on the trained digits DiT, reduced (10 samples, 10 sampler steps)."""

import numpy as np
import pytest

pytest.importorskip("diffusers", reason="the digits DiT is a diffusers model")

from viditq_compile.quality import run_quality  # noqa: E402


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
