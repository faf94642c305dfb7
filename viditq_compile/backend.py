"""The ``viditq`` backend for ``torch.compile``.

``torch.compile(model, backend="viditq")`` works after ``import torch`` alone: the entry point
(group ``torch_dynamo_backends``) names ``viditq_backend``, a plain function, which Dynamo looks up
lazily. Each graph Dynamo captures (one per graph break, one per recompile) goes through the same
select and quantize passes as ``viditq_compile.quantize``, then to Inductor with the ``viditq``
lowerings installed. A graph that already holds ``viditq`` ops (a loaded or exported quantized
program) is compiled as it is.

The quantized weights are inputs of the compiled graph, not constants baked into it: Dynamo
reuses one graph for every module that runs the same code (regional compilation,
``block.compile()`` on each of a model's repeated blocks), passing each module's own float
parameters, so on each call the graph gets the quantized forms of the parameters it was given
(derived once per set of parameters by re-running the passes, then cached).

Options (``torch.compile(..., options={...})``): ``recipe`` (preset name, YAML path, mapping or
``Recipe``; default ``"w8a8"``), ``plan`` (a ``Plan`` to apply instead of the recipe's selection),
``calibration`` (``CalibrationStats`` or the path of saved statistics; the backend cannot run a
sampler itself, so calibrate first with ``viditq_compile.calibrate``; calls or a sampler are
refused; without it, a YAML recipe's ``calib_data.save_path`` is read if that file exists).
The compiled function is inference only: it runs under ``torch.no_grad()``.

Calls that do not reach the backend run in floating point, and Dynamo says so at most in a log
line; this module makes both cases loud:

- **Recompile limit.** Dynamo compiles a function again for each new guard failure (a batch size
  a model specializes on, e.g. a Python loop over the batch) up to
  ``torch._dynamo.config.recompile_limit`` (``cache_size_limit`` before torch 2.7; 8 by
  default), then runs the function eagerly: unquantized. Dynamo's automatic dynamic shapes keep
  most models at one or two graphs (a second size recompiles with that dimension dynamic), but a
  model that pins a dimension cannot be made dynamic by the backend, and a backend cannot set
  ``fail_on_recompile_limit_hit`` for its own frames only. So when a function the backend has
  compiled hits the limit, ``log.warning`` (once per code object) names the limit, its value and
  how to raise it (or to make it an error: ``torch._dynamo.config.fail_on_recompile_limit_hit``).
- **Skipped frames and graph breaks.** Each graph Dynamo captures is quantized, but code Dynamo
  skips (``torch._dynamo.disable``, a frame it cannot trace) never reaches the backend.
  ``coverage(model)`` compares the model's linear layers (``nn.Linear``, 1×1 convolutions) with
  those the backend's graphs received (by weight identity, so names are full module paths even when a sub-module was
  compiled) and warns once per model about the layers that never reached it.
  ``viditq_compile.compile`` runs it after the first call.

Layer names are full module paths of the model in every graph. When Dynamo skips or breaks a
model's ``forward``, it compiles nested modules' frames on their own and its sources name their
weights relative to that module (``linear`` for ``norm_out.linear``); the backend finds the model
the weights belong to by identity (``graph.sites.ModuleIndex``: one pass over the live modules per
graph), so name rules (``remain_fp_regex``, plans, ``mixed_precision``) and reports see the full
path, and the report's title says which sub-module of which model the graph compiles. Where no one
root holds the weights, or a weight is shared, the graph's name is kept and the title says why.
A given ``plan`` made on the whole model applies to each graph: the layers of the model that a
graph does not call are left to the graphs that do.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.utils.weak import WeakIdKeyDictionary

from viditq_compile.config.plan import Plan
from viditq_compile.config.recipe import Recipe
from viditq_compile.graph.modules import is_linear_layer
from viditq_compile.graph.sites import DynamoTensors, ModuleIndex
from viditq_compile.lowering import inductor as inductor_lowering
from viditq_compile.lowering.cache_key import cache_key_pass
from viditq_compile.lowering.fuse_epilogues import fuse_epilogues
from viditq_compile.ops.schema import NAMESPACE
from viditq_compile.passes.conv_as_linear import convs_as_linears
from viditq_compile.passes.quantize_attention import program_attentions
from viditq_compile.pipeline import quantize_graph
from viditq_compile.report.tables import Report, build_report

log = logging.getLogger(__name__)

OPTIONS = ("recipe", "plan", "calibration")
REPORTS: deque[Report] = deque(maxlen=64)
"""Reports of the graphs this process compiled with the backend, newest last."""
RECOMPILE_LIMIT_HITS: deque[str] = deque(maxlen=64)
"""The warnings for functions compiled with the backend that hit Dynamo's recompile limit (and
so run unquantized from then on), oldest first."""

_warned_cache_key: list[bool] = []
_QUANTIZED_WEIGHTS = WeakIdKeyDictionary()  # float weight -> its quantized forms
_REACHED = WeakIdKeyDictionary()  # linear weight the backend saw -> (graph numbers, name, state)
_GRAPHS: list[int] = [0]  # graphs compiled so far (REPORTS keeps only the newest)
_VIDITQ_FRAMES: set[int] = set()  # Dynamo frame ids (one per code object) the backend compiled
_WARNED_FRAMES: set[int] = set()
_WARNED_MODELS: weakref.WeakSet = weakref.WeakSet()
_GRAPH_REPORTS: OrderedDict[int, Report] = OrderedDict()  # graph number -> its report (newest 1024)


def _has_viditq_ops(gm: torch.fx.GraphModule) -> bool:
    return any(n.op == "call_function" and getattr(n.target, "namespace", None) == NAMESPACE
               for n in gm.graph.nodes)


def _parse_options(kwargs: dict) -> tuple[Recipe, Any, Any, dict]:
    options = dict(kwargs.pop("options", None) or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"viditq backend: unknown option(s) {unknown}; known: {list(OPTIONS)}")
    recipe = Recipe.resolve(options.get("recipe", "w8a8"))
    recipe.check_supported()
    plan = options.get("plan")
    if recipe.budget is not None and plan is None:
        raise ValueError(f"viditq backend: recipe {recipe.name!r} searches mixed precision, which "
                         f"replays calibration calls on the eager model; run "
                         f"plan = viditq_compile.search(model, calls, budget) (or "
                         f"viditq_compile.quantize(..., recipe={recipe.name!r}, calibration=calls)) "
                         f"and pass options={{'plan': plan}}")
    if recipe.balance_search is not None and plan is None:
        raise ValueError(f"viditq backend: recipe {recipe.name!r} searches the balancing per layer on the "
                         f"calibration inputs, which the backend does not have; run plan, _ = "
                         f"viditq_compile.mixed_precision.balance_search.search_balance(model, calls, "
                         f"{recipe.name!r}) and pass options={{'plan': plan}}")
    if plan is not None and not isinstance(plan, Plan):
        raise TypeError(f"viditq backend: option 'plan' must be a Plan, got {type(plan).__name__}")
    from viditq_compile.calibration.observe import resolve_calibration

    stats = resolve_calibration(None, options.get("calibration"), entry="backend", recipe=recipe,
                                where="viditq backend: option 'calibration'")
    config = {}
    mode = kwargs.pop("mode", None)
    if mode is not None:
        from torch._inductor import list_mode_options

        config.update(list_mode_options(mode))
    if kwargs:
        raise ValueError(f"viditq backend: unexpected arguments {sorted(kwargs)}")
    return recipe, plan, stats, config


def _quantize_graph(gm: fx.GraphModule, example_inputs, recipe, given_plan, stats, graph=-1,
                    reuse_index=False):
    """Run select, balance and quantize on ``gm`` in place; returns (tensors, plan, count, the
    ids of the float weights that were quantized). Records each linear weight it saw as reached
    by graph number ``graph`` (see ``coverage``). ``reuse_index``: name the layers with the last
    ``ModuleIndex`` when it is recent (another module running a compiled graph), else a new one."""
    params = [v for v in example_inputs if isinstance(v, torch.nn.Parameter)]
    index = ModuleIndex.recent(params) if reuse_index else ModuleIndex.fresh()
    tensors = DynamoTensors(gm, example_inputs, index)
    convs_as_linears(tensors)  # before the sites are read (quantize_graph finds none left)
    all_sites = tensors.linear_sites()
    sites = [(s.name, s.param) for s in all_sites if s.param is not None]
    if given_plan is not None:
        given_plan = _plan_for_graph(given_plan, {s.name for s in all_sites}, tensors.root)
    done = quantize_graph(tensors, recipe, given_plan, stats, cache=_QUANTIZED_WEIGHTS)
    for name, weight in sites:
        layer = done.plan.layers.get(name)
        state = "quantized" if layer is not None and layer.quantized else \
            f"FP: {getattr(layer, 'reason', None) or 'kept by the plan'}"
        _reach(weight, graph, name, state)
    return tensors, done.plan, done.count, done.weights, done.fusion


def _plan_for_graph(plan: Plan, in_graph: set[str], root: torch.nn.Module | None) -> Plan:
    """``plan`` without the layers of ``root`` (the model the graph's weights belong to) that this
    graph does not call: a graph break or a compiled sub-module gives each graph some of the
    model's layers. A layer the model lacks stays, so ``match_plan`` refuses it by name."""
    if root is None:
        return plan
    model = {name for name, _ in root.named_modules(remove_duplicate=False)}
    layers = {n: lp for n, lp in plan.layers.items() if n in in_graph or n not in model}
    return plan if len(layers) == len(plan.layers) else dataclasses.replace(plan, layers=layers)


def _decisions(plan: Plan) -> list:
    """What a compiled graph bakes in for each layer, in graph order: the plan less the names."""
    return [dataclasses.replace(lp, name="", reason=None, note=None) for lp in plan.layers.values()]


# ----------------------------------------------------------------------------------------------
# Calls that never reach the backend


def _reach(weight: torch.Tensor, graph: int, name: str, state: str) -> None:
    hit = _REACHED.get(weight)
    graphs = hit[0] | {graph} if hit is not None else {graph}
    _REACHED[weight] = (graphs, name, state)


def _current_frame_id() -> int | None:
    compile_id = torch._guards.CompileContext.current_compile_id()
    frame_id = getattr(compile_id, "frame_id", None)
    return frame_id if isinstance(frame_id, int) else None


class _RecompileLimitFilter(logging.Filter):
    """Reads Dynamo's "hit config.recompile_limit" log record (``torch._dynamo.convert_frame``,
    emitted inside the compile context of the frame that hit it) and, for a frame the backend
    has compiled, adds the backend's own warning. Lets every record through."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.msg if isinstance(record.msg, str) else ""
            if msg.startswith("torch._dynamo hit config.") and isinstance(record.args, tuple):
                frame_id = _current_frame_id()
                if frame_id in _VIDITQ_FRAMES and frame_id not in _WARNED_FRAMES:
                    _WARNED_FRAMES.add(frame_id)
                    limit, value, function = (list(record.args) + ["?", "?", "?"])[:3]
                    message = recompile_limit_message(str(limit), value, str(function))
                    RECOMPILE_LIMIT_HITS.append(message)
                    log.warning("%s", message)
        except Exception:  # noqa: BLE001  (a log filter must never break Dynamo)
            pass
        return True


def recompile_limit_message(limit: str, value, function: str) -> str:
    """The warning for a function compiled with the backend that hit Dynamo's ``limit``."""
    return (f"viditq backend: {function} hit torch._dynamo.config.{limit} ({value}): Dynamo now "
            f"runs it eagerly, so its calls are NOT quantized (floating point). Each new input "
            f"shape the model specializes on (e.g. a batch size) compiled it once more. Raise the "
            f"limit (torch._dynamo.config.{limit} = N, before the first call), call it with fewer "
            f"shapes, or set torch._dynamo.config.fail_on_recompile_limit_hit = True to make "
            f"this an error")


def _install_recompile_limit_filter() -> None:
    logger = logging.getLogger("torch._dynamo.convert_frame")
    if not any(isinstance(f, _RecompileLimitFilter) for f in logger.filters):
        logger.addFilter(_RecompileLimitFilter())


@dataclass
class Coverage:
    """Which of a model's linear layers the backend's graphs received (``coverage(model)``).

    ``graphs``: how many graphs the backend compiled with this model's layers; ``reached``: full
    module path -> ``"quantized"`` or ``"FP: <reason>"`` (kept FP by the plan); ``missing``:
    the layers no graph received: Dynamo skipped the code that calls them (or it has not run
    yet), so they run in floating point; ``graph_names``: full module path -> the name the
    backend's graph gave the layer, where they differ (graphs name layers by full path unless
    the model they belong to was ambiguous, a shared weight or a sub-module of two models, which
    the graph's report title states): the plan's name rules (keep-FP lists, plan files) saw that
    name, not the full path."""

    graphs: int
    reached: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    graph_names: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        quantized = sum(v == "quantized" for v in self.reached.values())
        lines = [f"viditq backend coverage: {self.graphs} graph(s); {len(self.reached)} linear "
                 f"layer(s) reached the backend ({quantized} quantized, "
                 f"{len(self.reached) - quantized} FP by plan); {len(self.missing)} never "
                 f"reached it (run FP)"]
        lines += [f"  never reached: {name}" for name in self.missing]
        lines += [f"  named {graph!r} in the graph: {name}"
                  for name, graph in self.graph_names.items()]
        return "\n".join(lines)


def coverage(model: torch.nn.Module, warn: bool = True, why: str = "") -> Coverage:
    """Compare ``model``'s linear layers (``nn.Linear`` and the 1×1 convolutions the backend runs
    as linears: ``graph.modules.is_linear_layer``) with those the backend's graphs received (call it
    after running the compiled model). Layers are matched by weight, so the names are full
    module paths of ``model`` whatever module Dynamo compiled. With ``warn``, ``log.warning``
    once per model lists the layers that never reached the backend (``why``: what else the
    warning should say, e.g. the graph breaks Dynamo recorded)."""
    reached: dict[str, str] = {}
    missing: list[str] = []
    graph_names: dict[str, str] = {}
    graphs: set[int] = set()
    for name, mod in model.named_modules():
        if not is_linear_layer(mod):
            continue
        hit = _REACHED.get(mod.weight)
        if hit is None:
            missing.append(name)
        else:
            graphs |= hit[0]
            reached[name] = hit[2]
            if hit[1] != name:
                graph_names[name] = hit[1]
    out = Coverage(len(graphs), reached, missing, graph_names)
    if warn and missing and model not in _WARNED_MODELS:
        _WARNED_MODELS.add(model)
        log.warning("viditq backend: %d linear layer(s) of %s never reached the backend and run "
                    "in floating point (Dynamo skipped the frames that call them: "
                    "torch._dynamo.disable, an untraceable frame, or code not run yet): %s%s",
                    len(missing), type(model).__name__,
                    ", ".join(missing[:16]) + (", ..." if len(missing) > 16 else ""),
                    f"; {why}" if why else "")
    return out


def graphs_of(model: torch.nn.Module) -> list[int]:
    """The numbers of the backend's graphs that received linear layers of ``model``."""
    graphs: set[int] = set()
    for mod in model.modules():
        if is_linear_layer(mod):
            hit = _REACHED.get(mod.weight)
            if hit is not None:
                graphs |= hit[0]
    return sorted(graphs)


def reports_of(model: torch.nn.Module) -> list[Report]:
    """The reports of the backend's graphs that received linear layers of ``model`` (of the
    newest 1024 graphs), in compile order."""
    return [_GRAPH_REPORTS[g] for g in graphs_of(model) if g in _GRAPH_REPORTS]


def _copy_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A ``GraphModule`` over a copy of ``gm``'s graph: new nodes, each with a new metadata dict
    holding the same values."""
    out = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    out.meta = dict(gm.meta)
    return out


def _added_tensors_as_inputs(gm: fx.GraphModule, names: list[str]) -> list[torch.Tensor]:
    """Turn the ``get_attr`` buffers ``names`` (added by the quantize pass) into trailing
    placeholders; returns their values, in placeholder order."""
    g = gm.graph
    last = [n for n in g.nodes if n.op == "placeholder"][-1]
    fake_mode = torch._guards.detect_fake_mode()
    values = []
    for name in names:
        value = getattr(gm, name)
        with g.inserting_after(last):
            last = g.placeholder(name)
        if fake_mode is not None:
            last.meta["example_value"] = fake_mode.from_tensor(value, static_shapes=True)
        for node in [n for n in g.nodes if n.op == "get_attr" and n.target == name]:
            node.replace_all_uses_with(last)
            g.erase_node(node)
        delattr(gm, name)
        values.append(value)
    g.lint()
    gm.recompile()
    return values


class _QuantizedInputs:
    """The quantized tensors a compiled graph takes after its Dynamo inputs, per set of float
    weights it is called with: those it was compiled with first, any other set (another block
    running the same code, or the same weights updated in place) derived by re-running the
    passes on an untouched copy of the graph, cached by the weights' identities and versions."""

    def __init__(self, pristine: fx.GraphModule, example_inputs, weights: set[int],
                 names: list[str], values, rewrite, plan: Plan):
        self._pristine = pristine
        self._params = [i for i, v in enumerate(example_inputs) if id(v) in weights]
        self._names = names
        self._plan = plan
        self._shapes = [(v.shape, v.dtype) for v in values]
        self._rewrite = rewrite
        self._cache: dict[tuple, tuple] = {}
        self._store(example_inputs, values)

    def _key(self, args) -> tuple:
        return tuple(id(args[i]) for i in self._params)

    def _store(self, args, values) -> None:
        for key in [k for k, (refs, _, _) in self._cache.items() if any(r() is None for r in refs)]:
            del self._cache[key]  # a module that is gone
        params = [args[i] for i in self._params]
        self._cache[self._key(args)] = ([weakref.ref(p) for p in params],
                                        [p._version for p in params], values)

    def __call__(self, args) -> list:
        hit = self._cache.get(self._key(args))
        if hit is not None:
            refs, versions, values = hit
            if all(r() is args[i] and args[i]._version == v
                   for r, v, i in zip(refs, versions, self._params)):
                return values
        gm = _copy_graph(self._pristine)
        tensors, plan = self._rewrite(gm, args)
        # names differ between modules (full paths: blocks.0.fc1, blocks.1.fc1); what the
        # compiled graph bakes in must not
        ours, theirs = _decisions(self._plan), _decisions(plan)
        if ours != theirs:
            first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b),
                         min(len(ours), len(theirs)))
            names = list(self._plan.layers), list(plan.layers)
            raise RuntimeError(
                f"viditq backend: Dynamo runs one compiled graph for every module with the same "
                f"code; it was quantized for layers {names[0][:4]}..., but the plan for "
                f"{names[1][first] if first < len(names[1]) else names[1][:4]} differs from "
                f"{names[0][first] if first < len(names[0]) else '(none)'}'s: give the "
                f"modules that share a graph the same per-layer decisions")
        values = [getattr(gm, name) for name in tensors._added]
        if [(v.shape, v.dtype) for v in values] != self._shapes:
            raise RuntimeError(f"viditq backend: quantizing this graph for another set of "
                               f"parameters added tensors {tensors._added[:4]}..., the compiled "
                               f"graph takes {self._names[:4]}...")
        self._store(args, values)
        log.info("viditq backend: quantized the weights of another module running this graph")
        return values


def viditq_backend(gm: torch.fx.GraphModule, example_inputs, **kwargs):
    """Quantize one Dynamo graph and compile it with Inductor."""
    from torch._inductor.compile_fx import compile_fx

    from viditq_compile.ops import library as ops  # noqa: F401  (defines torch.ops.viditq.*)

    recipe, given_plan, stats, config = _parse_options(kwargs)
    inductor_lowering.install()
    _install_recompile_limit_filter()
    frame_id = _current_frame_id()
    if frame_id is not None:
        _VIDITQ_FRAMES.add(frame_id)
    graph = _GRAPHS[0]
    _GRAPHS[0] += 1
    quantized_inputs = None
    n_inputs = len(example_inputs)
    if _has_viditq_ops(gm):
        log.info("viditq backend: graph is already quantized; compiling it as is")
    else:
        if stats is None and given_plan is not None:
            stats = given_plan.calibration
        # Dynamo keeps reading the placeholders of the graph it passed (and then drops their
        # metadata): rewrite one copy, keep another untouched for other parameters
        pristine, gm = _copy_graph(gm), _copy_graph(gm)
        tensors, plan, n, weights, fusion = _quantize_graph(gm, example_inputs, recipe, given_plan, stats,
                                                    graph)
        naming = tensors.naming()
        report = build_report(plan, title=f"viditq backend graph {graph} (recipe "
                                          f"{plan.recipe!r}): {n} linear calls rewritten"
                                          + (f"; {naming}" if naming else ""),
                              convolutions=tensors.kept_convolutions(),
                              attentions=program_attentions(gm),
                              shared_gemms=fusion.groups if fusion is not None else ())
        REPORTS.append(report)
        _GRAPH_REPORTS[graph] = report
        while len(_GRAPH_REPORTS) > 1024:
            _GRAPH_REPORTS.popitem(last=False)
        if naming:
            (log.warning if tensors.name_notes else log.info)("viditq backend: graph %d %s",
                                                              graph, naming)
        log.info("%s", report.summary())
        names = list(tensors._added)
        if names:
            values = _added_tensors_as_inputs(gm, names)
            quantized_inputs = _QuantizedInputs(
                pristine, example_inputs, weights, names, values,
                lambda g, args: _quantize_graph(g, args, recipe, given_plan, stats, graph,
                                                reuse_index=True)[:2],
                plan)
            fake_mode = torch._guards.detect_fake_mode(example_inputs)
            extra = [fake_mode.from_tensor(v, static_shapes=True) for v in values] \
                if fake_mode is not None else values
            example_inputs = [*example_inputs, *extra]
    fused = fuse_epilogues(gm, inductor_lowering.GEMM_KERNEL_DEVICES)
    if fused:
        log.info("viditq backend: GEMM epilogues fused: %s", dict(fused))
    import torch._inductor.config as inductor_config

    if inductor_config.post_grad_custom_post_pass is None:  # never displace a user's own pass
        config["post_grad_custom_post_pass"] = cache_key_pass()
    elif not _warned_cache_key:
        _warned_cache_key.append(True)
        log.warning("viditq backend: torch._inductor.config.post_grad_custom_post_pass is set, so "
                    "the viditq lowering cannot add its sources to Inductor's cache key; after "
                    "upgrading viditq_compile, clear the Inductor cache (TORCHINDUCTOR_CACHE_DIR)")
    with torch.no_grad():
        compiled = compile_fx(gm, example_inputs, config_patches=config or None)

    fp_weights = [(i, _REACHED[v]) for i, v in enumerate(example_inputs[:n_inputs])
                  if isinstance(v, torch.Tensor) and v in _REACHED and graph in _REACHED[v][0]] \
        if quantized_inputs is None else []
    if fp_weights:  # no quantized inputs to re-derive: record other modules' weights here
        def run(*args):
            for i, (_, name, state) in fp_weights:
                if args[i] not in _REACHED:
                    _reach(args[i], graph, name, state)
            with torch.no_grad():
                return compiled(*args)
    elif quantized_inputs is None:
        def run(*args):
            with torch.no_grad():
                return compiled(*args)
    else:
        def run(*args):
            with torch.no_grad():
                return compiled(*args, *quantized_inputs(args))

    return run


def last_report() -> Report:
    """The report of the most recent graph the backend compiled."""
    if not REPORTS:
        raise RuntimeError("the viditq backend has not compiled a graph in this process yet")
    return REPORTS[-1]
