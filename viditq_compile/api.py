"""``quantize``: model + example inputs + recipe -> ``QuantizedModel`` (an exported program).
``compile``: ``torch.compile`` with the ``viditq`` backend, checked after the first call
(``CompiledModel``: which layers Dynamo's graphs left unquantized, the graph breaks)."""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._dynamo.eval_frame import OptimizedModule

from viditq_compile.config.plan import Plan
from viditq_compile.config.recipe import Recipe
from viditq_compile.graph.capture import capture, eval_mode
from viditq_compile.graph.sites import ExportedTensors
from viditq_compile.pipeline import quantize_graph
from viditq_compile.program import QuantizedModel

log = logging.getLogger(__name__)


def quantize(model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None, *,
             recipe: str | os.PathLike | Recipe | dict = "w8a8", plan: Plan | None = None,
             calibration: Any = None, dynamic: Any = True,
             buckets: Sequence[tuple[tuple, dict]] | None = None, tensor_parallel: int = 1,
             tp_plan: Mapping[str, Any] | None = None) -> QuantizedModel:
    """Capture ``model(*args, **kwargs)`` with ``torch.export`` and quantize its linear layers.

    recipe: a preset (``"fp"``, ``"w8a8"``, ``"w4a8"``, the mixed-precision ``"w4a8-mp"`` and
    ``"w4a4-mp"`` (which run ``viditq_compile.search`` on the calibration calls), the ablation
    baselines ``"w8a8-naive"``, ``"-dynamic"``, ``"-smooth"``, ``"-rotate"``, ``"-viditq"`` and
    their ``w4a8`` forms), a YAML
    path (the ViDiT-Q reference format included), a mapping in that format, or a ``Recipe``.
    plan: apply this ``Plan`` instead of selecting by recipe.
    calibration: ``CalibrationStats`` (from ``viditq_compile.calibrate``), a path to saved
    statistics, an iterable of ``(args, kwargs)`` calls, or a callable that runs the user's
    sampler with the model (``calibration.observe.resolve_calibration``). It enables smoothing
    (and the ``w8a8`` preset's ViDiT-Q balancing); without it, recipes that smooth fall back to
    rotation only, as the report says. When it is not given, a YAML recipe's
    ``calib_data.save_path`` is read if that file exists.
    dynamic: see ``viditq_compile.graph.capture.capture``.
    buckets: more example calls ``(args, kwargs)`` at the other input sizes the program must take
    where the model pins them (PixArt-Σ's aspect-ratio bins): each is captured and quantized by the
    same plan, sharing the weights (``viditq_compile.buckets``); a call the program already takes
    adds nothing and is refused with ``ValueError``.
    tensor_parallel: the number of tensor-parallel ranks the program (or its module form) will be
    sharded over (``parallel.tensor.parallelize``), an int >= 1; tp_plan: the layers it shards
    (``{module-path glob: "colwise" | "rowwise" | diffusers' packed styles}``; default the model's
    ``_tp_plan``). With N >= 2 each row-parallel layer's split is checked (each shard's K a
    multiple of 16 and of the weight group, or ``ValueError`` naming the layer and the numbers),
    rotating row-parallel layers get a block-diagonal rotation (one block per shard, since a
    full-width Hadamard does not commute with the split), and the report states each sharded
    layer's treatment and the rotation's cost (SQNR with the full-width and the block-diagonal
    rotation on the example call; ``parallel.tp_plan``).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if plan is not None and not isinstance(plan, Plan):
        raise TypeError(f"plan must be a viditq_compile.Plan, got {type(plan).__name__}")
    calls = _bucket_calls(buckets)
    from viditq_compile.parallel.tp_plan import TensorParallel

    tp = TensorParallel.of(model, tensor_parallel, tp_plan)
    r = Recipe.resolve(recipe)
    r.check_supported()
    if plan is None and r.budget is not None:
        plan, searched = _search_plan(model, r, calibration)
        if dynamic is True and tp is None and _runs(searched, args, kwargs or {}):
            # the program the search measured: the model is not captured again
            return _add_buckets(searched, model, calls)
        calibration = None  # the searched plan carries the statistics it was made with
    from viditq_compile.calibration.observe import resolve_calibration

    balance_inputs = None
    if plan is None and r.balance_search is not None:
        # balance="search" scores each layer's output on the calibration inputs: calls, not statistics
        from viditq_compile.mixed_precision.balance_search import record_calibration

        _, stats, balance_inputs = record_calibration(model, calibration, r.balance_search.max_rows)
    elif calibration is not None:
        stats = resolve_calibration(model, calibration, recipe=r)
    elif plan is not None and plan.calibration is not None:
        stats = plan.calibration  # a searched plan carries the statistics it was made with
    else:  # the recipe's calib_data.save_path, when it names an existing file
        stats = resolve_calibration(model, None, recipe=r)
    with eval_mode(model):
        ep = capture(model, args, kwargs, dynamic=dynamic)
    done = quantize_graph(ExportedTensors(ep), r, plan, stats, tensor_parallel=tp, balance_inputs=balance_inputs)
    if tp is not None:
        done.plan = _tp_cost(done.plan, model, args, kwargs, stats)
    qm = QuantizedModel(ep, done.plan)
    log.info("quantized %d linear calls; %s", done.count, qm.report.summary())
    return _add_buckets(qm, model, calls)


def _tp_cost(plan: Plan, model: torch.nn.Module, args: tuple, kwargs: dict | None, stats) -> Plan:
    """``plan`` with the block-diagonal rotations' cost measured on the example call."""
    from viditq_compile.parallel.tp_plan import capture_inputs, measure_rotation_cost

    assert plan.tensor_parallel is not None  # TensorParallel.apply recorded it
    rotated = [n for n, e in plan.tensor_parallel["layers"].items()
               if e["style"] == "rowwise" and e["rotation_blocks"]]
    if not rotated:
        return plan
    with eval_mode(model):
        inputs = capture_inputs(model, rotated, args, kwargs)
    return measure_rotation_cost(plan, model, inputs, stats if stats is not None else plan.calibration)


def _bucket_calls(buckets) -> list[tuple[tuple, dict]]:
    from viditq_compile.io.artifact import MAX_BUCKETS

    if buckets is None:
        return []
    if isinstance(buckets, (str, bytes, dict)) or not isinstance(buckets, Sequence):
        raise TypeError(f"buckets must be a list of (args, kwargs) example calls, got "
                        f"{type(buckets).__name__}")
    if len(buckets) + 1 > MAX_BUCKETS:
        raise ValueError(f"buckets: {len(buckets)} example calls; at most {MAX_BUCKETS - 1} are taken")
    calls = []
    for i, call in enumerate(buckets):
        if not (isinstance(call, tuple) and len(call) == 2 and isinstance(call[0], tuple)
                and isinstance(call[1], dict)):
            raise TypeError(f"buckets[{i}] must be an (args tuple, kwargs dict) pair, got "
                            f"{type(call).__name__}")
        calls.append(call)
    return calls


def _add_buckets(qm: QuantizedModel, model: torch.nn.Module, calls) -> QuantizedModel:
    for i, (args, kwargs) in enumerate(calls):
        if qm.takes(args, kwargs):
            raise ValueError(f"buckets[{i}]: the program already takes this call's shapes (the "
                             f"model does not pin them, or an earlier bucket has them): it would add "
                             f"nothing\n{qm.input_shapes}")
        qm.add_bucket(model, args, kwargs)
    if calls:
        log.info("%d resolution bucket(s), %.1f MiB of tensors in all", len(qm.programs),
                 qm.weight_bytes / 2**20)
    return qm


def _runs(qm: QuantizedModel, args: tuple, kwargs: dict) -> bool:
    """Whether the searched program (captured from the first calibration call, dynamic shapes) takes
    the example call ``quantize`` was given; if not, the model is captured from that call."""
    try:
        with torch.no_grad():
            qm(*args, **kwargs)
        return True
    except Exception as e:  # noqa: BLE001 (any refusal of the call: guards, arity, pytree structure)
        log.info("the searched program does not take the given example call (%s: %s); capturing it",
                 type(e).__name__, str(e)[:200])
        return False


def _search_plan(model, recipe: Recipe, calibration) -> tuple[Plan, QuantizedModel]:
    from viditq_compile.mixed_precision.search import search_program

    if calibration is None:
        raise ValueError(f"recipe {recipe.name!r} searches mixed precision under a budget, which "
                         f"needs calibration calls: pass calibration= (an iterable of (args, kwargs) "
                         f"or a sampler callable)")
    log.info("recipe %r: searching widths under %s", recipe.name, recipe.budget)
    plan, qm = search_program(model, calibration, recipe.budget, timestep_ranges=recipe.timestep_ranges,
                              recipe=recipe.with_(budget=None, timestep_ranges=1))
    return plan, qm


# ----------------------------------------------------------------------------------------------
# vq.compile


def compile(model: torch.nn.Module, *, recipe: str | os.PathLike | Recipe | dict = "w8a8",
            plan: Plan | None = None, calibration: Any = None,
            **torch_compile_kwargs: Any) -> CompiledModel:
    """``torch.compile(model, backend="viditq", options=...)``, checked after the first call.

    recipe, plan, calibration: the backend's options (see ``viditq_compile.backend``): a
    preset name, YAML path, mapping or ``Recipe``; a ``Plan`` (e.g. ``vq.quantize(...).plan``,
    ``vq.search``'s) applied instead of the recipe's selection; ``CalibrationStats`` or the path of
    saved statistics. They are checked here, once. torch_compile_kwargs: the other arguments of
    ``torch.compile`` (``fullgraph``, ``dynamic``, ``mode``, ...); not ``backend`` or ``options``.

    Returns the ``torch.compile`` module (a ``CompiledModel``, which is an ``OptimizedModule``),
    which after its first call runs ``backend.coverage(model)`` once and warns (once per model)
    about the linear layers that Dynamo's skipped frames or graph breaks left unquantized, with
    the graph-break reasons Dynamo recorded. ``.coverage`` and ``.report`` read the same at any
    time. It adds no hooks to the model (Dynamo would recompile for them).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"vq.compile: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, OptimizedModule):
        raise TypeError(f"vq.compile: model is already compiled (a torch.compile result over "
                        f"{type(model._orig_mod).__name__}); pass the module itself "
                        f"(compiled._orig_mod)")
    for key in ("backend", "options"):
        if key in torch_compile_kwargs:
            raise TypeError(f"vq.compile: {key}={torch_compile_kwargs[key]!r} is not taken: it "
                            f"compiles with backend='viditq', whose options are the recipe=, "
                            f"plan= and calibration= arguments")
    known = set(inspect.signature(torch.compile).parameters) - {"model", "backend", "options"}
    unknown = sorted(set(torch_compile_kwargs) - known)
    if unknown:
        raise TypeError(f"vq.compile: unexpected argument(s) {unknown}; torch.compile takes "
                        f"{sorted(known)}")
    from viditq_compile import backend

    options: dict[str, Any] = {"recipe": recipe, "plan": plan, "calibration": calibration}
    r, plan, stats, _ = backend._parse_options({"options": dict(options)})
    options = {"recipe": r, **({"plan": plan} if plan is not None else {}),
               **({"calibration": stats} if stats is not None else {})}
    mode = torch_compile_kwargs.pop("mode", None)
    if mode is None:
        compiled = torch.compile(model, backend="viditq", options=options, **torch_compile_kwargs)
    else:  # torch.compile takes mode or options, not both: the backend gets the options bound
        compiled = torch.compile(model, backend=functools.partial(backend.viditq_backend,
                                                                  options=options),
                                 mode=mode, **torch_compile_kwargs)
    if not isinstance(compiled, OptimizedModule):  # torch.compile inside torch.export: a no-op
        return compiled  # type: ignore[return-value]
    compiled.__class__ = CompiledModel
    compiled._viditq_state = _CompileState()
    return compiled  # type: ignore[return-value]


@dataclass
class CompileReport:
    """What ``vq.compile``'s backend did with one model: ``graphs`` (the backend's report of
    each graph that received the model's layers, in compile order; each title says which
    sub-module a graph compiles when it is not the whole model), ``graph_breaks`` (the reasons
    Dynamo recorded while this model compiled, with their counts) and ``coverage`` (which layers
    reached the backend, which never did)."""

    graphs: list
    graph_breaks: dict[str, int]
    coverage: Any

    @property
    def num_quantized(self) -> int:
        return sum(r.num_quantized for r in self.graphs)

    def __str__(self) -> str:
        lines = [f"viditq compile: {len(self.graphs)} graph(s), "
                 f"{sum(self.graph_breaks.values())} graph break(s)"]
        lines += [f"  graph break ({n}x): {(why.strip().splitlines() or ['?'])[0]}"
                  for why, n in self.graph_breaks.items()]
        lines += [str(self.coverage)] + [str(r) for r in self.graphs]
        return "\n".join(lines)

    __repr__ = __str__


@dataclass
class _CompileState:
    checked: bool = False
    graph_breaks: Counter = field(default_factory=Counter)


def _graph_break_counts() -> Counter:
    from torch._dynamo.utils import counters

    return Counter(counters["graph_break"])


class CompiledModel(OptimizedModule):
    """The module ``vq.compile`` returns: ``torch.compile``'s, plus ``coverage`` and ``report``
    (and the one check after the first call)."""

    _viditq_state: _CompileState | None = None  # a class attribute: set on this object, not the model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        state = self._viditq_state
        before = _graph_break_counts()
        out = super().__call__(*args, **kwargs)
        if state is not None:
            state.graph_breaks.update(_graph_break_counts() - before)  # Counter "-": positive only
            if not state.checked:
                state.checked = True
                self._check(state)
        return out

    def _check(self, state: _CompileState) -> None:
        from viditq_compile import backend

        breaks = "; ".join(f"{(why.strip().splitlines() or ['?'])[0]} ({n}x)"
                           for why, n in state.graph_breaks.items())
        why = f"graph breaks Dynamo recorded: {breaks}" if breaks else ""
        cov = backend.coverage(self._orig_mod, warn=True, why=why)
        if breaks and not cov.missing:
            log.info("vq.compile: %s: %s", type(self._orig_mod).__name__, why)

    @property
    def coverage(self):
        """``backend.coverage`` of the model, now (no warning)."""
        from viditq_compile import backend

        return backend.coverage(self._orig_mod, warn=False)

    @property
    def report(self) -> CompileReport:
        """The backend's reports of this model's graphs, the graph breaks, the coverage."""
        from viditq_compile import backend

        state = self._viditq_state or _CompileState()
        return CompileReport(backend.reports_of(self._orig_mod), dict(state.graph_breaks),
                             self.coverage)

