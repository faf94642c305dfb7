"""Shared setup for the block benchmark (``benchmarks/test_bench_block.py``).

The block is one PixArt-Σ transformer block (diffusers ``BasicTransformerBlock`` with
adaLN-single), seeded and re-drawn heavy-tailed. The video block (``test_stdit3_block``, group
``stdit3-block``) is one OpenSORA STDiT3 spatial + temporal block pair at video length (self- and
cross-attention, MLP, adaLN-single modulation from a shared ``[B, 6 * dim]`` vector), built from
``tests/zoo.py``'s ``STDiT3Block`` loaded by path (torch-only; ``tests/`` is not imported as a
package), for ``VIDEO_VARIANTS`` only.

Environment switches
- ``VIDITQ_BENCH_SMALL=1``  hidden 128 / 2 heads / 64 tokens / 16 text tokens (smoke check only;
  never publish numbers from it).
- ``VIDITQ_BENCH_BATCH``    batch size (default 2).
- ``VIDITQ_BENCH_ROUNDS``   timed rounds per variant (default 5; 2 warm-up rounds come on top).
- ``VIDITQ_BENCH_THREADS``  ``torch.set_num_threads`` for the run (default: torch's choice).
- ``VIDITQ_BENCH_VIDEO``    ``FRAMESxTOKENS`` of the video block (default ``8x256``: 8 frames of a
  16x16-patch latent; OpenSORA at 512 px is ``8x1024``, about 4x the time). Hidden 1152 / 16
  heads, 120 caption tokens, the batch of ``VIDITQ_BENCH_BATCH``; under ``VIDITQ_BENCH_SMALL``
  hidden 128 / 2 heads, 16 caption tokens and a ``2x16`` default.

Timings are only meaningful on an otherwise idle machine: with more runnable threads than cores,
OpenMP barriers stall and a variant can slow down 10-100x (seen in smoke runs). The 1-minute
load average before each variant's timed rounds is recorded in ``extra_info["loadavg_1m"]``.

Each variant is built once (module-scoped, parametrized fixture ``variant``): the model is copied,
converted/quantized, and for compiled variants called once with Inductor's caches disabled, so
``compile_s`` is a cold compile. That first call's output gives the SQNR against the fp32 eager
output. Only ``benchmark.pedantic`` rounds are timed. A variant is torn down (and Dynamo reset)
before the next one is built.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

# ----------------------------------------------------------------------------- configuration


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise pytest.UsageError(f"{name} must be an integer, got {raw!r}") from None
    if value < 1:
        raise pytest.UsageError(f"{name} must be >= 1, got {value}")
    return value


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    dim: int
    heads: int
    head_dim: int
    tokens: int
    text_tokens: int
    batch: int
    small: bool

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


SMALL = _env_flag("VIDITQ_BENCH_SMALL")
if SMALL:
    CONFIG = BlockConfig(dim=128, heads=2, head_dim=64, tokens=64, text_tokens=16,
                         batch=_env_int("VIDITQ_BENCH_BATCH", 2), small=True)
else:  # PixArt-Σ: 1152 = 16 x 72, 1024 image tokens (32x32 latent patches), 120 caption tokens
    CONFIG = BlockConfig(dim=1152, heads=16, head_dim=72, tokens=1024, text_tokens=120,
                         batch=_env_int("VIDITQ_BENCH_BATCH", 2), small=False)
ROUNDS = _env_int("VIDITQ_BENCH_ROUNDS", 5)


@dataclasses.dataclass(frozen=True)
class VideoConfig:
    dim: int
    heads: int
    frames: int
    tokens: int  # per frame
    text_tokens: int
    batch: int
    small: bool

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _video_shape(default: str) -> tuple[int, int]:
    raw = os.environ.get("VIDITQ_BENCH_VIDEO", "").strip() or default
    parts = raw.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise pytest.UsageError(f"VIDITQ_BENCH_VIDEO must be FRAMESxTOKENS (e.g. 8x1024), got {raw!r}")
    return int(parts[0]), int(parts[1])


if SMALL:
    _frames, _tokens = _video_shape("2x16")
    VIDEO = VideoConfig(dim=128, heads=2, frames=_frames, tokens=_tokens, text_tokens=16,
                        batch=CONFIG.batch, small=True)
else:
    _frames, _tokens = _video_shape("8x256")
    VIDEO = VideoConfig(dim=1152, heads=16, frames=_frames, tokens=_tokens, text_tokens=120,
                        batch=CONFIG.batch, small=False)
if os.environ.get("VIDITQ_BENCH_THREADS", "").strip():
    torch.set_num_threads(_env_int("VIDITQ_BENCH_THREADS", 1))
WARMUP_ROUNDS = 2
SEED = 0

# ----------------------------------------------------------------------------- optional deps

try:  # torchao is the optional `bench` extra
    import torchao  # noqa: F401
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    TORCHAO_ERROR: str | None = None
except Exception as exc:  # ImportError, or a broken install (missing native libs, API drift)
    TORCHAO_ERROR = (f"torchao is not importable ({type(exc).__name__}: {exc}); it is the optional "
                     f"'bench' extra: pip install -e '.[bench]'")

# ----------------------------------------------------------------------------- helpers


def build_block(cfg: BlockConfig = CONFIG) -> torch.nn.Module:
    """The PixArt-Σ block in fp32, eval mode, seeded heavy-tailed weights."""
    from diffusers.models.attention import BasicTransformerBlock

    from viditq_demo.demo_model import heavy_tailed_

    torch.manual_seed(SEED)  # scale_shift_table and any other default init
    block = BasicTransformerBlock(
        dim=cfg.dim,
        num_attention_heads=cfg.heads,
        attention_head_dim=cfg.head_dim,
        cross_attention_dim=cfg.dim,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        attention_bias=True,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    ).eval()
    block.requires_grad_(False)
    with torch.no_grad():
        heavy_tailed_(block, torch.Generator().manual_seed(SEED))
    return block


def build_inputs(cfg: BlockConfig = CONFIG) -> tuple[tuple, dict]:
    """``(args, kwargs)`` for ``block(*args, **kwargs)`` in fp32.

    ``timestep`` is the already-embedded adaLN-single vector ``[B, 6 * dim]``.
    """
    g = torch.Generator().manual_seed(SEED + 1)
    x = torch.randn(cfg.batch, cfg.tokens, cfg.dim, generator=g)
    text = torch.randn(cfg.batch, cfg.text_tokens, cfg.dim, generator=g)
    t = torch.randn(cfg.batch, 6 * cfg.dim, generator=g)
    return (x,), {"encoder_hidden_states": text, "timestep": t}


def _zoo():
    """``tests/zoo.py`` loaded by path under its own name (benchmarks do not import ``tests``)."""
    import importlib.util
    from pathlib import Path

    if "viditq_bench_zoo" not in sys.modules:
        path = Path(__file__).resolve().parent.parent / "tests" / "zoo.py"
        spec = importlib.util.spec_from_file_location("viditq_bench_zoo", path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[spec.name] = module  # type: ignore[union-attr]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    return sys.modules["viditq_bench_zoo"]


class STDiT3Pair(torch.nn.Module):
    """One spatial and one temporal OpenSORA STDiT3 block (``tests/zoo.py``), both modulated by
    the shared adaLN-single vector ``t_mod [B, 6 * dim]``. forward(x [B, frames * tokens, dim],
    caption [B, L, dim], t_mod) -> [B, frames * tokens, dim]."""

    def __init__(self, cfg: VideoConfig):
        super().__init__()
        zoo = _zoo()
        self.frames, self.space = cfg.frames, cfg.tokens
        self.spatial = zoo.STDiT3Block(cfg.dim, cfg.heads)
        self.temporal = zoo.STDiT3Block(cfg.dim, cfg.heads, temporal=True)

    def forward(self, x: torch.Tensor, y: torch.Tensor, t_mod: torch.Tensor) -> torch.Tensor:
        x = self.spatial(x, y, t_mod, self.frames, self.space)
        return self.temporal(x, y, t_mod, self.frames, self.space)


def build_video_block(cfg: VideoConfig = VIDEO) -> torch.nn.Module:
    """The STDiT3 pair in fp32, eval mode, seeded heavy-tailed weights."""
    from viditq_demo.demo_model import heavy_tailed_

    torch.manual_seed(SEED)
    block = STDiT3Pair(cfg).eval()
    block.requires_grad_(False)
    with torch.no_grad():
        heavy_tailed_(block, torch.Generator().manual_seed(SEED))
    return block


def build_video_inputs(cfg: VideoConfig = VIDEO, seed: int = SEED + 1) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(cfg.batch, cfg.frames * cfg.tokens, cfg.dim, generator=g),
            torch.randn(cfg.batch, cfg.text_tokens, cfg.dim, generator=g),
            torch.randn(cfg.batch, 6 * cfg.dim, generator=g)), {}


def cast_inputs(args: tuple, kwargs: dict, dtype: torch.dtype) -> tuple[tuple, dict]:
    def cast(v):
        return v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; tensor subclasses (torchao's quantized weights) are unwrapped."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def module_bytes(m: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer of ``m`` (unwrapping quantized tensor subclasses)."""
    tensors = list(m.parameters()) + list(m.buffers())
    return sum(tensor_bytes(t) for t in tensors)


def rss_mb() -> float | None:
    """Current resident set size in MiB (Linux), else None."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if platform.system() == "Linux" else kb / 2**20  # macOS reports bytes


def sqnr_or_none(reference: torch.Tensor, out: Any) -> float | None:
    """SQNR in dB of ``out`` against ``reference``; None when identical (infinite)."""
    from viditq_compile.numerics.quant import sqnr_db

    if isinstance(out, (tuple, list)):
        out = out[0]
    value = sqnr_db(reference, out.float())
    return None if value == float("inf") else round(value, 3)


def _timed_cold_call(fn: Callable, args: tuple, kwargs: dict) -> tuple[Any, float]:
    """First call of a compiled callable, with Inductor / AOT caches off: a cold compile."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(force_disable_caches=True), torch.no_grad():
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        return out, time.perf_counter() - t0


@dataclasses.dataclass
class Variant:
    """A runnable variant: ``run()`` is what the benchmark times."""

    name: str
    run: Callable[[], Any]
    extra_info: dict


# ----------------------------------------------------------------------------- variant builders

VARIANTS = {
    # name: (kind, dtype, viditq recipe)
    "fp32-eager": ("eager", torch.float32, None),
    "bf16-eager": ("eager", torch.bfloat16, None),
    "fp32-inductor": ("inductor", torch.float32, None),
    "bf16-inductor": ("inductor", torch.bfloat16, None),
    "torchao-int8-bf16": ("torchao", torch.bfloat16, None),
    "torchao-int8-fp32": ("torchao", torch.float32, None),
    "viditq-w8a8-fp32": ("viditq", torch.float32, "w8a8"),
    "viditq-w8a8-bf16": ("viditq", torch.bfloat16, "w8a8"),
    # ViDiT-Q balancing (smoothing + Hadamard rotation, calibrated) at W8A8 and W4A8
    "viditq-w8a8-balanced-bf16": ("viditq", torch.bfloat16, "w8a8-viditq"),
    "viditq-w4a8-balanced-bf16": ("viditq", torch.bfloat16, "w4a8"),
    # the out projections' balancing folded into the value projections (one rotation per head)
    "viditq-w8a8-folded-bf16": ("viditq", torch.bfloat16, "w8a8-viditq+fold"),
    # int8 self / temporal attention (viditq.attention) beside the W8A8 linears
    "viditq-w8a8-attn-bf16": ("viditq", torch.bfloat16, "w8a8+attn"),
}
CALIBRATION_CALLS = 4
VIDEO_VARIANTS = ["fp32-inductor", "bf16-inductor", "torchao-int8-bf16", "viditq-w8a8-fp32",
                  "viditq-w8a8-bf16", "viditq-w8a8-attn-bf16"]
"""The variants the video block runs (named as the PixArt block's, so ``-k <variant>`` selects
both)."""

_DTYPE_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def resolve_recipe(name: str):
    """A variant's recipe: a preset, with ``+fold`` (``fold_balance``) or ``+attn`` (int8 self and
    temporal attention) on top."""
    import dataclasses

    from viditq_compile.config.recipe import PRESETS, AttentionRule

    base, _, extra = name.partition("+")
    r = PRESETS[base]
    if extra == "fold":
        return dataclasses.replace(r, name=name, fold_balance=True)
    if extra == "attn":
        return dataclasses.replace(r, name=name, attention=AttentionRule(self_attn="int8", temporal_attn="int8"))
    if extra:
        raise ValueError(f"variant recipe {name!r}: unknown suffix {extra!r}")
    return r


def calibration_calls(cfg: BlockConfig = CONFIG) -> list[tuple[tuple, dict]]:
    """``CALIBRATION_CALLS`` calls of the PixArt block on fresh inputs (seeds apart from the
    timed inputs)."""
    calls = []
    for i in range(CALIBRATION_CALLS):
        g = torch.Generator().manual_seed(SEED + 100 + i)
        calls.append(((torch.randn(cfg.batch, cfg.tokens, cfg.dim, generator=g),),
                      {"encoder_hidden_states": torch.randn(cfg.batch, cfg.text_tokens, cfg.dim, generator=g),
                       "timestep": torch.randn(cfg.batch, 6 * cfg.dim, generator=g)}))
    return calls


def calibration_stats(block: torch.nn.Module, cfg: BlockConfig = CONFIG, calls=None):
    """Input statistics of the block's linears over ``calls`` (default ``calibration_calls``)."""
    from viditq_compile import calibrate

    return calibrate(block, calls if calls is not None else calibration_calls(cfg), progress=False)


def _build_variant(name: str, base: torch.nn.Module, base_inputs: tuple[tuple, dict],
                   reference: torch.Tensor, config=CONFIG, calls=None) -> Variant:
    """``calls``: calibration calls for the recipes that calibrate (default: the PixArt
    block's, ``calibration_calls``)."""
    kind, dtype, recipe = VARIANTS[name]
    args, kwargs = cast_inputs(*base_inputs, dtype)
    rss0 = rss_mb()
    peak0 = peak_rss_mb()
    model = copy.deepcopy(base).to(dtype).eval()
    info: dict = {
        "variant": name,
        "kind": kind,
        "dtype": _DTYPE_NAME[dtype],
        "batch": config.batch,
        "config": config.as_dict(),
        "threads": torch.get_num_threads(),
        "rounds": ROUNDS,
        "warmup_rounds": WARMUP_ROUNDS,
    }

    if kind == "eager":
        fn = model
        with torch.no_grad():
            out = fn(*args, **kwargs)
        info["compile_s"] = 0.0
        info["weight_bytes"] = module_bytes(model)
    elif kind == "inductor":
        fn = torch.compile(model)
        out, info["compile_s"] = _timed_cold_call(fn, args, kwargs)
        info["weight_bytes"] = module_bytes(model)
    elif kind == "torchao":
        if TORCHAO_ERROR is not None:
            pytest.skip(TORCHAO_ERROR)
        t0 = time.perf_counter()
        quantize_(model, Int8DynamicActivationInt8WeightConfig())
        info["quantize_s"] = time.perf_counter() - t0
        fn = torch.compile(model)
        out, first_call_s = _timed_cold_call(fn, args, kwargs)
        # quantize_ + cold compile, comparable with viditq whose backend quantizes while compiling
        info["compile_s"] = info["quantize_s"] + first_call_s
        info["weight_bytes"] = module_bytes(model)  # int8 qdata + scales (+ zero points) + fp rest
    elif kind == "viditq":
        import viditq_compile
        from viditq_compile import backend as viditq_backend

        stats = calibration_stats(base, calls=calls) if not recipe.startswith("w8a8+") and recipe != "w8a8" \
            else None
        options = {"recipe": resolve_recipe(recipe), "calibration": stats}
        info["recipe"] = recipe
        fn = torch.compile(model, backend="viditq", options=options)
        out, info["compile_s"] = _timed_cold_call(fn, args, kwargs)
        # a viditq timing is only worth publishing if the backend really quantized the block
        report = viditq_backend.last_report()
        if report.num_quantized == 0:
            raise AssertionError(f"{name}: the viditq backend quantized no layer:\n{report}")
        info["quantized_layers"] = report.summary()
        # bytes of the int8 weights + fp32 scales + biases (+ scale_shift_table) the quantized
        # program holds; built by export from an untouched copy of the same-dtype model
        qm = viditq_compile.quantize(copy.deepcopy(base).to(dtype).eval(), args, kwargs,
                                     recipe=resolve_recipe(recipe), calibration=stats)
        info["weight_bytes"] = int(qm.weight_bytes)
        del qm
    else:  # pragma: no cover
        raise AssertionError(kind)

    info["sqnr_db"] = sqnr_or_none(reference, out)
    rss1 = rss_mb()
    if rss0 is not None and rss1 is not None:
        info["rss_delta_mb"] = round(rss1 - rss0, 1)
    info["peak_rss_delta_mb"] = round(peak_rss_mb() - peak0, 1)

    def run():
        with torch.no_grad():
            return fn(*args, **kwargs)

    return Variant(name=name, run=run, extra_info=info)


# ----------------------------------------------------------------------------- pytest hooks


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # not installed, or broken
        return None
    return str(getattr(mod, "__version__", "unknown"))


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record what ``benchmarks/report.py`` needs to describe the run in the JSON itself."""
    machine_info["viditq_bench"] = {
        "versions": {name: _version(name) for name in
                     ("torch", "triton", "torchao", "diffusers", "viditq_compile")},
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "config": CONFIG.as_dict(),
        "video_config": VIDEO.as_dict(),
        "rounds": ROUNDS,
        "warmup_rounds": WARMUP_ROUNDS,
        "command": list(getattr(sys, "orig_argv", sys.argv)),
        "cwd": os.getcwd(),
        "env": {k: v for k, v in sorted(os.environ.items())
                if k.startswith(("VIDITQ_BENCH_", "OMP_", "MKL_", "TORCHINDUCTOR_"))},
    }


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def block() -> torch.nn.Module:
    return build_block()


@pytest.fixture(scope="module")
def block_inputs() -> tuple[tuple, dict]:
    return build_inputs()


@pytest.fixture(scope="module")
def reference(block, block_inputs) -> torch.Tensor:
    """fp32 eager output, the SQNR reference."""
    args, kwargs = block_inputs
    with torch.no_grad():
        return block(*args, **kwargs).detach().clone()


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, block, block_inputs, reference) -> Variant:
    """One variant, built once per module; Dynamo is reset when pytest moves to the next."""
    torch._dynamo.reset()
    v = _build_variant(request.param, block, block_inputs, reference)
    yield v
    del v
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def video_block() -> torch.nn.Module:
    return build_video_block()


@pytest.fixture(scope="module")
def video_inputs() -> tuple[tuple, dict]:
    return build_video_inputs()


@pytest.fixture(scope="module")
def video_reference(video_block, video_inputs) -> torch.Tensor:
    """fp32 eager output of the video block, the SQNR reference."""
    args, kwargs = video_inputs
    with torch.no_grad():
        return video_block(*args, **kwargs).detach().clone()


@pytest.fixture(scope="module", params=VIDEO_VARIANTS)
def video_variant(request, video_block, video_inputs, video_reference) -> Variant:
    """One variant of the video block, built once per module (Dynamo reset around it)."""
    torch._dynamo.reset()
    calls = [build_video_inputs(seed=SEED + 100 + i) for i in range(CALIBRATION_CALLS)]
    v = _build_variant(request.param, video_block, video_inputs, video_reference, VIDEO, calls)
    yield v
    del v
    torch._dynamo.reset()
