"""Calibration observers: per-input-channel absmax of every linear layer's input, per call.

``calibrate(model, calibration)`` runs the user's calibration data (an iterable of
``(args, kwargs)`` model calls, or a sampler callable that takes the model) with a forward
pre-hook on every linear layer: ``nn.Linear`` and the convolutions that are linears (1×1,
``graph.modules.is_linear_layer``, which the passes rewrite into linears under the module's name).
Each call of a layer adds one row ``x.abs().amax(all but the feature dim)`` ([K] fp32: the last
dim of a linear's input, the channel dim of a convolution's) to that layer's statistics, together
with the timestep of the model call that produced it (read from the model's own ``timestep`` /
``timesteps`` / ``t`` argument; NaN when it takes none). The reference statistic (ViDiT-Q's) is
the max over calls, ``CalibrationStats.absmax``;
the rows are kept so that timestep-range plans can reduce over their own calls (``absmax_at``).

Statistics are saved to one safetensors file (tensors ``absmax/<layer>`` [n, K] and
``timesteps/<layer>`` [n], metadata ``format`` / ``version`` / ``num_model_calls``), so quantizing
again does not re-run the sampler. Loading never unpickles anything.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from viditq_compile.calibration.stats import CalibrationError, CalibrationStats
from viditq_compile.families import registry as families
from viditq_compile.graph.modules import in_features, linear_layers, to_tokens

if TYPE_CHECKING:
    from viditq_compile.config.recipe import Recipe

log = logging.getLogger(__name__)

TIMESTEP_NAMES = families.TIMESTEP_NAMES
"""Forward arguments read as a model call's timestep, first bound wins (every family's names)."""








def _absmax_row(x: Tensor) -> Tensor:
    """[..., K] -> [K] fp32 absmax over every dim but the last (zeros for an empty input)."""
    x = x.detach()
    if x.numel() == 0:
        return torch.zeros(x.shape[-1], dtype=torch.float32, device=x.device)
    a = x.abs()
    if a.dim() > 1:
        a = a.amax(dim=tuple(range(a.dim() - 1)))
    return a.float()


def _timestep_value(v: Any) -> float:
    if isinstance(v, Tensor):
        if v.dim() <= 1 and v.numel() > 0:
            return float(v.reshape(-1)[0].item())
        return math.nan
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return math.nan


class _Progress:
    """``calibrating  12/40 calls`` on stderr, rewritten in place with ``\\r``."""

    def __init__(self, enabled: bool | None, total: int | None):
        self.enabled = sys.stderr.isatty() if enabled is None else bool(enabled)
        self.total = total
        self.shown = False

    def update(self, n: int) -> None:
        if not self.enabled:
            return
        count = f"{n}/{self.total}" if self.total is not None else f"{n}"
        sys.stderr.write(f"\rcalibrating  {count} calls")
        sys.stderr.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


class _Observer:
    """Hooks on the model (call count, timestep) and on its linears (absmax rows)."""

    def __init__(self, model: nn.Module, linears: dict[str, nn.Module], progress: _Progress):
        self.model = model
        self.linears = linears
        self.progress = progress
        self.signature = _signature(model)
        self.rows: dict[str, list[Tensor]] = {name: [] for name in linears}
        self.steps: dict[str, list[float]] = {name: [] for name in linears}
        self.pending: list[tuple[str, int, int]] = []  # (layer, its call, model call): rows not yet checked
        self.model_calls = 0
        self.depth = 0
        self.timestep = math.nan
        self.handles: list[Any] = []

    def install(self) -> None:
        m = self.model
        self.handles.append(m.register_forward_pre_hook(self._model_pre, with_kwargs=True))
        self.handles.append(m.register_forward_hook(self._model_post))
        self.handles.append(m.register_forward_hook(self._model_exit, always_call=True))
        for name, lin in self.linears.items():
            self.handles.append(lin.register_forward_pre_hook(self._linear_hook(name), with_kwargs=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _model_pre(self, module, args, kwargs):
        self.depth += 1
        if self.depth == 1:
            self.model_calls += 1
            self.timestep = self._timestep(args, kwargs)

    def _model_post(self, module, args, output):
        if self.depth == 1:
            self.check()
            self.progress.update(self.model_calls)

    def _model_exit(self, module, args, output):
        self.depth -= 1
        if self.depth == 0:
            self.timestep = math.nan

    def _linear_hook(self, name: str):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("input")
            if isinstance(x, Tensor):
                self.rows[name].append(_absmax_row(to_tokens(module, x)))
                self.steps[name].append(self.timestep)
                self.pending.append((name, len(self.rows[name]) - 1, self.model_calls - 1))

        return hook

    def _timestep(self, args, kwargs) -> float:
        return timestep_argument(self.signature, args, kwargs)[1]

    def check(self) -> None:
        """Raise on the first pending row with NaN / Inf (one device sync for all of them)."""
        if not self.pending:
            return
        rows = [self.rows[name][i] for name, i, _ in self.pending]
        bad = torch.stack([~torch.isfinite(r).all() for r in rows])
        if bool(bad.any()):
            name, i, call = self.pending[int(bad.nonzero()[0, 0])]
            raise CalibrationError(f"layer {name!r}: input holds NaN or Inf on its call {i} "
                                   f"(model call {call}); calibration stopped")
        self.pending.clear()

    def stats(self) -> CalibrationStats:
        absmax = {n: torch.stack(r).cpu() for n, r in self.rows.items() if r}
        steps = {n: torch.tensor(self.steps[n], dtype=torch.float32) for n in absmax}
        return CalibrationStats(absmax, steps, self.model_calls)


def timestep_argument(signature: inspect.Signature | None, args: tuple,
                      kwargs: dict) -> tuple[str | None, float]:
    """``(name, value)`` of the timestep argument of a model call (the first of
    ``TIMESTEP_NAMES`` the call binds); ``(None, nan)`` when it has none."""
    if signature is None:
        return None, math.nan
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return None, math.nan
    found = dict(bound.arguments)
    for p in signature.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD and isinstance(found.get(p.name), dict):
            found = {**found.pop(p.name), **found}
    for key in TIMESTEP_NAMES:
        if key in found:
            return key, _timestep_value(found[key])
    return None, math.nan


def record_calls(model: nn.Module, sampler: Callable[[nn.Module], Any]) -> list[tuple[tuple, dict]]:
    """Run ``sampler(model)`` once in floating point and keep a copy of every model call's
    ``(args, kwargs)`` (tensors detached and cloned), so the calls can be replayed with the same
    inputs however the model is perturbed."""
    calls: list[tuple[tuple, dict]] = []
    depth = [0]

    def copy(v):
        return v.detach().clone() if isinstance(v, Tensor) else v

    def pre(module, args, kwargs):
        depth[0] += 1
        if depth[0] == 1:
            calls.append((tuple(copy(a) for a in args), {k: copy(v) for k, v in kwargs.items()}))

    def post(module, args, output):
        depth[0] -= 1

    handles = [model.register_forward_pre_hook(pre, with_kwargs=True),
               model.register_forward_hook(post, always_call=True)]
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            sampler(model)
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    if not calls:
        raise CalibrationError("the sampler made no forward calls of the model")
    return calls


def _signature(model: nn.Module) -> inspect.Signature | None:
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


def _calls(calibration: Iterable) -> Iterable[tuple[tuple, dict]]:
    for i, item in enumerate(calibration):
        ok = isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], (tuple, list)) \
            and isinstance(item[1], Mapping)
        if not ok:
            raise CalibrationError(f"calibration item {i} must be an (args, kwargs) pair with args a tuple "
                                   f"and kwargs a dict, got {type(item).__name__}")
        yield tuple(item[0]), dict(item[1])


def calibrate(model: nn.Module, calibration: Any, *, layers: Callable[[str], bool] | None = None,
              progress: bool | None = None) -> CalibrationStats:
    """Observe the input absmax of every linear layer of ``model`` (``nn.Linear``, 1×1
    convolutions: ``graph.modules.linear_layers``) over the calibration calls.

    calibration: an iterable of ``(args, kwargs)`` model calls (with ``len()`` the progress bar
        shows a total), or a callable ``sampler(model)`` that calls the model itself (every
        timestep, both CFG branches).
    layers: keep only the linears whose module path it accepts.
    progress: text bar on stderr; None = only when stderr is a terminal.
    Runs in eval mode under ``torch.no_grad()``; restores every module's training flag and
    removes every hook, also when the calibration raises.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(calibration, (str, bytes, os.PathLike)):
        raise TypeError(f"calibrate takes calibration calls or a sampler, got a path "
                        f"({calibration!r}); load saved statistics with CalibrationStats.load or "
                        f"resolve_calibration")
    is_sampler = callable(calibration)
    if not is_sampler and not isinstance(calibration, Iterable):
        raise TypeError(f"calibration must be an iterable of (args, kwargs) calls or a callable taking "
                        f"the model, got {type(calibration).__name__}")
    linears = {n: m for n, m in linear_layers(model).items() if layers is None or layers(n)}
    if not linears:
        raise CalibrationError("no linear layer (nn.Linear or 1x1 convolution) to observe"
                               + (" (the layers filter accepted none)" if layers is not None else ""))
    total = None if is_sampler or not hasattr(calibration, "__len__") else len(calibration)
    bar = _Progress(progress, total)
    obs = _Observer(model, linears, bar)
    training = {m: m.training for m in model.modules()}
    model.eval()
    obs.install()
    try:
        with torch.no_grad():
            if is_sampler:
                calibration(model)
            else:
                for args, kwargs in _calls(calibration):
                    model(*args, **kwargs)
        obs.check()
    finally:
        obs.remove()
        bar.close()
        for m, flag in training.items():
            m.training = flag
    if obs.model_calls == 0:
        raise CalibrationError("calibration made no forward calls of the model")
    stats = obs.stats()
    if not stats.absmax_per_call:
        raise CalibrationError(f"the model was called {obs.model_calls} times but none of the "
                               f"{len(linears)} observed linear layers ran")
    unused = len(linears) - len(stats.absmax_per_call)
    log.info("calibrated %d linear layers over %d model calls%s", len(stats.absmax_per_call),
             obs.model_calls, f" ({unused} observed layers never ran)" if unused else "")
    return stats


CALIBRATION_KINDS = ("statistics", "path", "calls", "sampler")
"""What ``calibration=`` can be: ``CalibrationStats``, the path (str / ``os.PathLike``) of a file
``CalibrationStats.save`` wrote, an iterable of ``(args, kwargs)`` model calls, or a sampler
callable that takes the model and calls it."""

ACCEPTS = {
    "quantize": CALIBRATION_KINDS,
    "search": ("calls", "sampler"),
    "backend": ("statistics", "path"),
}
"""The kinds each entry point takes: ``vq.quantize`` (and the CLI) all of them; ``vq.search`` the
calls (it replays them); the ``torch.compile`` backend's ``calibration`` option the statistics
(it cannot run the model)."""

_REFUSED = {
    "search": ": search replays the calibration calls once per layer and width, so it needs the calls "
              "themselves (an iterable of (args, kwargs), or a sampler callable taking the model), "
              "not statistics",
    "backend": " must be CalibrationStats or the path of saved statistics: the backend cannot run the "
               "model (it sees only the graph Dynamo captured, while compiling), so it cannot use calls "
               "or a sampler; run stats = viditq_compile.calibrate(model, calls) first and pass stats or "
               "the path of the file stats.save wrote",
}


def calibration_kind(calibration: Any, where: str = "calibration") -> str:
    """Which of ``CALIBRATION_KINDS`` ``calibration`` is; a ``TypeError`` naming ``where`` for
    anything else."""
    if isinstance(calibration, CalibrationStats):
        return "statistics"
    if isinstance(calibration, (str, os.PathLike)):
        return "path"
    if isinstance(calibration, (bytes, bytearray)):
        raise TypeError(f"{where}: got bytes; pass the path of saved statistics as a str or os.PathLike")
    if callable(calibration):
        return "sampler"
    if isinstance(calibration, Iterable):
        return "calls"
    raise TypeError(f"{where} must be CalibrationStats, the path of saved statistics, an iterable of "
                    f"(args, kwargs) calls or a sampler callable taking the model, got "
                    f"{type(calibration).__name__}")


def resolve_calibration(model: nn.Module | None, calibration: Any, *, entry: str = "quantize",
                        recipe: Recipe | None = None, where: str = "calibration") -> Any:
    """The one reading of a ``calibration=`` argument, for every entry point (``entry``, a key of
    ``ACCEPTS``; ``where`` names the argument in errors).

    For ``"quantize"`` and ``"backend"``: ``CalibrationStats`` (validated, and checked against the
    model's linears when ``model`` is given: a layer whose input width differs is an error; layers
    without statistics are left for the caller to report), loaded from a path, or computed by
    ``calibrate`` from calls or a sampler (``"quantize"`` only). ``None``: the statistics at the
    recipe's ``calib_data.save_path`` (``Recipe.calibration_path``) when that file exists, with a
    warning when it does not; else ``None``.
    For ``"search"``: the list of ``(args, kwargs)`` calls (a sampler's recorded once, with
    ``record_calls``).
    A kind the entry point does not take is a ``TypeError`` saying why.
    """
    if entry not in ACCEPTS:
        raise ValueError(f"entry must be one of {sorted(ACCEPTS)}, got {entry!r}")
    if calibration is None:
        return None if entry == "search" else _recipe_statistics(recipe)
    kind = calibration_kind(calibration, where)
    if kind not in ACCEPTS[entry]:
        raise TypeError(f"{where}{_REFUSED[entry]} (got {type(calibration).__name__})")
    if entry == "search":
        calls = record_calls(model, calibration) if kind == "sampler" else list(_calls(calibration))  # type: ignore[arg-type]
        if not calls:
            raise CalibrationError("calibration holds no calls")
        return calls
    if kind == "statistics":
        calibration.validate()
        stats = calibration
    elif kind == "path":
        stats = CalibrationStats.load(calibration)
    else:
        return calibrate(model, calibration)  # type: ignore[arg-type]  # entries taking calls pass a model
    if model is not None:
        widths = {n: in_features(m) for n, m in linear_layers(model).items()}
        missing = stats.check_model(widths)
        if missing:
            log.debug("no calibration statistics for %d linear layers: %s", len(missing), missing)
    return stats


def _recipe_statistics(recipe: Recipe | None) -> CalibrationStats | None:
    """The statistics a recipe names (``calib_data.save_path``), if its file exists."""
    path = getattr(recipe, "calibration_path", None)
    if recipe is None or path is None:
        return None
    if not os.path.exists(path):
        log.warning("recipe %r: calib_data.save_path %s does not exist: no calibration statistics "
                    "(viditq quantize --calibration N writes them there)", recipe.name, path)
        return None
    try:
        stats = CalibrationStats.load(path)
    except CalibrationError as e:
        raise CalibrationError(f"recipe key 'calib_data.save_path' of {recipe.name!r}: {e}") from None
    log.info("recipe %r: calibration statistics from calib_data.save_path %s", recipe.name, path)
    return stats
