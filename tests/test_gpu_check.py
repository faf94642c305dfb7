"""``benchmarks/gpu_check.py`` (``make gpu-check``) on a machine without a GPU: its arguments,
the no-CUDA exit, and a dry run of the GEMM phase at toy sizes (the tables, the JSON, and which
viditq ops each variant ran: W4A4 must time the packed-activation kernel; the W8A8 GEMM
route each W8A8 variant took)."""

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
                   for v in ("bf16-cublas", "viditq-w8a8", "viditq-w8a8-triton", "viditq-w8a8-int-mm", "viditq-w4a8",
                             "viditq-w4a4", "viditq-fp8")}
    ops = {b["extra_info"]["variant"]: b["extra_info"]["viditq_ops"] for b in result["benchmarks"]}
    assert ops["viditq-w4a4"] == ["qlinear_fused(uint8[32, 32] packed)"]  # K/2 bytes a row: packed int4
    assert ops["viditq-w4a8"] == ["qlinear(int8[32, 64])"] and ops["bf16-cublas"] == []
    assert ops["viditq-fp8"] == ["qlinear(float8_e4m3fn[32, 64])"]  # e4m3 operands: the e4m3 GEMM on a GPU
    assert all(b["extra_info"]["sqnr_db"] > 5 for b in result["benchmarks"])
    # the W8A8 GEMM routes (kernels.gemm_choice): each variant asks which one ran; on CPU tensors the op
    # runs its CPU implementation, so no route is recorded (on a GPU: "int_mm: forced", "triton: timed ...")
    routes = {(b["extra_info"]["variant"], b["extra_info"]["N"]): b["extra_info"].get("gemm_route", "absent")
              for b in result["benchmarks"]}
    for n in (64, 128):
        assert [routes[(v, n)] for v in ("viditq-w8a8", "viditq-w8a8-triton", "viditq-w8a8-int-mm")] == [None] * 3
        assert routes[("viditq-w4a8", n)] == "absent"
    assert ops["viditq-w8a8-int-mm"] == ops["viditq-w8a8-triton"] == ["qlinear(int8[32, 64])"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "### GEMM speed-up over `bf16-cublas`" in md and "| 32 × 64 × 128 |" in md
    assert "GEMM route chosen" not in md  # nothing chose a route


def test_markdown_names_the_w8a8_route_chosen_per_shape(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import gpu_check

    def row(variant, route=None):
        info = dict(M=4096, K=1152, N=4608, variant=variant, sqnr_db=30.0, viditq_ops=[])
        if route is not None:
            info["gemm_route"] = route
        return {"group": "gemm-M4096-K1152-N4608", "name": variant, "param": variant, "stats": {"median": 1e-4},
                "extra_info": info}

    chosen = "int_mm: timed (triton 120.0 us, int_mm 95.0 us)"
    result = {"env": {}, "datetime": "now", "seconds": 1.0, "errors": [],
              "benchmarks": [row("bf16-cublas"), row("viditq-w8a8", chosen),
                             row("viditq-w8a8-triton", "triton: forced")]}
    md = gpu_check.markdown(result)
    assert f"- 4096 × 1152 × 4608: {chosen}" in md and "triton: forced" not in md
