"""``benchmarks/gpu_check.py`` (``make gpu-check``) on a machine without a GPU: its arguments,
the no-CUDA exit, and a dry run of the GEMM phase at toy sizes (the tables, the JSON, and which
viditq ops each variant ran: W4A4 must time the packed-activation kernel)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def run(*args, tmp_path):
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), *args], capture_output=True,
                          text=True, cwd=SCRIPT.parents[1], timeout=300)


def test_bad_arguments_exit_2(tmp_path):
    proc = run("--phases", "gemm,warp", tmp_path=tmp_path)
    assert proc.returncode == 2 and "unknown phase(s) warp" in proc.stderr
    assert run("--budget", "0", tmp_path=tmp_path).returncode == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_it_says_so_and_exits_3(tmp_path):
    proc = run("--phases", "env,gemm", tmp_path=tmp_path)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "no CUDA device" in proc.stderr
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["errors"] == ["no CUDA device"] and result["benchmarks"] == []
    assert "no CUDA device" in (tmp_path / "gpu_check.md").read_text()


def test_dry_run_gemm_phase_writes_tables_and_times_packed_w4a4(tmp_path):
    proc = run("--dry-run", "--phases", "gemm", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    got = {(b["extra_info"]["M"], b["extra_info"]["K"], b["extra_info"]["N"], b["extra_info"]["variant"])
           for b in result["benchmarks"]}
    assert got == {(32, k, n, v) for k, n in ((64, 64), (64, 128))
                   for v in ("bf16-cublas", "viditq-w8a8", "viditq-w4a8", "viditq-w4a4", "viditq-fp8")}
    ops = {b["extra_info"]["variant"]: b["extra_info"]["viditq_ops"] for b in result["benchmarks"]}
    assert ops["viditq-w4a4"] == ["qlinear_fused(uint8[32, 32] packed)"]  # K/2 bytes a row: packed int4
    assert ops["viditq-w4a8"] == ["qlinear(int8[32, 64])"] and ops["bf16-cublas"] == []
    assert ops["viditq-fp8"] == ["qlinear(float8_e4m3fn[32, 64])"]  # e4m3 operands: the e4m3 GEMM on a GPU
    assert all(b["extra_info"]["sqnr_db"] > 5 for b in result["benchmarks"])
    md = (tmp_path / "gpu_check.md").read_text()
    assert "### GEMM speed-up over `bf16-cublas`" in md and "| 32 × 64 × 128 |" in md
