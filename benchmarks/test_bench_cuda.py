"""CUDA figures of issue 5 (an H100): the quantized GEMM against cuBLAS, Inductor, ``torch._int_mm``
and torchao, then whole DiT blocks and the 28-block PixArt-Σ through the public API.

Run on the GPU machine, from the repository root::

    make bench-cuda            # = the two commands below
    python -m pytest -q benchmarks/test_bench_cuda.py --benchmark-only \\
        --benchmark-json=benchmarks/runs/cuda.json
    python benchmarks/cuda_ratios.py benchmarks/runs/cuda.json   # Markdown tables for RESULTS.md

``make bench-cuda`` uses ``.venv/bin/python`` when there is one, else ``python3`` (override with
``CUDA_PY=...``); it installs nothing. The GPU image has torch, triton and pytest-benchmark but not
diffusers (torchao may be missing too); install the wheels carried in ``.whl/`` first (offline)::

    pip install --no-index --find-links .whl diffusers torchao   # whichever wheels are there

The package need not be installed: ``python -m pytest`` from the repository root imports it from
there (its own dependencies numpy, pyyaml and safetensors must be importable), and the suite
registers the ``viditq`` Dynamo backend itself when no installed entry point provides it.

Variants whose library is missing skip with the reason (diffusers: the diffusers-built PixArt-Σ;
torchao: its int8 / fp8 baselines; fp8 also needs compute capability >= 8.9). Without a CUDA
device every test skips. The suite runs only when this file is named on the command line, so
``make bench`` (``pytest benchmarks -k <variant>``) never picks it up on a GPU machine.

Groups (one pytest-benchmark ``group`` each, variants side by side):

- ``gemm-M{M}-K{K}-N{N}``: one linear layer ``[M, K] x [N, K]^T + bias -> [M, N]`` bf16 out.
  ``bf16-cublas`` (``F.linear``), ``bf16-compiled`` (Inductor max-autotune), ``int-mm``
  (``torch._int_mm`` alone: the int8 tensor-core bound), ``viditq-w8a8`` / ``viditq-w4a8`` /
  ``viditq-w4a8-g128`` (``viditq.qlinear`` on activations already quantized; for W8A8 the route
  ``kernels.gemm_choice`` timed and chose for the shape bucket, named in ``extra_info["gemm_route"]``),
  ``viditq-w8a8-triton`` / ``viditq-w8a8-int-mm`` (the same op with each route forced: the Triton GEMM,
  ``torch._int_mm`` + the epilogue kernel), ``viditq-w8a8-dyn``
  (``viditq.w8a8_linear``: per-token quantization included), ``viditq-w4a4`` (4-bit ``quantize_act``
  packed two per byte + ``qlinear_fused(packed_act=True)``, quantization included),
  ``torchao-int8-dyn`` and ``torchao-fp8-rowwise`` (``quantize_`` + Inductor max-autotune).
  Operands are Gaussian (a weight's 4-bit error depends on its tails; timings do not depend on
  values).
- ``block-*`` / ``model-*``: PixArt-Σ block (diffusers, and the dependency-free
  ``viditq_demo.demo_model`` twin), an STDiT3 (OpenSORA) spatial + temporal block pair from
  ``tests/zoo.py``, and the 28-block PixArt-Σ (diffusers, and ``DemoDiT``) at 1024 px, batch 2
  (CFG). ``bf16-eager``, ``bf16-compiled``, ``torchao-int8-dyn`` (compiled), and
  ``vq.quantize(..., recipe=...)`` + ``.compile()`` for ``w8a8``, ``w4a8`` and W4A4.

Timing: a callable launches the op back to back and synchronizes every ``inner`` calls, which
pytest-benchmark runs as ``iterations=inner`` so its statistics are per call (``inner`` is chosen
so that one round lasts about ``TARGET_ROUND_S``). The first call (Triton autotune, compile) is
outside the timing, in ``extra_info["first_call_s"]``. Nothing flushes L2 between calls.
``extra_info`` holds the shape, TFLOP/s of the median, weight bytes, peak CUDA memory in steady
state (``max_memory_allocated`` over the timed calls, reset after the first call; it includes the
variant's weights and the operands the variants share; the first call's peak, autotuning or
compile buffers included, is ``first_call_peak_mem_bytes``), and SQNR against a float64 (GEMM) or
fp32 eager (blocks, models) reference. A variant whose SQNR is not above its floor, or whose
viditq GEMM ran the reference fallback instead of the Triton kernel, fails before it is timed, so
it never publishes a timing.

A full run compiles three variants per GEMM shape with Inductor's max-autotune (39 shapes) and
the 28-block model six ways; ``VIDITQ_BENCH_CUDA_SHAPES=quick`` gives a first look sooner.

Environment: ``VIDITQ_BENCH_CUDA_SHAPES=quick`` (five GEMM shapes instead of 39),
``VIDITQ_BENCH_CUDA_ROUNDS`` (timed rounds, default 20; 2 warm-up rounds come on top).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import importlib.util
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import module_bytes, tensor_bytes  # benchmarks/conftest.py, on sys.path under pytest

from viditq_compile.numerics import quant as numerics

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device: GPU benchmarks run on an H100, see benchmarks/RESULTS.md")

REPO = Path(__file__).resolve().parents[1]


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise pytest.UsageError(f"{name} must be a positive integer, got {raw!r}")
    return int(raw)


ROUNDS = _env_int("VIDITQ_BENCH_CUDA_ROUNDS", 20)
WARMUP_ROUNDS = 2
TARGET_ROUND_S = 2e-3  # a 10 µs GEMM is then timed over ~200 launches, not one launch + a sync
MAX_INNER = 200
SEED = 0

# ----------------------------------------------------------------------------- GEMM shapes

GEMM_M = (256, 1024, 4096, 8192, 16384, 65536)
# (K, N) of DiT linears at hidden 1152 (PixArt-Σ, OpenSORA) and 3072 (Flux): attention, MLP up /
# down, and Flux's single-block output projection (K = 3072 + 12288)
GEMM_KN = ((1152, 1152), (1152, 4608), (4608, 1152), (1152, 3072), (3072, 12288), (12288, 3072),
           (15360, 3072))
QUICK_SHAPES = ((1024, 1152, 1152), (8192, 1152, 4608), (8192, 4608, 1152), (16384, 3072, 12288),
                (65536, 1152, 4608))


def gemm_shapes(mode: str) -> list[tuple[int, int, int]]:
    """``(M, K, N)`` to measure; M=65536 only where K and N are <= 4608 (bounds memory)."""
    if mode == "quick":
        return list(QUICK_SHAPES)
    if mode not in ("", "full"):
        raise pytest.UsageError(f"VIDITQ_BENCH_CUDA_SHAPES must be 'quick' or 'full', got {mode!r}")
    return [(m, k, n) for m in GEMM_M for k, n in GEMM_KN if m < 65536 or max(k, n) <= 4608]


SHAPES = gemm_shapes(os.environ.get("VIDITQ_BENCH_CUDA_SHAPES", "").strip().lower())
GEMM_VARIANTS = ("bf16-cublas", "bf16-compiled", "int-mm", "viditq-w8a8", "viditq-w8a8-triton", "viditq-w8a8-int-mm",
                 "viditq-w8a8-dyn", "viditq-w4a8", "viditq-w4a8-g128", "viditq-w4a4", "torchao-int8-dyn",
                 "torchao-fp8-rowwise")
W8A8_ROUTES = {"viditq-w8a8": None, "viditq-w8a8-triton": "triton", "viditq-w8a8-int-mm": "int_mm"}
"""The W8A8 GEMM routes of ``viditq.qlinear`` on CUDA (``kernels.gemm_choice``): the timed choice per
shape bucket (None), and each route forced."""
# Floors that catch a broken variant (garbage is <= 0 dB), not quality targets. Measured with the
# numerics reference on these Gaussian operands (M=64): W8A8 37-39 dB, W4A8 16.4-18 dB (per channel; K=15360 lowest),
# W4A8 g128 20 dB, W4A4 12.7-14.3 dB.
GEMM_SQNR_FLOOR_DB = {"viditq-w4a4": 5.0}
DEFAULT_SQNR_FLOOR_DB = 15.0

# ----------------------------------------------------------------------------- shared helpers


def _gate(config) -> str | None:
    """Why this module does not run here, or None: it runs only when named on the command line."""
    here = Path(__file__).resolve()
    for arg in config.args:
        path = Path(config.invocation_params.dir, str(arg).split("::")[0])
        if path.exists() and path.resolve() == here:
            return None
    return "the CUDA suite runs only when named: make bench-cuda (pytest benchmarks/test_bench_cuda.py)"


@pytest.fixture(scope="module", autouse=True)
def _only_when_named(request):
    reason = _gate(request.config)
    if reason:
        pytest.skip(reason)


@pytest.fixture(autouse=True)
def _fresh_state():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def _skip_without(module: str, reason: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(reason)


def _torchao(name: str):
    """A torchao.quantization attribute, or a skip naming what is missing."""
    try:
        import torchao.quantization as tq
    except Exception as exc:  # ImportError, or a broken install (native libs, API drift)
        pytest.skip(f"torchao not importable ({type(exc).__name__}: {exc})")
    if not hasattr(tq, name):
        pytest.skip(f"torchao {getattr(sys.modules.get('torchao'), '__version__', '?')} has no {name}")
    return getattr(tq, name)


def _reset_memory() -> int:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _first_call(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def _inner_iterations(fn: Callable[[], Any]) -> int:
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return max(1, min(MAX_INNER, math.ceil(TARGET_ROUND_S / max(min(times), 1e-9))))


def _synced_every(fn: Callable[[], Any], inner: int) -> Callable[[], Any]:
    """``fn`` that synchronizes after every ``inner``-th call: a pedantic round of ``inner``
    iterations then spans the launches up to the completion of the last one."""
    count = [0]

    def run():
        out = fn()
        count[0] += 1
        if count[0] % inner == 0:
            torch.cuda.synchronize()
        return out

    return run


def _measure(benchmark, fn: Callable[[], Any], info: dict, baseline_bytes: int) -> None:
    """Time ``fn`` (already called once). Peak memory is the steady state: the peak is reset here,
    after the first call, whose autotuning / compile buffers go to ``first_call_peak_mem_bytes``."""
    torch.cuda.synchronize()
    info.update(baseline_mem_bytes=baseline_bytes, first_call_peak_mem_bytes=torch.cuda.max_memory_allocated())
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    inner = _inner_iterations(fn)
    info.update(inner_iterations=inner, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
    benchmark.extra_info.update(info)
    benchmark.pedantic(_synced_every(fn, inner), rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS,
                       iterations=inner)
    torch.cuda.synchronize()
    benchmark.extra_info["peak_mem_bytes"] = torch.cuda.max_memory_allocated()


def _median_s(benchmark) -> float | None:
    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
    return stats.stats.median if stats is not None else None


def _device_info() -> dict:
    import importlib.metadata as md

    def version(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    return {"device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "versions": {d: version(d) for d in ("triton", "torchao", "diffusers", "viditq-compile")}}


def _check_sqnr(name: str, sqnr: float, floor: float) -> None:
    # before the timing: a broken variant must not publish one
    assert math.isfinite(sqnr) and sqnr > floor, f"{name}: SQNR {sqnr:.2f} dB is not above {floor} dB"


def gemm_route(m: int, k: int, n: int, device) -> str | None:
    """The route (and why) the last bf16-out, biased, symmetric W8A8 ``viditq.qlinear`` of shape
    ``(M, K, N)`` on ``device`` took (``ops/cuda.routes``), or None when none ran."""
    from viditq_compile.kernels import gemm_choice
    from viditq_compile.ops import cuda as viditq_cuda

    variant = gemm_choice.variant_name(False, True, "none", False, False, torch.bfloat16)
    key = (gemm_choice.m_bucket(m), k, n, variant, gemm_choice.device_capability(torch.device(device)))
    return viditq_cuda.routes().get(key)


def _new_fallbacks(before: dict) -> list:
    from viditq_compile.ops import cuda as viditq_cuda

    return [k for k in viditq_cuda.fallbacks() if k not in before]


# ----------------------------------------------------------------------------- GEMM level


@dataclasses.dataclass
class GemmCase:
    m: int
    k: int
    n: int
    x: torch.Tensor          # [M, K] bf16 cuda
    w: torch.Tensor          # [N, K] bf16 cuda
    bias: torch.Tensor       # [N] bf16 cuda
    reference: torch.Tensor  # [M, N] fp32 cpu: float64 GEMM of the bf16 operands, rounded

    @property
    def group(self) -> str:
        return f"gemm-M{self.m}-K{self.k}-N{self.n}"


@pytest.fixture(scope="module", params=SHAPES, ids=[f"M{m}-K{k}-N{n}" for m, k, n in SHAPES])
def gemm_case(request):
    m, k, n = request.param
    g = torch.Generator(device="cuda").manual_seed(SEED)
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(n, k, device="cuda", generator=g) * k ** -0.5).to(torch.bfloat16)
    bias = (torch.randn(n, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    ref = torch.addmm(bias.double(), x.double(), w.double().t()).float().cpu()
    case = GemmCase(m, k, n, x, w, bias, ref)
    yield case
    del case, x, w, bias, ref
    gc.collect()
    torch.cuda.empty_cache()


def _linear(case: GemmCase) -> torch.nn.Linear:
    lin = torch.nn.Linear(case.k, case.n, bias=True, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(case.w)
        lin.bias.copy_(case.bias)
    return lin.requires_grad_(False).eval()


def _bf16_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w, bias)


def _identity(out: torch.Tensor) -> torch.Tensor:
    return out


def _build_gemm(name: str, case: GemmCase) -> tuple[Callable[[], torch.Tensor], dict, Callable]:
    """``(fn, info, to_float)``: ``fn()`` is what is timed, ``to_float(fn())`` the [M, N] result."""
    x, w, bias = case.x, case.w, case.bias
    ident = _identity
    if name == "bf16-cublas":
        return lambda: F.linear(x, w, bias), {"weight_bytes": tensor_bytes(w) + tensor_bytes(bias)}, ident
    if name == "bf16-compiled":
        fn = torch.compile(_bf16_linear, mode="max-autotune-no-cudagraphs", dynamic=False)
        return lambda: fn(x, w, bias), {"weight_bytes": tensor_bytes(w) + tensor_bytes(bias)}, ident
    if name.startswith("torchao-"):
        if name == "torchao-fp8-rowwise":
            if torch.cuda.get_device_capability() < (8, 9):
                pytest.skip("fp8 needs compute capability >= 8.9")
            config = _torchao("Float8DynamicActivationFloat8WeightConfig")(granularity=_torchao("PerRow")())
        else:
            config = _torchao("Int8DynamicActivationInt8WeightConfig")()
        lin = _linear(case)
        _torchao("quantize_")(lin, config)
        fn = torch.compile(lin, mode="max-autotune-no-cudagraphs", dynamic=False)
        return lambda: fn(x), {"weight_bytes": module_bytes(lin)}, ident

    xq, xs = numerics.quantize_per_token(x, 8)
    if name == "int-mm":
        qw = numerics.quantize_weight(w, bits=8, sym=True)
        wt = qw.q.t()  # [K, N] column-major, the layout cuBLASLt's int8 GEMM wants
        # the int32 accumulator is dequantized outside the timing, only to check the SQNR
        return (lambda: torch._int_mm(xq, wt), {"weight_bytes": tensor_bytes(qw.q)},
                lambda acc: numerics.dequantize_epilogue(acc, xs, qw.scale, bias=bias))

    _skip_without("triton", "triton not installed: the viditq CUDA kernels are Triton kernels")
    from viditq_compile.numerics.packing import pack_int4

    if name in W8A8_ROUTES or name == "viditq-w8a8-dyn":
        from viditq_compile.kernels import gemm_choice

        qw = numerics.quantize_weight(w, bits=8, sym=True)
        info = {"weight_bytes": tensor_bytes(qw.q) + tensor_bytes(qw.scale) + tensor_bytes(bias)}
        if name in W8A8_ROUTES:
            route = W8A8_ROUTES[name]

            def w8a8():
                with gemm_choice.forced(route):  # None: the timed choice, whatever VIDITQ_GEMM_ROUTE says
                    return torch.ops.viditq.qlinear(xq, xs, qw.q, qw.scale, None, bias, 8, 0, torch.bfloat16)

            return w8a8, info, ident
        return lambda: torch.ops.viditq.w8a8_linear(x, qw.q, qw.scale, None, bias, 8), info, ident
    group = 128 if name == "viditq-w4a8-g128" else 0
    qw = numerics.quantize_weight(w, bits=4, sym=False, group=group or None)  # w4a8 recipes: asymmetric
    wp = pack_int4(qw.q)
    info = {"weight_bytes": sum(tensor_bytes(t) for t in (wp, qw.scale, qw.zero, bias)), "group_size": group}
    if name == "viditq-w4a4":
        from viditq_compile.kernels.quantize_act import quantize_act_triton

        def w4a4():
            # packed two per byte, as the composed ops pass them (ops/cuda.py _quantize_for_gemm): the
            # GEMM reads half the activation bytes and unpacks in registers. (viditq.qlinear on the
            # int8-held 4-bit values would time the W4A8 kernel.)
            xq4, xs4 = quantize_act_triton(x, None, [], None, 4, pack=True)
            return torch.ops.viditq.qlinear_fused(xq4, xs4, wp, qw.scale, qw.zero, bias, 4, 0, torch.bfloat16,
                                                  "none", None, None, True)

        return w4a4, info, ident
    return (lambda: torch.ops.viditq.qlinear(xq, xs, wp, qw.scale, qw.zero, bias, 4, group, torch.bfloat16),
            info, ident)


@pytest.mark.parametrize("variant", GEMM_VARIANTS)
def test_gemm(benchmark, gemm_case, variant):
    from viditq_compile.ops import cuda as viditq_cuda

    case = gemm_case
    benchmark.group = case.group
    fallbacks = viditq_cuda.fallbacks()
    with torch.no_grad():
        baseline = _reset_memory()
        fn, info, to_float = _build_gemm(variant, case)
        out, first_s = _first_call(fn)
        sqnr = numerics.sqnr_db(case.reference, to_float(out).float().cpu())
        del out
        new = _new_fallbacks(fallbacks)
        assert not new, f"{variant}: ran the reference path, not the Triton kernel, for {new}"
        _check_sqnr(variant, sqnr, GEMM_SQNR_FLOOR_DB.get(variant, DEFAULT_SQNR_FLOOR_DB))
        info.update(variant=variant, M=case.m, N=case.n, K=case.k, sqnr_db=round(sqnr, 2),
                    first_call_s=round(first_s, 3), out_dtype="int32" if variant == "int-mm" else "bf16",
                    act_quant_timed=variant in ("viditq-w8a8-dyn", "viditq-w4a4") or variant.startswith("torchao-"),
                    **_device_info())
        if variant in W8A8_ROUTES:
            info["gemm_route"] = gemm_route(case.m, case.k, case.n, "cuda")
        _measure(benchmark, fn, info, baseline)
    median = _median_s(benchmark)
    if median:
        benchmark.extra_info["tflops"] = round(2 * case.m * case.n * case.k / median / 1e12, 2)


# ----------------------------------------------------------------------------- block / model level

IMAGE_TOKENS = 4096   # PixArt-Σ at 1024 px: 128x128 latent, 2x2 patches
CAPTION_TOKENS = 300  # PixArt-Σ's T5 length
VIDEO = dict(frames=16, space=1024, caption=120)  # ViDiT-Q's OpenSORA: 16 frames at 512 px
BATCH = 2             # the CFG pair


@dataclasses.dataclass
class ModelCase:
    name: str
    model: torch.nn.Module            # fp32, cpu, eval
    args: tuple
    kwargs: dict
    calib_calls: list                 # [(args, kwargs)] fp32 cpu, other seeds than the timed inputs
    reference: torch.Tensor | None = None   # fp32 eager output on cuda, as cpu fp32
    stats: Any = None

    def calibration(self):
        """Calibration statistics for the balanced recipes, computed on the GPU once."""
        import viditq_compile as vq

        if self.stats is None:
            self.model.to("cuda")
            try:
                calls = [_to(c, "cuda", None) for c in self.calib_calls]
                self.stats = vq.calibrate(self.model, calls, progress=False)
            finally:
                self.model.to("cpu")
        return self.stats


def _to(v: Any, device: str | None, dtype: torch.dtype | None) -> Any:
    """``v`` (nested tuples / lists / dicts of tensors) on ``device``, float activations cast to
    ``dtype``. 1-D float tensors are diffusion timesteps: samplers keep them fp32 (in bf16, t=750.3
    would be 752)."""
    if isinstance(v, torch.Tensor):
        cast = dtype is not None and v.is_floating_point() and v.dim() > 1
        return v.to(device=device, dtype=dtype if cast else None)
    if isinstance(v, (tuple, list)):
        return type(v)(_to(x, device, dtype) for x in v)
    if isinstance(v, dict):
        return {k: _to(x, device, dtype) for k, x in v.items()}
    return v


def _first_tensor(out: Any) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def _seeded(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    from viditq_demo.demo_model import heavy_tailed_

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)  # scale_shift_table and other default inits
        model = factory()
    heavy_tailed_(model, torch.Generator().manual_seed(SEED))
    return model.eval().requires_grad_(False)


def _block_inputs(seed: int, dim: int = 1152) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, IMAGE_TOKENS, dim, generator=g)
    text = torch.randn(BATCH, CAPTION_TOKENS, dim, generator=g)
    t = torch.randn(BATCH, 6 * dim, generator=g)  # the embedded adaLN-single vector
    return (x, text, t), {}


def _pixart_block_diffusers() -> ModelCase:
    _skip_without("diffusers", "diffusers not installed")
    from diffusers.models.attention import BasicTransformerBlock

    block = _seeded(lambda: BasicTransformerBlock(
        dim=1152, num_attention_heads=16, attention_head_dim=72, cross_attention_dim=1152,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, attention_bias=True,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6))

    def inputs(seed):
        (x, text, t), _ = _block_inputs(seed)
        return (x,), {"encoder_hidden_states": text, "timestep": t}

    return ModelCase("block-pixart-sigma", block, *inputs(SEED + 1), [inputs(SEED + 100 + i) for i in range(2)])


def _pixart_block_demo() -> ModelCase:
    from viditq_demo.demo_model import BasicTransformerBlock

    def factory():
        block = BasicTransformerBlock(1152, heads=16, dim_head=72, mlp_ratio=4)
        torch.nn.init.normal_(block.scale_shift_table, std=1152 ** -0.5)  # built empty, as in DemoDiT
        return block

    block = _seeded(factory)
    return ModelCase("block-pixart-sigma-demo", block, *_block_inputs(SEED + 1),
                     [_block_inputs(SEED + 100 + i) for i in range(2)])


def _zoo():
    """tests/zoo.py (torch-only builders) loaded by path: benchmarks do not put tests/ on sys.path."""
    if "viditq_bench_zoo" not in sys.modules:
        spec = importlib.util.spec_from_file_location("viditq_bench_zoo", REPO / "tests" / "zoo.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["viditq_bench_zoo"]


class STDiT3Pair(torch.nn.Module):
    """One spatial and one temporal OpenSORA STDiT3 block, fed the shared adaLN-single vector as
    the PixArt block is. (``zoo.STDiT3Stack`` also embeds the timestep, in fp32 only.)"""

    def __init__(self, dim: int, heads: int, frames: int, space: int):
        super().__init__()
        zoo = _zoo()
        self.frames, self.space = frames, space
        self.spatial = zoo.STDiT3Block(dim, heads)
        self.temporal = zoo.STDiT3Block(dim, heads, temporal=True)

    def forward(self, x: torch.Tensor, y: torch.Tensor, t_mod: torch.Tensor) -> torch.Tensor:
        x = self.spatial(x, y, t_mod, self.frames, self.space)
        return self.temporal(x, y, t_mod, self.frames, self.space)


def _stdit3_block() -> ModelCase:
    frames, space, caption = VIDEO["frames"], VIDEO["space"], VIDEO["caption"]
    model = _seeded(lambda: STDiT3Pair(1152, 16, frames, space))

    def inputs(seed):
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(BATCH, frames * space, 1152, generator=g), torch.randn(BATCH, caption, 1152, generator=g),
                torch.randn(BATCH, 6 * 1152, generator=g)), {}

    return ModelCase("block-stdit3", model, *inputs(SEED + 1), [inputs(SEED + 100 + i) for i in range(2)])


SIGMA = dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
             sample_size=128, patch_size=2, caption_channels=4096)


def _pixart_sigma_diffusers() -> ModelCase:
    _skip_without("diffusers", "diffusers not installed")
    from diffusers import PixArtTransformer2DModel

    model = _seeded(lambda: PixArtTransformer2DModel(
        **SIGMA, cross_attention_dim=1152, norm_type="ada_norm_single", use_additional_conditions=False,
        norm_elementwise_affine=False, norm_eps=1e-6))

    def inputs(seed, t):
        g = torch.Generator().manual_seed(seed)
        return (), {"hidden_states": torch.randn(BATCH, 4, 128, 128, generator=g),
                    "encoder_hidden_states": torch.randn(BATCH, CAPTION_TOKENS, 4096, generator=g),
                    "timestep": torch.full((BATCH,), t, dtype=torch.long),
                    "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}, "return_dict": False}

    return ModelCase("model-pixart-sigma", model, *inputs(SEED + 1, 500),
                     [inputs(SEED + 100, 999), inputs(SEED + 101, 200)])


def _pixart_sigma_demo() -> ModelCase:
    from viditq_demo.demo_model import DemoConfig, build_demo_model, demo_inputs

    # no injected outlier channels: the same weight law as the diffusers build, so both agree
    config = DemoConfig(**SIGMA, caption_length=CAPTION_TOKENS, num_outlier_channels=0)
    model = build_demo_model(config, seed=SEED).requires_grad_(False)
    return ModelCase("model-pixart-sigma-demo", model, (), demo_inputs(config, BATCH, seed=SEED + 1),
                     [((), demo_inputs(config, BATCH, seed=SEED + 100 + i)) for i in range(2)])


MODEL_CASES = {
    "pixart-sigma-block": _pixart_block_diffusers,
    "pixart-sigma-block-demo": _pixart_block_demo,
    "stdit3-block": _stdit3_block,
    "pixart-sigma-28": _pixart_sigma_diffusers,
    "pixart-sigma-28-demo": _pixart_sigma_demo,
}
MODEL_VARIANTS = ("bf16-eager", "bf16-compiled", "torchao-int8-dyn", "viditq-w8a8", "viditq-w4a8", "viditq-w4a4")
# Floors against the fp32 output; errors compound over 28 blocks of random (untrained) weights.
MODEL_SQNR_FLOOR_DB = {"viditq-w4a8": 10.0, "viditq-w4a4": 5.0}


def _recipe(variant: str):
    """The recipe, and the (weight, act) widths every quantized layer must end up with."""
    import viditq_compile as vq
    from viditq_compile.config.recipe import QuantSpec

    if variant == "viditq-w8a8":
        return "w8a8", (8, 8)
    if variant == "viditq-w4a8":
        return "w4a8", (4, 8)
    # no uniform W4A4 preset (w4a4-mp searches widths): w4a8 (ViDiT-Q balancing) at 4-bit activations
    return vq.Recipe.preset("w4a8").with_(name="w4a4", act=QuantSpec(n_bits=(4,), sym=True)), (4, 4)


def _ensure_viditq_backend() -> None:
    from torch._dynamo.backends.registry import lookup_backend, register_backend

    try:
        lookup_backend("viditq")
    except Exception:  # the package is not pip-installed, so its entry point is not there
        from viditq_compile.backend import viditq_backend

        register_backend(viditq_backend, name="viditq")


def _build_model(variant: str, case: ModelCase) -> tuple[Callable[[], Any], dict]:
    args, kwargs = _to((case.args, case.kwargs), "cuda", torch.bfloat16)
    info: dict = {}
    if variant.startswith("viditq-"):
        import viditq_compile as vq

        _skip_without("triton", "triton not installed: the viditq CUDA kernels are Triton kernels")
        _ensure_viditq_backend()
        recipe, widths = _recipe(variant)
        stats = case.calibration() if widths != (8, 8) else None  # w8a8 stays data-free, as `make bench`
        # quantized on the CPU and moved, as tests/lowering/test_cuda.py does: the passes make
        # their constants (Hadamard factors) on the CPU
        cpu_args, cpu_kwargs = _to((case.args, case.kwargs), "cpu", torch.bfloat16)
        t0 = time.perf_counter()
        qm = vq.quantize(copy.deepcopy(case.model).to(torch.bfloat16), cpu_args, cpu_kwargs, recipe=recipe,
                         calibration=stats)
        info["quantize_s"] = round(time.perf_counter() - t0, 1)
        got = {v[:2] for lp in qm.plan.layers.values() if lp.quantized for v in lp.versions()}
        assert got == {widths}, f"{variant}: quantized layers have (weight, act) bits {sorted(got)}"
        info["quantized_layers"] = qm.report.summary()
        wb = qm.weight_bytes
        info["weight_bytes"] = int(wb() if callable(wb) else wb)
        fn = qm.to("cuda").compile()
        return lambda: fn(*args, **kwargs), info
    model = copy.deepcopy(case.model).to("cuda", torch.bfloat16)
    if variant == "torchao-int8-dyn":
        # every nn.Linear, as torchao is used (viditq keeps embedders and adaLN linears in floating point)
        _torchao("quantize_")(model, _torchao("Int8DynamicActivationInt8WeightConfig")())
    info["weight_bytes"] = module_bytes(model)
    fn = model if variant == "bf16-eager" else torch.compile(model)
    return lambda: fn(*args, **kwargs), info


@pytest.fixture(scope="module", params=list(MODEL_CASES))
def model_case(request):
    case = MODEL_CASES[request.param]()
    args, kwargs = _to((case.args, case.kwargs), "cuda", None)
    case.model.to("cuda")
    try:
        with torch.no_grad():
            case.reference = _first_tensor(case.model(*args, **kwargs)).float().cpu()
    finally:
        case.model.to("cpu")
    del args, kwargs
    yield case
    del case
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("variant", MODEL_VARIANTS)
def test_model(benchmark, model_case, variant):
    from viditq_compile.ops import cuda as viditq_cuda

    case = model_case
    benchmark.group = case.name
    fallbacks = viditq_cuda.fallbacks()
    with torch.no_grad():
        baseline = _reset_memory()
        fn, info = _build_model(variant, case)
        out, first_s = _first_call(fn)
        sqnr = numerics.sqnr_db(case.reference, _first_tensor(out).float().cpu())
        del out
        new = _new_fallbacks(fallbacks)
        assert not new, f"{variant}: ran the reference path, not the Triton kernel, for {new}"
        _check_sqnr(variant, sqnr, MODEL_SQNR_FLOOR_DB.get(variant, DEFAULT_SQNR_FLOOR_DB))
        params = sum(p.numel() for p in case.model.parameters())
        info.update(variant=variant, model=case.name, params=params, batch=BATCH, sqnr_db=round(sqnr, 2),
                    first_call_s=round(first_s, 2), **_device_info())
        _measure(benchmark, fn, info, baseline)
