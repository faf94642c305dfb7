"""``viditq``: quantize a diffusion transformer from the command line.

    viditq quantize [--model demo|digits|tiny|PATH] [--recipe w8a8|fp|YAML] [--calibration N|FILE]
                    [--batch 2] [--seed 0] [--out DIR] [--no-bench] [--repeats N] [--warm-cache]
    viditq load DIR
    viditq generate --pipeline DIR (--prompt TEXT ... | --class-label N ...) [--recipe w8a8] [--steps 20]
                    [--seed 0] [--height H --width W] [--frames F] [--guidance G] [--out DIR]
    viditq quality [--recipes fp,w8a8,...] [--per-class 10] [--steps 20] [--guidance G]
                   [--seed 0] [--columns 10] [--error-gain 10] [--out DIR]

``quantize`` captures the model on example inputs, quantizes it, and prints (to stdout, for
people) the per-layer report, the output quality against floating point on the example inputs and
on a second input set with another seed and batch size (the program has dynamic shapes), the
weight bytes, and, unless ``--no-bench``, the latency of fp32 eager, ``torch.compile`` (Inductor,
fp32) and the quantized model compiled with the ``viditq`` backend. It then writes the artifact
(``QuantizedModel.save``), loads it back and checks that it reproduces the outputs exactly.

``--model`` is ``demo`` (the built-in ~20 M-parameter PixArt-style DiT, ``DemoConfig.demo()``),
``digits`` (the trained class-conditional digits DiT, ``viditq_demo.digits``; ``--calibration N``
then records N samples' sampler trajectories),
``tiny`` (``DemoConfig.tiny()``), or a diffusers model directory (``config.json`` + weights) of a
family in ``viditq_compile.families`` that builds example inputs from its config
(``PixArtTransformer2DModel``, ``DiTTransformer2DModel``, ``LatteTransformer3DModel``,
``FluxTransformer2DModel``, ``CogVideoXTransformer3DModel``). Other models: use the Python API
(``viditq_compile.quantize(model, args, kwargs)``).

``demo``, ``digits``, ``tiny`` and ``viditq quality`` come from the demo, its own project
(``demo/`` in the repository: ``pip install -e demo``, which ``make install`` runs). The library
never imports it: it finds them by name, through the entry points ``demo/pyproject.toml``
declares (``MODELS_GROUP``: model name -> ``(seed) -> ModelSpec``; ``COMMANDS_GROUP``:
``quality`` -> a module with ``run_quality`` and ``DEFAULT_RECIPES``). Without it those names
fail with an error saying what to install.

Errors the user can fix (bad recipe, missing directory, model that does not export, corrupt
artifact) print one line ``viditq: error: ...`` on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import logging
import os
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import torch

from viditq_compile.api import quantize
from viditq_compile.calibration.observe import resolve_calibration
from viditq_compile.calibration.stats import CalibrationError
from viditq_compile.config.plan import PlanError
from viditq_compile.config.recipe import Recipe, RecipeError
from viditq_compile.families import registry as families
from viditq_compile.graph.capture import BACKEND_HINT, CaptureError
from viditq_compile.io.artifact import ArtifactError
from viditq_compile.io.atomic import Content, PathLike, UnsafePathError, atomic_write_files
from viditq_compile.io.files import parse_json_strict, read_capped
from viditq_compile.io.user_regex import UserRegexError
from viditq_compile.io.yaml_loader import YamlError, short_repr
from viditq_compile.numerics.quant import sqnr_db
from viditq_compile.program import QuantizedModel, load

log = logging.getLogger(__name__)

PROG = "viditq"
USER_ERRORS = (RecipeError, CaptureError, ArtifactError, PlanError, CalibrationError, UnsafePathError,
               YamlError, UserRegexError, ValueError, NotImplementedError, OSError)
"""Exception types reported as ``viditq: error: ...`` (exit 2) instead of a traceback.
(``FileNotFoundError`` is an ``OSError``; the library's errors are all ``ValueError``s, listed for
the reader. The file loaders turn ``RecursionError``, ``TypeError``, ``UnicodeDecodeError`` and the
like from hostile files into these; ``cmd_load`` also catches what an artifact makes torch raise.)"""


class CLIError(Exception):
    """A problem with what the user asked for; the message is printed as is."""


class VerificationError(Exception):
    """The saved artifact does not reproduce the quantized model's outputs (exit status 1)."""


def _first_line(e: BaseException, limit: int = 1000) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# models and their example inputs
# --------------------------------------------------------------------------------------------

@dataclass
class ModelSpec:
    """A model to quantize: ``make_inputs(batch, seed)`` gives keyword arguments for it."""

    name: str
    model: torch.nn.Module
    make_inputs: Callable[[int, int], dict]
    calibration_calls: Callable[[int], list] | None = None
    """``n -> [(args, kwargs), ...]``: calls recorded from the model's own sampler, used by
    ``--calibration N`` instead of random inputs when the model has one."""
    inputs_at: Callable[[int, int, tuple[int, int]], dict] | None = None
    """``(batch, seed, (h, w)) -> kwargs`` at latent size h x w (``--bucket``); None when the
    model's example inputs have no latent size to set."""


MAX_CONFIG_BYTES = 1 << 20
"""Largest ``config.json`` / ``model_index.json`` read (real ones are a few KiB)."""

DENOISER_KEYS = ("transformer", "transformer_2", "prior", "unet")
"""A pipeline's ``model_index.json`` components that can be its denoiser, in the order tried."""


def model_directory(path: str) -> str:
    """The diffusers model directory ``--model path`` names: ``path`` itself when it has a
    ``config.json``, else, for a pipeline directory (``model_index.json``), the subfolder of its
    denoiser (``DENOISER_KEYS``: the first component the index lists as a diffusers model class
    whose subfolder has a ``config.json``). The subfolder must lie inside ``path`` (a link out of
    the pipeline is refused)."""
    if not os.path.isdir(path):
        raise CLIError(f"model directory not found: {path} (--model takes 'demo', 'tiny', a "
                       f"diffusers model directory or a pipeline directory)")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    index_path = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_path):
        hint, sub = "", os.path.join(path, "transformer")
        if os.path.isfile(os.path.join(sub, "config.json")):
            hint = f"; for a pipeline, pass its transformer: --model {sub}"
        raise CLIError(f"{path} has neither config.json nor model_index.json, so it is not a "
                       f"diffusers model or pipeline directory{hint}")
    index = parse_json_strict(read_capped(index_path, MAX_CONFIG_BYTES, "pipeline index", CLIError),
                              CLIError, index_path)
    if not isinstance(index, dict):
        raise CLIError(f"{index_path}: expected a JSON object, got {type(index).__name__}")
    listed = [k for k in DENOISER_KEYS if isinstance(index.get(k), list) and len(index[k]) == 2
              and all(isinstance(x, str) for x in index[k])]
    if not listed:
        raise CLIError(f"{index_path} lists no denoiser component (looked for {', '.join(DENOISER_KEYS)} "
                       f"as [library, class]); pass the model directory itself")
    root = os.path.realpath(path)
    for key in listed:
        sub = os.path.join(path, key)
        if os.path.commonpath([root, os.path.realpath(sub)]) != root:
            raise CLIError(f"{index_path}: component {key!r} leads outside the pipeline directory "
                           f"({os.path.realpath(sub)}); refusing to load it")
        if os.path.isfile(os.path.join(sub, "config.json")):
            log.info("pipeline %s: quantizing its %s (%s)", path, key, index[key][1])
            return sub
    raise CLIError(f"{index_path} lists {', '.join(f'{k} ({index[k][1]})' for k in listed)}, but "
                   f"no such subfolder with a config.json is in {path}")


def _read_model_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    config = parse_json_strict(read_capped(cfg_path, MAX_CONFIG_BYTES, "model config", CLIError),
                               CLIError, cfg_path)
    if not isinstance(config, dict) or not isinstance(config.get("_class_name"), str):
        family = families.for_config(config) if isinstance(config, dict) else None
        if family is not None:  # e.g. OpenSORA's STDiT3: a transformers-style config
            raise CLIError(f"{cfg_path} is a {family.title} model, which the CLI cannot load: "
                           f"{family.inputs_note}")
        raise CLIError(f"{cfg_path} names no model class ('_class_name' is missing)")
    return config


def _diffusers_class(name: str) -> Any:
    try:
        import diffusers
    except ImportError:
        raise CLIError("loading a model directory needs diffusers (pip install diffusers); "
                       "--model demo and --model tiny work without it") from None
    cls = getattr(diffusers, name, None)
    if not isinstance(cls, type):
        raise CLIError(f"config.json names {name!r}, which is not a class of diffusers "
                       f"{diffusers.__version__}")
    if not issubclass(cls, diffusers.ModelMixin):
        raise CLIError(f"{name} is not a diffusers model (a pipeline or scheduler?); pass the "
                       f"directory of the transformer itself")
    return cls


def _dir_name(path: str) -> str:
    """Name for default artifact paths: the directory's name, or a pipeline's for its
    ``transformer/`` subfolder."""
    parent, name = os.path.split(os.path.normpath(os.path.abspath(path)))
    return os.path.basename(parent) if name == "transformer" and parent != os.sep else name


def load_diffusers_model(path: str) -> ModelSpec:
    """A diffusers model directory, or a pipeline directory's denoiser (``model_directory``)
    -> ``ModelSpec``, fp32, eval mode."""
    path = model_directory(path)
    class_name = _read_model_config(path)["_class_name"]
    cls = _diffusers_class(class_name)
    builders = families.with_example_inputs()  # class name -> family
    if class_name not in builders:
        raise CLIError(f"no example-input builder for {class_name} (the CLI has builders for "
                       f"{', '.join(sorted(builders))}); use the Python API: "
                       f"viditq_compile.quantize(model, args, kwargs)")
    build = builders[class_name].example_inputs
    log.info("loading %s from %s", class_name, path)
    try:
        model = cls.from_pretrained(path, torch_dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise CLIError(f"cannot load {class_name} from {path}: {_first_line(e)}") from None
    model.eval()

    def inputs_at(batch: int, seed: int, hw: tuple[int, int]) -> dict:
        kwargs = build({**model.config, "sample_size": list(hw)}, batch, seed)  # type: ignore[misc]
        if not _has_size(kwargs, hw):
            raise CLIError(f"--bucket: the {class_name} example inputs do not take a latent size "
                           f"from the config's sample_size; add buckets with the Python API: "
                           f"vq.quantize(model, args, kwargs, buckets=[(args, kwargs), ...])")
        return kwargs

    return ModelSpec(_dir_name(path), model, lambda batch, seed: build(model.config, batch, seed),  # type: ignore[misc]
                     inputs_at=inputs_at)


def _has_size(kwargs: dict, hw: tuple[int, int]) -> bool:
    """A 4-D / 5-D input ends in ``hw`` (the latent the example builder made at that size)."""
    return any(isinstance(v, torch.Tensor) and v.dim() in (4, 5) and tuple(v.shape[-2:]) == hw
               for v in kwargs.values())


MODELS_GROUP = "viditq_compile.models"
"""Entry-point group of named models for ``--model NAME``: ``NAME -> (seed) -> ModelSpec``."""
COMMANDS_GROUP = "viditq_compile.cli"
"""Entry-point group of command providers: ``quality`` -> a module with ``run_quality`` and
``DEFAULT_RECIPES`` (``viditq quality``)."""
DEMO_MODELS = ("demo", "digits", "tiny")
"""The ``--model`` names the demo provides."""
DEMO_INSTALL = ("pip install -e demo (the viditq-demo project in the viditq_compile repository; "
                "`make install` installs it)")


def entry_point(group: str, name: str) -> Any | None:
    """What the installed entry point ``name`` of ``group`` names, loaded; None when no installed
    distribution declares it."""
    found = list(entry_points(group=group, name=name))
    if not found:
        return None
    ep = found[0]
    try:
        return ep.load()
    except ImportError as e:  # declared, but its package is gone (an editable install moved?)
        raise CLIError(f"the {group} entry point {name!r} ({ep.value}) cannot be imported: "
                       f"{_first_line(e)}; reinstall it: {DEMO_INSTALL}") from None


def _demo_missing(group: str, name: str, what: str) -> CLIError:
    return CLIError(f"{what} comes from the viditq_compile demo, which is not installed "
                    f"(no {group!r} entry point {name!r}): {DEMO_INSTALL}")


def demo_provider(group: str, name: str, what: str) -> Any:
    """``entry_point(group, name)``, or a ``CLIError`` naming the demo to install."""
    found = entry_point(group, name)
    if found is None:
        raise _demo_missing(group, name, what)
    return found


def load_model(spec: str, seed: int) -> ModelSpec:
    """A named model (``demo`` / ``tiny``, weights from ``seed``, ``digits``, the trained digits
    DiT: entry points of ``MODELS_GROUP``) or a diffusers directory."""
    provider = entry_point(MODELS_GROUP, spec)
    if provider is not None:
        return provider(seed)
    if spec in DEMO_MODELS:
        raise _demo_missing(MODELS_GROUP, spec, f"--model {spec}")
    return load_diffusers_model(spec)


# --------------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------------


def _sample(y: Any) -> torch.Tensor:
    """The denoiser output of a model call: ``y[0]`` of a tuple, ``y.sample``, or ``y``."""
    if isinstance(y, (tuple, list)):
        return y[0]
    return getattr(y, "sample", y)


@torch.no_grad()
def run(model: Callable, inputs: dict) -> torch.Tensor:
    return _sample(model(**inputs))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def fp32_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers (tensors shared by two names count once)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


@dataclass
class Timing:
    name: str
    latency_s: float
    compile_s: float | None = None  # first call (cold compile), for compiled variants


@torch.no_grad()
def time_variant(name: str, fn: Callable, inputs: dict, repeats: int, compiled: bool) -> Timing:
    """First call (timed as the cold compile when ``compiled``), one warm-up, then the median
    of ``repeats`` calls."""
    t0 = time.perf_counter()
    fn(**inputs)
    first = time.perf_counter() - t0
    fn(**inputs)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(**inputs)
        times.append(time.perf_counter() - t0)
    return Timing(name, statistics.median(times), first if compiled else None)


def compile_cache(cold: bool) -> contextlib.AbstractContextManager:
    """With ``cold``, an empty temporary Inductor cache directory (removed on exit), so that the
    first call's time is a cold compile; otherwise Inductor's usual on-disk cache."""
    if not cold:
        return contextlib.nullcontext()
    from torch._inductor.utils import fresh_cache

    return fresh_cache()


def _start_inductor() -> None:
    """Compile a trivial function, so that Inductor's one-time start-up in this process (imports,
    compile workers: about 10 s on 2 cores) is not charged to the first variant timed."""
    with compile_cache(cold=True):
        torch.compile(lambda x: torch.nn.functional.gelu(x) + 1)(torch.randn(4, 4))


def benchmark(model: torch.nn.Module, qm: QuantizedModel, inputs: dict, repeats: int,
              cold: bool = True) -> list[Timing]:
    """fp32 eager, ``torch.compile`` (Inductor, fp32), quantized via ``qm.compile()``."""
    timings = [time_variant("fp32 eager", model, inputs, repeats, compiled=False)]
    _start_inductor()
    for name, make in (("fp32 torch.compile (inductor)", lambda: torch.compile(model)),
                       (f"{qm.plan.recipe} qm.compile() (viditq)", qm.compile)):
        with compile_cache(cold):
            timings.append(time_variant(name, make(), inputs, repeats, compiled=True))
    return timings


def slow_note(qm: QuantizedModel, timings: list[Timing]) -> str:
    """A line saying why, when the quantized program is not faster than compiled fp32 (else "")."""
    if len(timings) < 3 or timings[2].latency_s < timings[1].latency_s:
        return ""
    quantized = [r for r in qm.report.rows if r.quantized]
    if not quantized:
        return "note: no layer is quantized, so there is nothing for int8 to speed up"
    big = max(quantized, key=lambda r: r.in_features * r.out_features)
    text = (f"note: not faster than fp32 Inductor here. The largest quantized layer is "
            f"{big.out_features} x {big.in_features}: at such sizes quantizing activations and "
            f"launching the int8 GEMMs costs about what the fp32 GEMMs they replace do.")
    if big.in_features * big.out_features < 384 * 1536:  # smaller than the demo DiT's MLP
        text += (" int8 pays off on wider layers and more tokens (--model demo: 384 x 1536, "
                 "256 tokens per image).")
    return text


def format_table(head: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ") -> str:
    """Left-aligned first column, right-aligned others."""
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]

    def line(r):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        return indent + "  ".join(cells).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def format_latency(timings: list[Timing], cold: bool = True) -> str:
    base = timings[0].latency_s
    rows = [(t.name, f"{t.latency_s * 1e3:.1f} ms", f"{base / t.latency_s:.2f}x",
             "-" if t.compile_s is None else f"{t.compile_s:.1f} s") for t in timings]
    compile_head = "compile (cold)" if cold else "compile (1st call)"
    return format_table(("variant", "latency", "speed-up", compile_head), rows)


def _fmt_sqnr(db: float) -> str:
    return "inf dB (exact)" if db == float("inf") else f"{db:.1f} dB"


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------


def default_out(model_name: str, recipe_arg: str) -> str:
    recipe_name = os.path.splitext(os.path.basename(os.path.normpath(recipe_arg)))[0]
    return os.path.join("artifacts", f"{model_name}-{recipe_name}")


@dataclass
class InputSet:
    """Example inputs with the fp32 model's output on them (and later the quantized one's)."""

    label: str
    batch: int
    seed: int
    inputs: dict
    reference: torch.Tensor
    quantized: torch.Tensor | None = None


def make_input_sets(spec: ModelSpec, batch: int, seed: int) -> list[InputSet]:
    """The example inputs, and a second set with another seed and batch size (dynamic shapes)."""
    sets = []
    for label, b, s in (("example inputs", batch, seed), ("other inputs", batch + 1, seed + 1)):
        inputs = spec.make_inputs(b, s)
        sets.append(InputSet(label, b, s, inputs, run(spec.model, inputs)))
    return sets


def run_quantized(qm: QuantizedModel, sets: list[InputSet]) -> None:
    for s in sets:
        s.quantized = run(qm, s.inputs)


def format_quality(sets: list[InputSet]) -> str:
    """SQNR and cosine similarity of the quantized outputs against fp32, one row per set."""
    rows = []
    for s in sets:
        assert s.quantized is not None, "run_quantized first"
        rows.append((f"{s.label} (batch {s.batch}, seed {s.seed})",
                     _fmt_sqnr(sqnr_db(s.reference, s.quantized)),
                     f"{cosine(s.reference, s.quantized):.6f}"))
    return format_table(("inputs", "SQNR", "cosine"), rows)


def verify_artifact(out: str, sets: list[InputSet]) -> None:
    """Load ``out`` and check that it reproduces the quantized outputs bit for bit."""
    loaded = load(out)
    for s in sets:
        got = run(loaded, s.inputs)
        assert s.quantized is not None, "run_quantized first"
        if not torch.equal(s.quantized, got):
            diff = (s.quantized - got).abs().max().item()
            raise VerificationError(f"artifact check failed: {out} gives different outputs on "
                                    f"the {s.label} (max |diff| {diff:.3g})")


def _calibration(args: argparse.Namespace, spec: ModelSpec, recipe: Recipe):
    """``--calibration N``: N model calls on fresh random inputs (random timesteps), seeds apart
    from the evaluation sets; ``--calibration FILE``: statistics saved by ``calibrate``. A
    mixed-precision recipe (``w4a8-mp``, ``w4a4-mp``) or a balancing search (``w4a8-search``) gets
    the calls themselves: its search replays them. A recipe's ``calib_data.save_path``
    (``Recipe.calibration_path``) is where ``--calibration N`` saves the statistics, and where
    they are read from without ``--calibration``."""
    value = args.calibration
    saved = recipe.calibration_path
    if value is None:
        if saved is None or not os.path.exists(saved):
            return None  # quantize warns when the recipe names a file that is not there
        stats = resolve_calibration(spec.model, None, recipe=recipe)
        print(f"calibration: statistics from {saved} (the recipe's calib_data.save_path)")
        return stats
    searches = recipe.budget is not None or recipe.balance_search is not None
    if not value.isdigit():
        if searches:
            what = "mixed precision" if recipe.budget is not None else "the balancing per layer"
            raise CalibrationError(f"--calibration: recipe {recipe.name!r} searches {what} "
                                   f"by replaying calibration calls; give a number of calls, not "
                                   f"{value!r}")
        if not os.path.exists(value):
            raise CalibrationError(f"--calibration: {value!r} is neither a number of calls nor an "
                                   f"existing statistics file")
        if saved is not None:
            print(f"calibration: statistics from {value}; the recipe's calib_data.save_path {saved} "
                  f"is neither read nor written")
        return resolve_calibration(spec.model, value)
    n = int(value)
    if n < 1:
        raise CalibrationError(f"--calibration: need at least 1 call, got {n}")
    if spec.calibration_calls is not None:
        calls = spec.calibration_calls(n)
        print(f"calibration: {len(calls)} calls recorded from the model's sampler ({n} samples)")
    else:
        calls = [((), spec.make_inputs(args.batch, args.seed + 1000 + i)) for i in range(n)]
    if searches:
        return calls
    t0 = time.perf_counter()
    stats = resolve_calibration(spec.model, calls)
    print(f"calibrated on {n} calls in {time.perf_counter() - t0:.1f} s")
    if saved is not None:
        stats.save(saved)
        print(f"calibration statistics saved to {saved} (the recipe's calib_data.save_path)")
    return stats


def _bucket_sets(args: argparse.Namespace, spec: ModelSpec) -> list[InputSet]:
    """``--bucket HxW``: an input set per resolution bucket, at the example's batch and seed."""
    if not args.bucket:
        return []
    if spec.inputs_at is None:
        raise CLIError(f"--bucket: model {spec.name!r} has no latent size to set; add buckets with "
                       f"the Python API: vq.quantize(model, args, kwargs, buckets=[...])")
    out = []
    for hw in args.bucket:
        inputs = spec.inputs_at(args.batch, args.seed, hw)
        out.append(InputSet(f"bucket {hw[0]}x{hw[1]}", args.batch, args.seed, inputs,
                            run(spec.model, inputs)))
    return out


def _latent_size(text: str) -> tuple[int, int]:
    """``HxW`` (latent height and width, each 1 to 4096) for ``--bucket``."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and 0 < int(p) <= 4096 for p in parts):
        raise argparse.ArgumentTypeError(f"expected HxW (latent height x width, 1 to 4096), got "
                                         f"{text[:40]!r}")
    return int(parts[0]), int(parts[1])


def cmd_quantize(args: argparse.Namespace) -> int:
    recipe = Recipe.resolve(args.recipe)  # fail on a bad recipe before building the model
    recipe.check_supported()
    spec = load_model(args.model, args.seed)
    sets = make_input_sets(spec, args.batch, args.seed)

    buckets = _bucket_sets(args, spec)
    calibration = _calibration(args, spec, recipe)
    t0 = time.perf_counter()
    qm = quantize(spec.model, (), sets[0].inputs, recipe=recipe, calibration=calibration,
                  buckets=[((), b.inputs) for b in buckets] or None)
    sets += buckets
    if qm.plan.search:  # a searched plan: what the search measured and chose, per unit
        from viditq_compile.report.search_table import search_report

        print(search_report(qm.plan) + "\n")
    print(qm.report)
    print(f"\nmodel {spec.name}, recipe {recipe.name!r}: captured and quantized in "
          f"{time.perf_counter() - t0:.1f} s")

    run_quantized(qm, sets)
    print("\noutput quality vs fp32 (same inputs)")
    print(format_quality(sets))

    fp_bytes, q_bytes = fp32_weight_bytes(spec.model), qm.weight_bytes
    print(f"\nweights: fp32 model {_mib(fp_bytes)}, quantized program {_mib(q_bytes)} "
          f"(compression {fp_bytes / q_bytes:.2f}x)")

    if not args.no_bench:
        cold = not args.warm_cache
        print(f"\nlatency (batch {args.batch}, torch.no_grad, median of {args.repeats} after "
              f"warm-up, {torch.get_num_threads()} threads)")
        timings = benchmark(spec.model, qm, sets[0].inputs, args.repeats, cold=cold)
        print(format_latency(timings, cold=cold))
        note = slow_note(qm, timings)
        if note:
            print(note)

    out = args.out or default_out(spec.name, args.recipe)
    qm.save(out)
    verify_artifact(out, sets)
    print(f"\nartifact written to {out}")
    print("artifact verified: loaded program reproduces the outputs exactly")
    return 0


def cmd_quality(args: argparse.Namespace) -> int:
    suite = demo_provider(COMMANDS_GROUP, "quality", "'viditq quality' (the digits DiT's quality suite)")
    run_quality = suite.run_quality

    recipes = [r.strip() for r in (args.recipes or ",".join(suite.DEFAULT_RECIPES)).split(",") if r.strip()]
    for r in recipes:
        Recipe.resolve(r).check_supported()  # fail on a bad name before sampling anything
    os.makedirs(args.out, exist_ok=True)
    grid = os.path.join(args.out, "grid.png")
    t0 = time.perf_counter()
    result = run_quality(recipes, per_class=args.per_class, seed=args.seed, num_steps=args.steps,
                         guidance_scale=args.guidance, grid=grid, grid_columns=args.columns,
                         error_gain=args.error_gain or None,
                         progress=lambda msg: print(f"  {msg} ...", file=sys.stderr, flush=True))
    table = result.table()
    print(f"digits DiT, {len(result.labels)} samples ({args.per_class} per class), {args.steps} sampler "
          f"steps, seeds {args.seed}..{args.seed + len(result.labels) - 1}; accuracy = the classifier "
          f"finds the requested digit; FD = Fréchet distance of classifier features to the real digits; "
          f"PSNR/SSIM against the fp sample from the same noise\n")
    print(table)
    with open(os.path.join(args.out, "quality.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "quality.json"), "w") as f:
        json.dump(result.to_dict(), f, indent=1)
    print(f"\npicture grid (rows = recipes, columns = seeds) written to {grid}; table to "
          f"{os.path.join(args.out, 'quality.md')} ({time.perf_counter() - t0:.0f} s)")
    return 0


# --------------------------------------------------------------------------------------------
# generate: a diffusers pipeline, in floating point and quantized, from the same seed
# --------------------------------------------------------------------------------------------

PIPELINE_LIBRARIES = ("diffusers", "transformers")
"""The libraries a pipeline's ``model_index.json`` may take components from. Anything else names
a module (a custom pipeline or component, i.e. code in the directory), which ``generate`` never
loads."""

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def _library_class(library: str, name: str, where: str) -> type:
    if not _IDENTIFIER.fullmatch(name):
        raise CLIError(f"{where}: {name[:60]!r} is not a class name")
    module = importlib.import_module(library)
    cls = getattr(module, name, None)
    if not isinstance(cls, type):
        raise CLIError(f"{where}: {name!r} is not a class of {library} {getattr(module, '__version__', '')}".rstrip())
    return cls


def pipeline_class(path: str) -> Any:
    """The diffusers pipeline class a pipeline directory's ``model_index.json`` names, after
    checking the whole index: ``_class_name`` a pipeline class of diffusers (no custom pipeline,
    no ``[module, class]`` pair), every component ``[library, class]`` with the library one of
    ``PIPELINE_LIBRARIES`` (or ``[null, null]``), and each component's subfolder inside the
    directory (a link out of it is refused)."""
    if not os.path.isdir(path):
        what = "a file" if os.path.exists(path) else "not found"
        raise CLIError(f"pipeline directory {path}: {what} (--pipeline takes a diffusers pipeline directory, "
                       f"the one with model_index.json)")
    index_path = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_path):
        hint = (f"; it is a model directory (config.json): quantize it with viditq quantize --model {path}"
                if os.path.isfile(os.path.join(path, "config.json")) else "")
        raise CLIError(f"{path} has no model_index.json, so it is not a diffusers pipeline directory{hint}")
    index = parse_json_strict(read_capped(index_path, MAX_CONFIG_BYTES, "pipeline index", CLIError),
                              CLIError, index_path)
    if not isinstance(index, dict):
        raise CLIError(f"{index_path}: expected a JSON object, got {type(index).__name__}")
    import diffusers

    name = index.get("_class_name")
    if not isinstance(name, str):
        raise CLIError(f"{index_path}: _class_name {short_repr(name)} is not the name of a diffusers pipeline "
                       f"class (custom pipelines are not loaded: generate never runs code from the directory)")
    cls = _library_class("diffusers", name, f"{index_path}: _class_name")
    if not issubclass(cls, diffusers.DiffusionPipeline):
        raise CLIError(f"{index_path}: _class_name {name!r} is not a diffusers pipeline class")
    root = os.path.realpath(path)
    for key, value in index.items():
        if key.startswith("_") or not isinstance(value, list):
            continue  # _diffusers_version, _name_or_path; pipeline config values (boundary_ratio, ...)
        where = f"{index_path}: component {key!r}"
        if value == [None, None]:
            continue
        if len(value) != 2 or not all(isinstance(x, str) for x in value):
            raise CLIError(f"{where}: expected [library, class], got {short_repr(value)}")
        library, class_name = value
        if library not in PIPELINE_LIBRARIES:
            raise CLIError(f"{where} comes from {library[:60]!r}, which is not one of {', '.join(PIPELINE_LIBRARIES)} "
                           f"(a module in the directory is code; generate never runs it)")
        _library_class(library, class_name, where)
        sub = os.path.join(path, key)
        if os.path.lexists(sub) and os.path.commonpath([root, os.path.realpath(sub)]) != root:
            raise CLIError(f"{where} leads outside the pipeline directory ({os.path.realpath(sub)}); refusing "
                           f"to load it")
    return cls


def load_pipeline(path: str, dtype: torch.dtype, device: str) -> Any:
    """``pipeline_class(path).from_pretrained(path)``: local files only, safetensors weights only,
    no remote code, in ``dtype`` on ``device``, progress bar off."""
    cls = pipeline_class(path)
    log.info("loading %s from %s", cls.__name__, path)
    try:
        pipe = cls.from_pretrained(path, local_files_only=True, use_safetensors=True, trust_remote_code=False,
                                   torch_dtype=dtype)
    except Exception as e:  # noqa: BLE001 (a directory from anyone may make the loaders raise anything)
        log.debug("loading %s failed", path, exc_info=True)
        raise CLIError(f"cannot load {cls.__name__} from {path}: {type(e).__name__}: {_first_line(e)}") from None
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_arguments(args: argparse.Namespace, pipe: Any, transformer: torch.nn.Module) -> dict:
    """The pipeline's own arguments from ``--prompt`` / ``--class-label`` / ``--height`` /
    ``--width`` / ``--frames`` / ``--guidance``, each refused where the pipeline takes no such
    argument. ``--height`` / ``--width`` are taken as given (resolution binning off)."""
    cls = type(pipe).__name__
    params = inspect.signature(pipe.__call__).parameters
    takes_prompt, takes_labels = "prompt" in params, "class_labels" in params
    if not (takes_prompt or takes_labels):
        raise CLIError(f"{cls} takes neither a prompt nor class labels (an image-to-image or other "
                       f"conditioned pipeline?); generate runs text- and class-conditional pipelines")
    if args.prompt and args.class_label:
        raise CLIError("give --prompt or --class-label, not both")
    out: dict[str, Any] = {}
    if args.prompt:
        if not takes_prompt:
            raise CLIError(f"{cls} takes class labels, not prompts: use --class-label N")
        out["prompts"] = list(args.prompt)
    elif args.class_label:
        if not takes_labels:
            raise CLIError(f"{cls} takes prompts, not class labels: use --prompt TEXT")
        config = getattr(transformer, "config", None)
        classes = config.get("num_embeds_ada_norm") if isinstance(config, dict) else None
        if isinstance(classes, int):
            bad = [c for c in args.class_label if c >= classes]
            if bad:
                raise CLIError(f"--class-label {bad[0]}: {cls} has classes 0..{classes - 1}")
        out["class_labels"] = list(args.class_label)
    else:
        raise CLIError(f"{cls} needs {'--prompt TEXT' if takes_prompt else '--class-label N'} (repeatable)")
    for flag, key in (("height", "height"), ("width", "width"), ("frames", "num_frames"),
                      ("guidance", "guidance_scale")):
        value = getattr(args, flag)
        if value is None:
            continue
        if key not in params:
            raise CLIError(f"--{flag}: {cls} takes no {key} argument")
        out[key] = value
    if (args.height or args.width) and "use_resolution_binning" in params:
        out["use_resolution_binning"] = False
    return out


class StepTimer:
    """Forward hooks on a transformer timing each of its calls (synchronising CUDA first), with
    the call's timestep; ``per_step()`` sums the calls of each step (consecutive calls at one
    timestep: both guidance halves)."""

    def __init__(self, model: torch.nn.Module):
        from viditq_compile.calibration.observe import timestep_argument

        self.model, self.timestep_argument = model, timestep_argument
        self.signature = inspect.signature(model.forward)
        self.calls: list[tuple[float, float]] = []  # (timestep, seconds)
        self._start: tuple[float, float] | None = None
        self._cuda = any(p.is_cuda for p in model.parameters())
        self._handles: list[Any] = []

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize()

    def __enter__(self) -> StepTimer:
        def pre(module, args, kwargs):
            self._sync()
            self._start = (self.timestep_argument(self.signature, args, kwargs)[1], time.perf_counter())

        def post(module, args, output):
            self._sync()
            if self._start is not None:
                self.calls.append((self._start[0], time.perf_counter() - self._start[1]))
                self._start = None

        self._handles = [self.model.register_forward_pre_hook(pre, with_kwargs=True),
                         self.model.register_forward_hook(post, always_call=True)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def per_step(self) -> list[tuple[float, float, int]]:
        """``(timestep, seconds, calls)`` per step."""
        out: list[tuple[float, float, int]] = []
        for t, s in self.calls:
            if out and out[-1][0] == t:
                out[-1] = (t, out[-1][1] + s, out[-1][2] + 1)
            else:
                out.append((t, s, 1))
        return out


@dataclass
class PipelineRun:
    """One sampling run: its pictures ([B, H, W, 3] or [B, F, H, W, 3] floats in [0, 1]), final
    latents (None where the pipeline has no step callback), per-step timing, wall time."""

    images: Any
    latents: torch.Tensor | None
    steps: list[tuple[float, float, int]]
    wall_s: float


def run_pipeline(pipe: Any, inputs: dict, steps: int, seed: int, warmup: bool = True) -> PipelineRun:
    """``pipe`` on ``inputs`` (``prompts`` / ``class_labels`` as the pipeline names them), ``steps``
    steps from a generator seeded with ``seed``, pictures as numpy; with ``warmup``, after an
    untimed one-step run (first-call costs: lazy initialisation, kernel compilation)."""
    import numpy as np

    from viditq_compile.diffusers import denoiser_of

    call = {("prompt" if k == "prompts" else k): v for k, v in inputs.items()}
    params = inspect.signature(pipe.__call__).parameters
    final: list[torch.Tensor] = []
    if "callback_on_step_end" in params:
        def keep(_pipe, i, t, kw):
            if "latents" in kw:
                final[:] = [kw["latents"].detach().float().cpu()]
            return {}

        call["callback_on_step_end"] = keep
    elif "callback" in params and "callback_steps" in params:  # the older API (PixArt)
        def keep_old(i, t, latents):
            final[:] = [latents.detach().float().cpu()]

        call.update(callback=keep_old, callback_steps=1)
    _, transformer = denoiser_of(pipe)
    device = next((p.device for p in transformer.parameters()), torch.device("cpu"))
    if warmup:
        plain = {k: v for k, v in call.items() if k not in ("callback_on_step_end", "callback", "callback_steps")}
        pipe(**plain, num_inference_steps=1, generator=torch.Generator(device=device).manual_seed(seed),
             output_type="latent")
    generator = torch.Generator(device=device).manual_seed(seed)
    with StepTimer(transformer) as timer:
        t0 = time.perf_counter()
        out = pipe(**call, num_inference_steps=steps, generator=generator, output_type="np")
        wall = time.perf_counter() - t0
    images = getattr(out, "frames", None)
    if images is None:
        images = out.images
    return PipelineRun(np.asarray(images, dtype=np.float32), final[0] if final else None, timer.per_step(), wall)


def side_by_side(fp, quantized, gap: int = 2):
    """[H, W, 3] (or [F, H, W, 3]: one row per frame) floats in [0, 1], twice -> one uint8 RGB
    picture, floating point left, quantized right, ``gap`` white pixels between."""
    import numpy as np

    a, b = (x[None] if x.ndim == 3 else x for x in (fp, quantized))
    f, h, w, _ = a.shape
    canvas = np.full((f * h + (f - 1) * gap, 2 * w + gap, 3), 255, np.uint8)
    for i in range(f):
        for j, x in enumerate((a[i], b[i])):
            canvas[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = \
                np.clip(np.rint(np.nan_to_num(x) * 255), 0, 255).astype(np.uint8)
    return canvas


def format_steps(fp: PipelineRun, q: PipelineRun, recipe: str) -> str:
    rows = []
    for i, ((t, a, n), (_, b, _)) in enumerate(zip(fp.steps, q.steps)):
        rows.append((str(i), f"{t:g}", str(n), f"{a * 1e3:.1f}", f"{b * 1e3:.1f}", f"{a / b:.2f}x"))
    tot_a, tot_b = sum(s[1] for s in fp.steps), sum(s[1] for s in q.steps)
    rows.append(("all", "", str(sum(s[2] for s in fp.steps)), f"{tot_a * 1e3:.1f}", f"{tot_b * 1e3:.1f}",
                 f"{tot_a / tot_b:.2f}x" if tot_b else "-"))
    return format_table(("step", "timestep", "calls", "fp ms", f"{recipe} ms", "speed-up"), rows)


def _default_generate_out(path: str, recipe_arg: str) -> str:
    recipe_name = os.path.splitext(os.path.basename(os.path.normpath(recipe_arg)))[0]
    return os.path.join("artifacts", f"generate-{os.path.basename(os.path.normpath(os.path.abspath(path)))}"
                        f"-{recipe_name}")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cmd_generate(args: argparse.Namespace) -> int:
    from viditq_compile.diffusers import quantize_pipeline, single_denoiser
    from viditq_compile.report.png import encode_png

    recipe = Recipe.resolve(args.recipe)  # fail on a bad recipe before loading anything
    recipe.check_supported()
    if not args.verbose:  # the pipelines' own notices (caption cleaning, truncation) are noise here
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(args.pipeline, DTYPES[args.dtype], device)
    cls = type(pipe).__name__
    try:
        transformer = single_denoiser(pipe)
    except TypeError as e:
        raise CLIError(f"{cls}: {_first_line(e)}") from None
    family = families.for_model(transformer)
    if family is None:
        raise CLIError(f"{cls}: its transformer {type(transformer).__name__} is of no family viditq_compile "
                       f"knows ({', '.join(families.FAMILIES)}); quantize it with the Python API")
    inputs = _pipeline_arguments(args, pipe, transformer)
    print(f"{cls} ({family.title}) from {args.pipeline}: {args.steps} steps, seed {args.seed}, on {device}")

    fp = run_pipeline(pipe, inputs, args.steps, args.seed)
    t0 = time.perf_counter()
    report = quantize_pipeline(pipe, recipe=args.recipe, num_inference_steps=args.steps, seed=args.seed, **inputs)
    print(f"quantized the transformer ({recipe.name}) in {time.perf_counter() - t0:.1f} s: {report.summary()}")
    q = run_pipeline(pipe, inputs, args.steps, args.seed)

    print(f"\nper-step transformer latency (both guidance halves; after a one-step warm-up run; "
          f"{torch.get_num_threads()} threads)")
    print(format_steps(fp, q, recipe.name))
    print(f"whole pipeline: fp {fp.wall_s:.2f} s, {recipe.name} {q.wall_s:.2f} s (text encoders and VAE included)")
    img = sqnr_db(torch.from_numpy(fp.images), torch.from_numpy(q.images))
    line = f"\nquality vs fp (same seed): pictures {_fmt_sqnr(img)}"
    if fp.latents is not None and q.latents is not None:
        line += f", final latents {_fmt_sqnr(sqnr_db(fp.latents, q.latents))}"
    else:
        line += f" (final latents not compared: {cls} takes no step callback to read them from)"
    print(line)

    out = args.out or _default_generate_out(args.pipeline, args.recipe)
    os.makedirs(out, exist_ok=True)
    files: dict[PathLike, Content] = {os.path.join(out, f"sample-{i}.png"): encode_png(side_by_side(a, b))
             for i, (a, b) in enumerate(zip(fp.images, q.images))}
    atomic_write_files(files)
    print(f"{len(files)} picture(s) written to {out} (left: fp, right: {recipe.name})")
    return 0


def _load_artifact(path: str) -> QuantizedModel:
    """``load(path)``; a failure of any kind is the artifact's, so it is reported as one line, not a
    traceback (``-vv`` logs the traceback)."""
    try:
        return load(path)
    except USER_ERRORS:
        raise
    except Exception as e:  # noqa: BLE001 (an untrusted file may make torch raise anything)
        log.debug("loading %s failed", path, exc_info=True)
        raise CLIError(f"cannot load the artifact {path}: {type(e).__name__}: {_first_line(e)}") from None


def cmd_load(args: argparse.Namespace) -> int:
    qm = _load_artifact(args.dir)
    print(qm.report)
    print(f"\nartifact {args.dir}: {_mib(qm.weight_bytes)} of tensors")
    return 0


# --------------------------------------------------------------------------------------------
# argument parsing and entry point
# --------------------------------------------------------------------------------------------


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


QUANTIZE_EXAMPLES = """examples:
  viditq quantize                           # demo DiT, W8A8, benchmark, artifacts/demo-w8a8
  viditq quantize --model tiny --no-bench   # seconds: the 2-layer demo, no benchmark
  viditq quantize --model ckpt/transformer --recipe pixart_w8a8.yaml --out artifacts/pixart
  viditq load artifacts/demo-w8a8           # check an artifact and print its report
"""


GENERATE_EXAMPLES = """examples:
  viditq generate --pipeline ckpt/PixArt-Sigma --prompt "a red fox in snow" --steps 20 --out out/pixart
  viditq generate --pipeline ckpt/DiT-XL-2-256 --class-label 207 --class-label 360 --recipe w4a8-viditq
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="ViDiT-Q quantization of diffusion transformers (torch.export + Inductor).",
        epilog="Run 'viditq quantize' with no options to quantize the built-in demo DiT to W8A8.")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log diagnostics to stderr (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    q = sub.add_parser(
        "quantize", help="quantize a model, print report / quality / speed, write the artifact",
        description="Quantize a diffusion transformer, print its per-layer report, output "
                    "quality against fp32, weight size and latency, then write and verify the "
                    "artifact.",
        epilog=QUANTIZE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("--model", default="demo", metavar="demo|digits|tiny|PATH",
                   help="'demo' (built-in ~20M-parameter PixArt-style DiT, default), 'digits' (the "
                        "trained digits DiT of 'viditq quality'), 'tiny' "
                        "(2 layers, hidden 64), or a diffusers model directory (config.json + "
                        "weights; ./demo for a directory named demo) of "
                        + ", ".join(sorted(families.with_example_inputs())))
    q.add_argument("--recipe", default="w8a8", metavar="w8a8|w4a8|fp|YAML",
                   help="preset name (w8a8, w4a8, fp, the ablation recipes w8a8-naive ... "
                        "w4a8-viditq, w8a8-fp8, the searches w4a8-mp, w4a4-mp, w4a8-search, "
                        "w8a8-search) or ViDiT-Q YAML recipe (default: w8a8)")
    q.add_argument("--calibration", default=None, metavar="N|FILE",
                   help="calibrate on N calls with random inputs and timesteps (--model digits: "
                        "the sampler's calls for N samples), or load saved "
                        "statistics; enables smoothing (w4a8, the w8a8 ViDiT-Q balancing, the "
                        "naive/smooth ablation recipes)")
    q.add_argument("--batch", type=_at_least(2), default=2,
                   help="example batch size, >= 2 so the batch stays dynamic (default: 2); "
                        "quality is also checked at batch+1")
    q.add_argument("--seed", type=int, default=0,
                   help="seed of the example inputs (and of the built-in model's weights)")
    q.add_argument("--out", default=None, metavar="DIR",
                   help="artifact directory (default: artifacts/<model>-<recipe>)")
    q.add_argument("--bucket", type=_latent_size, action="append", default=[], metavar="HxW",
                   help="also build a resolution bucket at this latent size (repeatable): one more "
                        "program from the same plan, sharing the weights, for models that pin H/W "
                        "(PixArt, SD3, HunyuanDiT); diffusers directories whose config has sample_size")
    q.add_argument("--no-bench", action="store_true", help="skip the latency benchmark")
    q.add_argument("--repeats", type=_at_least(1), default=5,
                   help="timed calls per variant; the median is reported (default: 5)")
    q.add_argument("--warm-cache", action="store_true",
                   help="let Inductor reuse its on-disk compile cache (faster re-runs; the "
                        "compile times shown are then not cold)")
    q.set_defaults(func=cmd_quantize)

    ql = sub.add_parser(
        "quality", help="sample the trained digits DiT in fp and under each recipe; score and draw",
        description="Sample the trained digits DiT (viditq_demo.digits) in floating point and under "
                    "each recipe from the same noise and classes; print classifier accuracy, Fréchet "
                    "distance to real digits, PSNR and SSIM against fp, and write a picture grid.")
    ql.add_argument("--recipes", default=None, metavar="R1,R2,...",
                    help="comma-separated presets (default: fp,w8a8-naive,w8a8,w4a8-naive,w4a8,"
                         "w4a8-mp,w4a4-mp; fp always runs as the reference)")
    ql.add_argument("--per-class", type=_at_least(1), default=10, help="samples per digit (default: 10)")
    ql.add_argument("--steps", type=_at_least(1), default=20, help="sampler steps (default: 20)")
    ql.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale "
                    "(default: the digits sampler's)")
    ql.add_argument("--seed", type=int, default=0, help="first noise seed (sample i uses seed + i)")
    ql.add_argument("--columns", type=_at_least(1), default=10, help="samples per grid row (default: 10)")
    ql.add_argument("--error-gain", type=float, default=10.0, metavar="G",
                    help="the grid's right panel shows |sample - fp| x G (default: 10; 0: no panel)")
    ql.add_argument("--out", default="artifacts/quality", metavar="DIR",
                    help="where grid.png, quality.md and quality.json go (default: artifacts/quality)")
    ql.set_defaults(func=cmd_quality)

    g = sub.add_parser(
        "generate", help="run a diffusers pipeline in fp and quantized from one seed; pictures side by side",
        description="Load a diffusers pipeline directory (local files, safetensors, no code from the "
                    "directory), sample in floating point, quantize its transformer from that sampling "
                    "loop (vq.quantize_pipeline), sample again from the same seed, print per-step "
                    "latency of both and the SQNR of the pictures and final latents, and write the "
                    "pictures side by side (left fp, right quantized) as PNG.",
        epilog=GENERATE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("--pipeline", required=True, metavar="DIR",
                   help="diffusers pipeline directory (model_index.json), e.g. one save_pretrained wrote")
    g.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="prompt of a text-conditional pipeline (repeatable: one sample each)")
    g.add_argument("--class-label", type=_at_least(0), action="append", default=[], metavar="N",
                   help="class of a class-conditional pipeline (DiT; repeatable)")
    g.add_argument("--recipe", default="w8a8", metavar="w8a8|w4a8|...|YAML",
                   help="preset name or ViDiT-Q YAML recipe (default: w8a8)")
    g.add_argument("--steps", type=_at_least(1), default=20, help="sampler steps (default: 20)")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampling noise (default: 0)")
    g.add_argument("--height", type=_at_least(1), default=None, help="picture height (default: the pipeline's)")
    g.add_argument("--width", type=_at_least(1), default=None, help="picture width (default: the pipeline's)")
    g.add_argument("--frames", type=_at_least(1), default=None, help="frames of a video pipeline (default: its own)")
    g.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="dtype the pipeline is loaded in (default: float32)")
    g.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    g.add_argument("--out", default=None, metavar="DIR",
                   help="where sample-<i>.png go (default: artifacts/generate-<pipeline>-<recipe>)")
    g.set_defaults(func=cmd_generate)

    ld = sub.add_parser("load", help="check a saved artifact and print its report",
                        description="Load an artifact directory (checksums, safe unpickling, "
                                    "weights fit the program) and print its per-layer report.")
    ld.add_argument("dir", metavar="DIR", help="artifact directory written by 'viditq quantize'")
    ld.set_defaults(func=cmd_load)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``viditq`` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed by argparse
        return e.code if isinstance(e.code, int) else 2
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        with warnings.catch_warnings():
            if not args.verbose:  # library deprecation notices are noise for CLI users
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
            return args.func(args)
    except CLIError as e:
        return _fail(_first_line(e))
    except CaptureError as e:  # one line, and the way out: the backend takes what export cannot
        log.debug("error details", exc_info=True)
        return _fail(f"{_first_line(e)} ({BACKEND_HINT})")
    except USER_ERRORS as e:
        log.debug("error details", exc_info=True)
        return _fail(_first_line(e))
    except VerificationError as e:
        return _fail(str(e), status=1)
    except KeyboardInterrupt:
        return _fail("interrupted", status=130)


def _fail(message: str, status: int = 2) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
