#!/usr/bin/env python3
"""``make gpu-check``: everything a few minutes on a bare H100 / H200 can say, in one run.

Meant for a GPU machine lent for minutes (start-up included), offline, with torch, triton and
pytest but nothing built or installed from this checkout, and no diffusers. In order, each phase
checking the deadline (``--budget``, default 330 s of the 6 minutes) before it starts:

1. ``env``: device, versions, which optional modules import (numpy, pyyaml and safetensors are the
   package's own dependencies: without numpy or pyyaml it cannot be imported and the phases that
   need it are skipped with that reason; ``--wheels DIR`` installs them offline from wheels
   first, into a temporary folder, when ``pip`` finds them there).
2. ``tests``: the CUDA tests (``tests/kernels``, ``tests/ops/test_cuda.py``, not slow) in a child
   pytest with ``VIDITQ_AUTOTUNE=0`` (one config per kernel specialization instead of autotuning
   all of them) and a time cap; passed / failed / skipped counts and the failures' names.
3. ``gemm``: one linear ``[M, K] x [N, K]^T + bias`` at M in {4096, 8192}, K, N in {1152, 3072,
   4608}: ``bf16-cublas``, ``viditq-w8a8`` (the route ``kernels.gemm_choice`` timed and chose for the
   shape bucket: the Triton GEMM or ``torch._int_mm`` + the epilogue kernel, named in ``gemm_route``),
   ``viditq-w8a8-triton`` / ``viditq-w8a8-int-mm`` (each route forced), ``viditq-w4a8`` (asymmetric,
   per channel), and
   ``viditq-w4a4`` (packed 4-bit activations, quantization included) built by
   ``test_bench_cuda._build_gemm``; ``torchao-int8-dyn`` (default ``torch.compile``) at M = 8192
   when torchao imports; ``viditq-fp8`` (per-token / per-channel e4m3 through ``viditq.qlinear``: the
   e4m3 Triton GEMM of ``kernels.fp8_gemm`` on sm_89+). SQNR against float64, and which ``viditq``
   ops ran (a fallback to the reference path fails the variant).
4. ``block``: one PixArt-Σ-width block (1152 wide, 16 heads, 2 x 4096 tokens, 300 caption tokens,
   ``viditq_demo.demo_model.BasicTransformerBlock``): bf16 eager, compiled bf16, and viditq W8A8
   data-free quantized on the GPU and compiled.
5. ``stack``: the 28-block PixArt-Σ-width ``DemoDiT`` (1024 px, batch 2) built on the GPU (weights
   drawn there) and quantized there (W8A8, data-free), against compiled bf16.

Output in ``$VIDITQ_GPU_OUT`` (default ``benchmarks/runs/gpu-check``): ``gpu_check.json`` (every
phase's result or error; its ``benchmarks`` list in pytest-benchmark's layout) and
``gpu_check.md`` (the environment, the test counts, and the tables of ``cuda_ratios.py``).

Exit status: 0 when every phase that ran passed; 1 when a phase failed; 2 on bad arguments; 3 when
there is no CUDA device ("no CUDA device" is printed, and the JSON and Markdown still written;
with no torch at all nothing is written).
``--dry-run`` runs every phase on the CPU at toy sizes (Triton interpreted, timings meaningless),
to check the script itself.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_CUDA = 0, 1, 2, 3
DEFAULT_OUT = BENCH / "runs" / "gpu-check"

GEMM_M = (4096, 8192)
GEMM_KN = tuple((k, n) for k in (1152, 3072, 4608) for n in (1152, 3072, 4608))
GEMM_VARIANTS = ("bf16-cublas", "viditq-w8a8", "viditq-w8a8-triton", "viditq-w8a8-int-mm", "viditq-w4a8",
                 "viditq-w4a4", "viditq-fp8")
TORCHAO_M = 8192
DRY_M, DRY_KN = (32,), ((64, 64), (64, 128))

CUDA_TESTS = ["tests/kernels/test_int_gemm.py", "tests/kernels/test_fp8_gemm.py",
              "tests/kernels/test_int_mm_epilogue.py", "tests/kernels/test_gemm_choice.py",
              "tests/kernels/test_quantize_act_triton.py",
              "tests/kernels/test_launch.py", "tests/ops/test_cuda.py"]
OPTIONAL = ("numpy", "yaml", "safetensors", "pytest", "pytest_benchmark", "torchao", "diffusers")
REQUIRED = ("numpy", "yaml")  # imported by viditq_compile at the top level


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("VIDITQ_GPU_OUT") or DEFAULT_OUT),
                   help="output folder (default $VIDITQ_GPU_OUT, else benchmarks/runs/gpu-check)")
    p.add_argument("--budget", type=float, default=330.0, help="seconds for all phases (default 330)")
    p.add_argument("--tests-timeout", type=float, default=120.0, help="cap of the tests phase (default 120 s)")
    p.add_argument("--phases", default="env,tests,gemm,block,stack",
                   help="comma-separated subset of env,tests,gemm,block,stack")
    p.add_argument("--wheels", type=Path, default=None,
                   help="folder of wheels to install missing numpy / pyyaml / safetensors from (offline)")
    p.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, Triton interpreted: checks the script")
    args = p.parse_args(argv)
    phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    unknown = sorted(set(phases) - {"env", "tests", "gemm", "block", "stack"})
    if unknown:
        p.error(f"unknown phase(s) {', '.join(unknown)}")
    if args.budget <= 0 or args.tests_timeout <= 0:
        p.error("--budget and --tests-timeout must be positive")
    args.phases = phases
    return args


# ----------------------------------------------------------------------------- environment


def importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def install_wheels(wheels: Path, missing: list[str]) -> str:
    """pip-install ``missing`` from ``wheels`` offline into a temporary folder put on sys.path."""
    target = Path(tempfile.mkdtemp(prefix="viditq-gpu-deps-"))
    names = ["pyyaml" if m == "yaml" else m for m in missing]
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels),
                           "--target", str(target), *names], capture_output=True, text=True)
    if proc.returncode:
        return f"pip install from {wheels} failed: {proc.stderr.strip()[-500:]}"
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])
    importlib.invalidate_caches()
    return f"installed {', '.join(names)} from {wheels} into {target}"


def env_info(args) -> dict:
    import torch

    info: dict[str, Any] = {"python": sys.version.split()[0], "executable": sys.executable,
                            "platform": platform.platform(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                            "dry_run": args.dry_run}
    if torch.cuda.is_available():
        info.update(device=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                    device_count=torch.cuda.device_count())
    info["modules"] = {m: importable(m) for m in OPTIONAL}
    missing = [m for m in (*REQUIRED, "safetensors") if not info["modules"][m]]
    if missing and args.wheels is not None:
        info["wheels"] = install_wheels(args.wheels, missing)
        info["modules"] = {m: importable(m) for m in OPTIONAL}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:  # not installed, or a broken install
        info["triton"] = f"not importable: {type(exc).__name__}: {exc}"
    info["package_importable"] = all(info["modules"][m] for m in REQUIRED)
    try:
        info["commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                        text=True).stdout.strip() or None
    except OSError:
        info["commit"] = None
    return info


def _package_path() -> None:
    """The checkout and its demo package importable without installing them."""
    for p in (str(REPO / "demo"), str(REPO), str(BENCH)):
        if p not in sys.path:
            sys.path.insert(0, p)


# ----------------------------------------------------------------------------- tests




def run_tests(timeout: float, dry_run: bool) -> dict:
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, VIDITQ_AUTOTUNE="0", PYTHONPATH=path)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-m", "not slow", *CUDA_TESTS]
    if dry_run:
        cmd += ["-k", "launch"]  # the script's own check: a quick subset
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        out, rc, timed_out = proc.stdout + proc.stderr, proc.returncode, False
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        rc, timed_out = None, True
    counts: dict[str, int] = {}
    failed = []
    for line in out.splitlines():
        m = re.match(r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\s+(\S+)", line)
        if m:
            counts[m[1].lower()] = counts.get(m[1].lower(), 0) + 1
            if m[1] in ("FAILED", "ERROR"):
                failed.append(m[2])
    return {"command": " ".join(cmd), "returncode": rc, "timed_out": timed_out,
            "seconds": round(time.perf_counter() - t0, 1), "counts": counts, "failed": failed,
            "ok": rc == 0 and not timed_out, "tail": out[-3000:]}


# ----------------------------------------------------------------------------- timing


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device, target_s: float = 0.05, rounds: int = 5) -> float:
    """Median seconds per call over ``rounds`` rounds of back-to-back calls lasting about
    ``target_s`` each (CUDA events on a GPU); ``fn`` has been called once already."""
    import torch

    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    inner = max(1, min(200, math.ceil(target_s / max(time.perf_counter() - t0, 1e-6))))
    times = []
    for _ in range(rounds):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - t0) / inner)
    return sorted(times)[len(times) // 2]


class OpRecorder:
    """The ``viditq`` ops a call runs, with the dtype and shape of their first argument (what was
    timed: e.g. ``qlinear_fused`` on packed uint8 activations for W4A4)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        calls: list[str] = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = str(func.overloadpacket)
                if "viditq" in name:
                    a0 = args[0] if args else None
                    desc = f"{str(a0.dtype).replace('torch.', '')}{list(a0.shape)}" if hasattr(a0, "dtype") else ""
                    packed = " packed" if name.endswith("qlinear_fused") and args and args[-1] is True else ""
                    calls.append(f"{name.replace('viditq.', '')}({desc}{packed})")
                return func(*args, **(kwargs or {}))

        self.calls = calls
        self.mode = Mode()


def record_ops(fn) -> tuple[Any, list[str]]:
    rec = OpRecorder()
    with rec.mode:
        out = fn()
    return out, sorted(set(rec.calls))


def bench_row(group: str, variant: str, median: float, **info) -> dict:
    """One result in pytest-benchmark's layout (what ``cuda_ratios.py`` reads)."""
    return {"group": group, "name": f"{group}[{variant}]", "param": variant,
            "stats": {"median": median}, "extra_info": dict(variant=variant, **info)}


# ----------------------------------------------------------------------------- gemm


def gemm_phase(device, dry_run: bool, deadline: float, errors: list) -> list[dict]:
    import pytest
    import test_bench_cuda as tb  # benchmarks/, on sys.path
    import torch

    from viditq_compile.numerics import quant as numerics
    from viditq_compile.ops import cuda as viditq_cuda

    rows = []
    ms, kns = (DRY_M, DRY_KN) if dry_run else (GEMM_M, GEMM_KN)
    torchao = importable("torchao") and not dry_run
    for m in ms:
        for k, n in kns:
            if time.perf_counter() > deadline:
                errors.append(f"gemm: budget spent before M={m} K={k} N={n}")
                return rows
            g = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(m, k, device=device, generator=g).to(torch.bfloat16)
            w = (torch.randn(n, k, device=device, generator=g) * k ** -0.5).to(torch.bfloat16)
            bias = (torch.randn(n, device=device, generator=g) * 0.02).to(torch.bfloat16)
            ref = torch.addmm(bias.double(), x.double(), w.double().t()).float().cpu()
            case = tb.GemmCase(m, k, n, x, w, bias, ref)
            variants = list(GEMM_VARIANTS) + (["torchao-int8-dyn"] if torchao and m == TORCHAO_M else [])
            for variant in variants:
                try:
                    before = viditq_cuda.fallbacks()
                    with torch.no_grad():
                        if variant == "torchao-int8-dyn":
                            fn, info = _torchao_linear(case), {}
                            to_float = tb._identity
                        else:
                            fn, info, to_float = (_fp8_linear(case) if variant == "viditq-fp8"
                                                  else tb._build_gemm(variant, case))
                        t0 = time.perf_counter()
                        out, ops = record_ops(fn)
                        _sync(device)
                        first_s = time.perf_counter() - t0
                        sqnr = numerics.sqnr_db(ref, to_float(out).float().cpu())
                        if variant in tb.W8A8_ROUTES:
                            info = dict(info, gemm_route=tb.gemm_route(m, k, n, device))
                        new = [f for f in viditq_cuda.fallbacks() if f not in before]
                        if new and not dry_run:
                            raise AssertionError(f"ran the reference path for {new}")
                        median = time_call(fn, device)
                    rows.append(bench_row(case.group, variant, median, M=m, K=k, N=n, sqnr_db=round(sqnr, 2),
                                          first_call_s=round(first_s, 3), viditq_ops=ops,
                                          tflops=round(2 * m * n * k / median / 1e12, 2), **info))
                except pytest.skip.Exception as exc:
                    errors.append(f"gemm {case.group} {variant}: skipped: {exc}")
                except Exception as exc:  # one variant's failure must not hide the others
                    errors.append(f"gemm {case.group} {variant}: {type(exc).__name__}: {exc}")
            del x, w, bias, case
    return rows


def _fp8_linear(case):
    """``viditq-fp8``: per-token e4m3 activations (quantized outside the timing, as ``viditq-w8a8``'s
    int8 ones) x per-channel e4m3 weights through ``viditq.qlinear``: on sm_89+ the e4m3 Triton GEMM
    (``kernels.fp8_gemm``), elsewhere the logged reference (which fails the variant)."""
    import test_bench_cuda as tb
    import torch

    from viditq_compile.numerics import fp8

    xq, xs = fp8.quantize_per_token_fp8(case.x)
    qw = fp8.quantize_weight_fp8(case.w)
    info = {"weight_bytes": tb.tensor_bytes(qw.q) + tb.tensor_bytes(qw.scale) + tb.tensor_bytes(case.bias)}
    return (lambda: torch.ops.viditq.qlinear(xq, xs, qw.q, qw.scale, None, case.bias, 8, 0, torch.bfloat16),
            info, tb._identity)


def _torchao_linear(case):
    import test_bench_cuda as tb
    import torch
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    lin = tb._linear(case)
    quantize_(lin, Int8DynamicActivationInt8WeightConfig())
    fn = torch.compile(lin, dynamic=False)
    return lambda: fn(case.x)


# ----------------------------------------------------------------------------- block and stack


def _sizes(dry_run: bool) -> dict:
    if dry_run:
        return dict(dim=64, heads=2, dim_head=32, tokens=16, caption=8, layers=2, sample=8, caption_channels=32)
    return dict(dim=1152, heads=16, dim_head=72, tokens=4096, caption=300, layers=28, sample=128,
                caption_channels=4096)


def _init_on_device_(model, device, seed: int = 0) -> None:
    """Weights drawn on ``device`` (a 28-block model in seconds, not minutes on the CPU): each
    linear N(0, 1/K), biases N(0, 0.02^2), adaLN tables N(0, 1/dim)."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear | torch.nn.Conv2d):
                fan_in = mod.weight[0].numel()
                mod.weight.normal_(0.0, fan_in ** -0.5, generator=g)
                if mod.bias is not None:
                    mod.bias.normal_(0.0, 0.02, generator=g)
            elif isinstance(mod, torch.nn.LayerNorm) and mod.weight is not None:
                mod.weight.fill_(1.0)
                mod.bias.zero_()
        for name, p in model.named_parameters():
            if name.endswith("scale_shift_table"):
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=g)


def _model_variants(name: str, model, args: tuple, kwargs: dict, device, deadline: float, errors: list,
                    rows: list) -> None:
    """bf16 eager (block only), compiled bf16, viditq W8A8 (data-free, quantized on ``device``)."""
    import test_bench_cuda as tb
    import torch

    import viditq_compile as vq
    from viditq_compile.numerics import quant as numerics

    with torch.no_grad():
        reference = tb._first_tensor(model.float()(*tb._to(args, None, torch.float32),
                                                   **tb._to(kwargs, None, torch.float32))).float().cpu()
        model = model.to(torch.bfloat16)
        a16, k16 = tb._to((args, kwargs), None, torch.bfloat16)
        variants = (["bf16-eager"] if name.startswith("block") else []) + ["bf16-compiled", "viditq-w8a8"]
        for variant in variants:
            if time.perf_counter() > deadline:
                errors.append(f"{name} {variant}: budget spent")
                continue
            try:
                info: dict[str, Any] = {}
                t0 = time.perf_counter()
                info["weight_bytes"] = tb.module_bytes(model)
                if variant == "bf16-eager":
                    fn = model
                elif variant == "bf16-compiled":
                    torch._dynamo.reset()
                    fn = torch.compile(model)
                else:
                    torch._dynamo.reset()
                    tb._ensure_viditq_backend()
                    qm = vq.quantize(model, a16, k16, recipe="w8a8")
                    info["quantize_s"] = round(time.perf_counter() - t0, 1)
                    info["quantized_layers"] = qm.report.summary()
                    wb = qm.weight_bytes
                    info["weight_bytes"] = int(wb() if callable(wb) else wb)
                    fn = qm.compile()
                call = lambda fn=fn: fn(*a16, **k16)  # noqa: E731
                out, ops = record_ops(call) if variant.startswith("viditq") else (call(), [])
                _sync(device)
                info["first_call_s"] = round(time.perf_counter() - t0, 1)
                sqnr = numerics.sqnr_db(reference, tb._first_tensor(out).float().cpu())
                median = time_call(call, device, target_s=0.2, rounds=3)
                rows.append(bench_row(name, variant, median, sqnr_db=round(sqnr, 2), viditq_ops=ops, **info))
            except Exception as exc:  # recorded; the next variant still runs
                errors.append(f"{name} {variant}: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}")


def block_phase(device, dry_run: bool, deadline: float, errors: list) -> list[dict]:
    import torch

    from viditq_demo.demo_model import BasicTransformerBlock

    s = _sizes(dry_run)
    with torch.device(device):
        block = BasicTransformerBlock(s["dim"], heads=s["heads"], dim_head=s["dim_head"], mlp_ratio=4)
    _init_on_device_(block, device)
    block.eval().requires_grad_(False)
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(2, s["tokens"], s["dim"], device=device, generator=g)
    text = torch.randn(2, s["caption"], s["dim"], device=device, generator=g)
    t = torch.randn(2, 6 * s["dim"], device=device, generator=g)
    rows: list[dict] = []
    _model_variants("block-pixart-sigma-width", block, (x, text, t), {}, device, deadline, errors, rows)
    return rows


def stack_phase(device, dry_run: bool, deadline: float, errors: list) -> list[dict]:
    import torch

    from viditq_demo.demo_model import DemoConfig, DemoDiT, demo_inputs

    s = _sizes(dry_run)
    config = DemoConfig(num_layers=s["layers"], num_attention_heads=s["heads"], attention_head_dim=s["dim_head"],
                        in_channels=4, out_channels=8, sample_size=s["sample"], patch_size=2,
                        caption_channels=s["caption_channels"], caption_length=s["caption"], num_outlier_channels=0)
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = DemoDiT(config)
    model.to_empty(device=device)
    _init_on_device_(model, device)
    model.eval().requires_grad_(False)
    build_s = round(time.perf_counter() - t0, 1)
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in demo_inputs(config, 2, seed=1).items()}
    rows: list[dict] = []
    _model_variants(f"model-pixart-sigma-width-{s['layers']}", model, (), kwargs, device, deadline, errors, rows)
    for r in rows:
        r["extra_info"]["build_s"] = build_s
    return rows


# ----------------------------------------------------------------------------- report


def markdown(result: dict) -> str:
    import cuda_ratios

    env = result["env"]
    lines = ["## `make gpu-check`", "",
             f"- Device: {env.get('device', 'no CUDA device')} (capability {env.get('capability', '–')}), "
             f"torch {env.get('torch')}, CUDA {env.get('cuda')}, triton {env.get('triton')}, "
             f"Python {env.get('python')}",
             f"- Run: {result['datetime']}, commit `{str(env.get('commit') or '?')[:12]}`, "
             f"{result['seconds']:.0f} s wall"
             + (" (dry run on the CPU: timings meaningless)" if env.get("dry_run") else ""),
             "- Modules: " + ", ".join(f"{m} {'yes' if ok else 'no'}" for m, ok in env.get("modules", {}).items()), ""]
    tests = result.get("tests")
    if tests:
        counts = ", ".join(f"{v} {k}" for k, v in sorted(tests["counts"].items())) or "no results"
        lines += [f"### CUDA tests: {'ok' if tests['ok'] else 'NOT ok'}", "",
                  f"{counts} in {tests['seconds']} s" + (" (timed out)" if tests["timed_out"] else ""), ""]
        lines += [f"- failed: `{f}`" for f in tests["failed"]] + ([""] if tests["failed"] else [])
    groups: dict[str, dict[str, dict]] = {}
    for bench in result["benchmarks"]:
        groups.setdefault(bench["group"], {})[bench["extra_info"]["variant"]] = bench
    gemm = {n for n, g in groups.items() if cuda_ratios.gemm_key(g)}
    for name in [n for n in groups if n not in gemm]:
        lines += cuda_ratios.group_table(name, groups[name])
    lines += cuda_ratios.gemm_matrix(groups)
    ops = {(b["group"] if not cuda_ratios.gemm_key({0: b}) else "gemm", b["extra_info"]["variant"]):
           ", ".join(b["extra_info"]["viditq_ops"]) for b in result["benchmarks"] if b["extra_info"].get("viditq_ops")}
    chosen = [b for b in result["benchmarks"] if b["extra_info"].get("gemm_route") and b["extra_info"]["variant"]
              == "viditq-w8a8"]
    if chosen:
        lines += ["### W8A8 GEMM route chosen per shape (`kernels.gemm_choice`)", ""]
        lines += [f"- {b['extra_info']['M']} × {b['extra_info']['K']} × {b['extra_info']['N']}: "
                  f"{b['extra_info']['gemm_route']}" for b in chosen] + [""]
    if ops:
        lines += ["### viditq ops each variant ran", ""] + [f"- {g} `{v}`: {o}" for (g, v), o in ops.items()] + [""]
    if result["errors"]:
        lines += ["### Errors and skips", ""] + [f"- {e.splitlines()[0]}" for e in result["errors"]] + [""]
    return "\n".join(lines)


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(result))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not importable("torch"):
        print(f"gpu-check: no CUDA device: torch is not importable with {sys.executable}", file=sys.stderr)
        return EXIT_NO_CUDA
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
    t_start = time.perf_counter()
    deadline = t_start + args.budget
    _package_path()
    result: dict[str, Any] = {"datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                              "argv": sys.argv[1:], "benchmarks": [], "errors": [], "phases": {}}
    result["env"] = env_info(args)
    import torch

    cuda = torch.cuda.is_available()
    status = EXIT_OK
    if not cuda and not args.dry_run:
        print("gpu-check: no CUDA device (torch " + torch.__version__ + "); nothing measured", file=sys.stderr)
        result["errors"].append("no CUDA device")
        result["seconds"] = time.perf_counter() - t_start
        write(result, args.out)
        return EXIT_NO_CUDA
    device = torch.device("cuda" if cuda and not args.dry_run else "cpu")
    phases = {"gemm": gemm_phase, "block": block_phase, "stack": stack_phase}
    for phase in args.phases:
        if phase == "env":
            continue
        if time.perf_counter() > deadline:
            result["phases"][phase] = "skipped: budget spent"
            continue
        if phase == "tests":
            left = max(deadline - time.perf_counter(), 1.0)
            result["tests"] = run_tests(min(args.tests_timeout, left), args.dry_run)
            result["phases"]["tests"] = "ok" if result["tests"]["ok"] else "failed"
            status = status if result["tests"]["ok"] else EXIT_FAILED
            result["seconds"] = time.perf_counter() - t_start
            write(result, args.out)
            continue
        if not result["env"]["package_importable"]:
            missing = [m for m in REQUIRED if not result["env"]["modules"][m]]
            result["phases"][phase] = f"skipped: viditq_compile needs {', '.join(missing)} (--wheels DIR)"
            status = EXIT_FAILED
            continue
        before = len(result["errors"])
        t0 = time.perf_counter()
        try:
            rows = phases[phase](device, args.dry_run, deadline, result["errors"])
            result["benchmarks"] += rows
        except Exception as exc:  # a phase's crash is reported, the next phase still runs
            result["errors"].append(f"{phase}: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}")
        hard = [e for e in result["errors"][before:] if "skipped:" not in e]
        result["phases"][phase] = f"{'ok' if not hard else 'errors'} ({time.perf_counter() - t0:.0f} s)"
        status = status if not hard else EXIT_FAILED
        with contextlib.suppress(Exception):
            torch._dynamo.reset()
        result["seconds"] = time.perf_counter() - t_start
        write(result, args.out)  # after every phase: a run killed later still leaves what it measured
    result["seconds"] = time.perf_counter() - t_start
    write(result, args.out)
    print(markdown(result))
    print(f"gpu-check: wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
