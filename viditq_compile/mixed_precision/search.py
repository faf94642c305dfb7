"""``search``: mixed-precision plans from a sensitivity analysis and a bit budget (ViDiT-Q's
metric-decoupled mixed precision).

    calibration calls ─ calibrate ─> statistics (smoothing)
    model ─ capture ─> graph ─ select (base recipe) ─> quantizable layers, balancing
                             └ roles ─> cross / self / temporal attention, MLP
    sensitivity: each unit alone at each candidate width, per timestep range, scored by the
                 metric of its role  ─> damage[unit][range, candidate]
    allocate:    widths per unit and range minimising the total damage under the budget
    ─> Plan (timestep-aware when the widths differ by range), with the search record

The plan carries the calibration statistics it was built with, so
``quantize(model, args, kwargs, plan=plan)`` and the ``viditq`` backend apply it directly.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from viditq_compile.calibration.observe import calibrate, resolve_calibration, timestep_argument
from viditq_compile.config.budget import Budget
from viditq_compile.config.capabilities import ACT_BITS, CANDIDATE_WIDTHS, WEIGHT_BITS
from viditq_compile.config.plan import Plan
from viditq_compile.config.recipe import Recipe
from viditq_compile.graph.capture import capture
from viditq_compile.graph.roles import layer_roles_with_reasons
from viditq_compile.graph.sites import ExportedTensors
from viditq_compile.methods.balance import layer_transforms
from viditq_compile.mixed_precision import metrics as M
from viditq_compile.mixed_precision.allocate import Allocation, Unit, allocate
from viditq_compile.mixed_precision.sensitivity import (
    WEIGHT_SYM,
    Sensitivity,
    group_units,
    measure_attention_sensitivity,
    measure_sensitivity,
    merge_calls,
    run_calls,
    timestep_bounds,
)
from viditq_compile.numerics import quant as numerics
from viditq_compile.passes.conv_as_linear import convs_as_linears
from viditq_compile.passes.quantize_attention import choose_attentions
from viditq_compile.passes.select import layer_refusal, select_linears
from viditq_compile.pipeline import quantize_graph
from viditq_compile.program import QuantizedModel

log = logging.getLogger(__name__)

__all__ = ["search", "default_candidates"]


def default_candidates(budget: Budget) -> list[tuple[int, int]]:
    """Widths worth trying under ``budget``: 4-bit weights when the weight budget is below 8 bits
    (or bounded in bytes), 4-bit activations when the activation budget is below 8 bits; always
    W8A8 as the safe choice."""
    safe_w, safe_a = CANDIDATE_WIDTHS[0]  # W8A8
    narrow_w, narrow_a = min(WEIGHT_BITS), min(ACT_BITS)
    w = [safe_w] + ([narrow_w] if budget.weight_bits is None or budget.weight_bits < safe_w else [])
    if budget.weight_bits is None and budget.weight_bytes is None:
        w = [safe_w] + ([narrow_w] if budget.act_bits is not None and budget.act_bits < safe_a else [])
    a = [safe_a] + ([narrow_a] if budget.act_bits is not None and budget.act_bits < safe_a else [])
    return sorted({(wb, ab) for wb in w for ab in a}, reverse=True)


def _calls(model: nn.Module, calibration: Any) -> list[tuple[tuple, dict]]:
    return resolve_calibration(model, calibration, entry="search")

def _metrics(metrics: Any, refs: Sequence[torch.Tensor], notes: list[str]) -> dict[str, M.MetricFn]:
    """Role -> metric: the defaults (``metrics.ROLE_METRIC``) where the outputs allow them, with
    the user's overrides (one metric for every role, or a mapping role -> metric)."""
    chosen: dict[str, Any] = dict(M.ROLE_METRIC)
    if isinstance(metrics, Mapping):
        unknown = sorted(set(metrics) - set(M.ROLE_METRIC))
        if unknown:
            raise ValueError(f"metrics: unknown role(s) {unknown}; roles: {sorted(M.ROLE_METRIC)}")
        chosen.update(metrics)
        given = set(metrics)
    elif metrics is not None:
        chosen = {role: metrics for role in chosen}
        given = set(chosen)
    else:
        given = set()
    out = {}
    for role, m in chosen.items():
        fn = M.resolve_metric(m, f"metrics[{role!r}]")
        if role not in given and fn in (M.BUILTIN["cfg"], M.BUILTIN["frames"]):
            try:
                for r in refs:
                    fn(r, r)
            except M.MetricError as e:
                notes.append(f"{role} scored by output error instead of {M.metric_name(fn)}: {e}")
                fn = M.BUILTIN["output"]
        out[role] = fn
    return out


def _batches(model, calls, refs, notes: list[str]):
    """Calls merged along the batch dimension (``merge_calls``), kept only if the merged
    floating-point outputs match the calls' own (a model whose rows interact, e.g. through
    batch statistics, must run its calls alone)."""
    batches = merge_calls(calls)
    if len(batches) == len(calls):
        return None
    merged = run_calls(model, calls, batches)
    worst = max(M.noise_to_signal(r, m) for r, m in zip(refs, merged))
    if worst > 1e-8:
        notes.append(f"calls run one by one: merged along the batch they differ from the calls run "
                     f"alone (noise-to-signal {worst:.1e})")
        return None
    log.debug("search: %d calls run as %d batches", len(calls), len(batches))
    return batches


def _layer_elems(model: nn.Module, calls, layers: Sequence[str]) -> tuple[list, dict[str, float]]:
    """The floating-point outputs of the calls, and the mean number of activation elements each
    layer quantizes per call (the weight of the activation-bit average)."""
    modules = dict(model.named_modules())
    elems = {name: 0.0 for name in layers}

    def counter(name):
        def hook(module, args):
            elems[name] += float(args[0].numel())
        return hook

    handles = [modules[name].register_forward_pre_hook(counter(name)) for name in layers]
    try:
        refs = run_calls(model, calls)
    finally:
        for h in handles:
            h.remove()
    return refs, {name: v / len(calls) for name, v in elems.items()}


def search_program(model: nn.Module, calibration: Any, budget: Budget, *, timestep_ranges: int = 1,
           recipe: str | Recipe = "w4a8", candidates: Sequence[tuple[int, int]] | None = None,
           metrics: Any = None, roles: Mapping[str, str] | None = None,
           group: str | Callable[[str], str] = "layer",
           role_weights: Mapping[str, float] | None = None,
           progress: bool | None = None) -> tuple[Plan, QuantizedModel]:
    """``search`` and the program it measured: ``(plan, QuantizedModel)`` (``vq.quantize`` with a
    searching recipe uses that program rather than capturing the model again).

    Find per-layer (and per-timestep-range) bit widths that minimise the damage to the model
    output under ``budget``.

    model: the floating-point model (eager ``nn.Module``; left unchanged).
    calibration: the calls to analyse, an iterable of ``(args, kwargs)`` or a sampler callable
        taking the model (its calls are recorded once and replayed).
    budget: ``Budget(weight_bits=, act_bits=, weight_bytes=)``; every given bound is met.
    timestep_ranges: split the calls' timesteps into this many ranges and choose widths per range
        (the quantized program dispatches on the timestep at run time).
    recipe: the base recipe: which layers are quantizable (its ``remain_fp_regex``), the
        balancing and weight group (default ``w4a8``: ViDiT-Q smoothing + rotation).
    candidates: ``(weight_bits, act_bits)`` to choose from (default ``default_candidates``).
    metrics: one metric (name or callable) for every role, or role -> metric; default: output
        error for self-attention / MLP, guidance-direction error for cross-attention, frame
        difference error for temporal attention (``viditq_compile.mixed_precision.metrics``).
    roles: regex -> role overrides of the roles found from the graph.
    group: allocation unit: ``"layer"``, ``"module"`` (the layers of one parent module together,
        faster) or a callable layer name -> unit name.
    role_weights: multiplies the damage of each role (default 1).
    Returns a ``Plan`` with ``plan.search`` (the record behind ``plan.report`` and the heat map:
    predicted damage per unit and the output SQNR per timestep range that the program built from the
    plan actually has, ``measured_sqnr_db``) and ``plan.calibration`` (the statistics its
    smoothing needs).
    """
    t0 = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(budget, Budget):
        raise TypeError(f"budget must be a viditq_compile.Budget, got {type(budget).__name__}")
    base = Recipe.resolve(recipe)
    base.check_supported()
    if not base.enabled:
        raise ValueError(f"recipe {base.name!r} quantizes nothing; the search needs a quantizing base recipe")
    cands: list[Any] = [tuple(c) for c in (candidates if candidates is not None else default_candidates(budget))]
    for c in cands:
        if (len(c) != 2 or c[0] not in WEIGHT_SYM or c[1] not in ACT_BITS):
            raise ValueError(f"candidate {c!r} is not a supported (weight_bits, act_bits) pair: weights "
                             f"{sorted(WEIGHT_SYM)}, activations {sorted(ACT_BITS)}")
    if not cands or len(set(cands)) != len(cands):
        raise ValueError(f"candidates must be distinct (weight_bits, act_bits) pairs, got {cands!r}")
    weights_of_role = dict(role_weights or {})
    for role, w in weights_of_role.items():
        if role not in M.ROLE_METRIC or not isinstance(w, (int, float)) or not w >= 0:
            raise ValueError(f"role_weights[{role!r}] = {w!r}: roles are {sorted(M.ROLE_METRIC)}, "
                             f"weights numbers >= 0")

    was_training = model.training
    model.eval()
    try:
        calls = _calls(model, calibration)
        sig = _signature(model)
        found = [timestep_argument(sig, a, k) for a, k in calls]
        ts_name = next((n for n, _ in found if n is not None), None)
        bounds = timestep_bounds([v for _, v in found], timestep_ranges)
        plan_probe = Plan(recipe="", timestep_bounds=bounds)
        call_ranges = [plan_probe.range_of(v) for _, v in found]

        stats = calibrate(model, calls, progress=False)
        args0, kwargs0 = calls[0]
        # captured once: the graph the roles are read from becomes the program measured at the end
        program = capture(model, args0, kwargs0)
        tensors = ExportedTensors(program)
        convs_as_linears(tensors)  # as quantize_graph does: 1x1 convolutions are layers too
        sites = tensors.linear_sites()
        base_plan = select_linears(sites, base, stats, graph=tensors.gm)
        layers = [lp.name for lp in base_plan.layers.values() if lp.quantized]
        if not layers:
            raise ValueError(f"recipe {base.name!r} leaves no layer of {type(model).__name__} to quantize")
        _refuse_untakeable(base_plan, layers, cands)
        decided = layer_roles_with_reasons(tensors.gm, sites, overrides=roles)
        transforms = layer_transforms(sites, base_plan, stats)
        units = group_units(layers, group)
        unit_role = {u: decided[members[0]].role for u, members in units.items()}

        notes: list[str] = []
        by_name = [n for n in layers if decided[n].source == "name"]
        if by_name:  # the graph could not tell; say so, the metric follows from the role
            notes.append(f"role of {len(by_name)} layer(s) decided by name, not by the graph: "
                         + ", ".join(f"{n} ({decided[n].role})" for n in by_name[:6])
                         + (", ..." if len(by_name) > 6 else ""))
        refs, elems = _layer_elems(model, calls, layers)
        alloc_units = _units(units, base_plan, elems)
        # fail before the analysis, not after it, when no allocation can meet the budget
        allocate(alloc_units, cands, {u: np.zeros((len(bounds) + 1, len(cands))) for u in units}, budget)
        batches = _batches(model, calls, refs, notes)
        role_metric = _metrics(metrics, refs, notes)
        sens = measure_sensitivity(model, calls, call_ranges, base_plan, transforms, units, unit_role,
                                   role_metric, cands, bounds, progress=progress, reference=refs,
                                   batches=batches, stats=stats)
        sens.notes.extend(notes)
        damage = {u: d * float(weights_of_role.get(unit_role[u], 1.0)) for u, d in sens.damage.items()}
        alloc = allocate(alloc_units, cands, damage, budget)
        plan = _plan(base_plan, units, alloc, cands, bounds, ts_name, stats)
        attentions: dict = {}
        if base.attention is not None and base.attention.quantizes:
            plan.attention, attentions = search_attentions(
                model, tensors.gm, sites, base.attention, calls, call_ranges, len(bounds) + 1, role_metric,
                reference=refs, batches=batches)
            plan.validate()
        measured, qm = _measure(program, calls, call_ranges, refs, plan, base, stats, len(bounds) + 1)
    finally:
        model.train(was_training)
    plan.search = _record(sens, alloc, budget, base, group, measured, time.perf_counter() - t0)
    if attentions:
        plan.search["attention"] = attentions
    for n in sens.notes:
        log.warning("search: %s", n)
    log.info("search: %d units x %d widths x %d range(s) in %.1f s; %s", len(units), len(cands),
             len(bounds) + 1, time.perf_counter() - t0, _achieved(alloc))
    qm.plan.search = plan.search
    return plan, qm


@functools.wraps(search_program, assigned=("__doc__",))
def search(model: nn.Module, calibration: Any, budget: Budget, **options) -> Plan:
    return search_program(model, calibration, budget, **options)[0]


def search_attentions(model: nn.Module, gm, sites, rule, calls, call_ranges, n_ranges: int,
                      role_metric: Mapping[str, M.MetricFn], *, reference=None, batches=None) -> tuple[dict, dict]:
    """The attention half of the search: each attention the recipe's ``rule`` makes int8 is scored
    alone at int8, by the metric of its role, like a layer at a width
    (``sensitivity.measure_attention_sensitivity``). With ``rule.search_min_db`` set, one whose worst
    timestep range scores below it stays in floating point.

    Returns ``(plan.attention, record)``: the rule with ``kept`` (attention -> reason: the refusals
    of ``choose_attentions`` and the search's keeps, which the program built from the plan honours),
    and per int8 candidate ``{"kind", "metric", "damage": [per range], "db": worst dB, "format"}``
    for the search record and ``plan.report``.
    """
    choices = choose_attentions(gm, sites, rule)
    kept = {c.name: c.reason for c in choices if not c.quantized and rule.format_of(c.kind) != "fp"}
    wanted = {c.name: c.kind for c in choices if c.quantized}
    damage = measure_attention_sensitivity(model, calls, call_ranges, wanted, role_metric, n_ranges,
                                           block=rule.block, reference=reference, batches=batches) if wanted else {}
    record = {}
    for name, kind in wanted.items():
        worst = min(numerics.nsr_db(float(d)) for d in damage[name])
        metric = M.metric_name(role_metric[kind])
        fmt = "int8"
        if rule.search_min_db is not None and worst < rule.search_min_db:
            fmt = "fp"
            kept[name] = (f"{kind}: the search keeps it in floating point: int8 scores {worst:.1f} dB on the "
                          f"{metric} metric, below attention.search_min_db {rule.search_min_db:g}")
        record[name] = {"kind": kind, "metric": metric, "damage": [float(d) for d in damage[name]],
                        "db": worst, "format": fmt}
    return {**rule.to_dict(), **({"kept": kept} if kept else {})}, record


def _refuse_untakeable(plan: Plan, layers: Sequence[str], cands) -> None:
    """Refuse a search that would offer a layer a width it cannot take (odd K for int4 weights, the
    int32 accumulator bound; ``select.layer_refusal``): the allocation chooses every candidate for
    every unit, so such a layer must be kept out of the search or the candidate dropped."""
    for name in layers:
        for w, a in cands:
            at = replace(plan.layers[name], weight_bits=w, act_bits=a, weight_sym=WEIGHT_SYM[w])
            why = layer_refusal(at)
            if why:
                raise ValueError(f"layer {name!r} cannot take the candidate width W{w}A{a}: {why}; "
                                 f"search without it (candidates=) or keep the layer in floating "
                                 f"point (the recipe's remain_fp_regex)")


def _signature(model):
    import inspect

    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


def _units(units: Mapping[str, Sequence[str]], plan: Plan, elems: Mapping[str, float]) -> list[Unit]:
    out = []
    for u, members in units.items():
        lps = [plan.layers[n] for n in members]
        out.append(Unit(name=u, weight_params=sum(lp.in_features * lp.out_features for lp in lps),
                        act_elems=sum(elems[n] for n in members),
                        weight_bytes={bits: sum(lp.weight_bytes(bits, WEIGHT_SYM[bits]) for lp in lps)
                                      for bits in WEIGHT_SYM}))
    return out


def _plan(base: Plan, units, alloc: Allocation, cands, bounds, ts_name, stats) -> Plan:
    layers = dict(base.layers)
    for u, members in units.items():
        versions = tuple((cands[c][0], cands[c][1], WEIGHT_SYM[cands[c][0]]) for c in alloc.choice[u])
        w, a, sym = versions[0]
        tw = versions if len(set(versions)) > 1 else None
        for name in members:
            layers[name] = replace(base.layers[name], weight_bits=w, act_bits=a, weight_sym=sym,
                                   timestep_widths=tw)
    timestep_aware = any(lp.timestep_widths is not None for lp in layers.values())
    if timestep_aware and ts_name is None:
        raise ValueError("the search chose different widths per timestep range, but the model's "
                         "timestep argument was not found")
    plan = Plan(recipe=f"search({base.recipe})", layers=layers,
                timestep_bounds=tuple(bounds) if timestep_aware else (),
                timestep_input=ts_name if timestep_aware else None, calibration=stats)
    plan.validate()
    return plan


def _measure(program: torch.export.ExportedProgram, calls, call_ranges, refs, plan: Plan, base: Recipe,
             stats, n_ranges) -> tuple[list[float], QuantizedModel]:
    """Output SQNR (dB) per timestep range of the whole plan, measured (not predicted) on the program
    built from it (``pipeline.quantize_graph``, as ``vq.quantize`` builds it), and that program."""
    done = quantize_graph(ExportedTensors(program), base, plan, stats)
    qm = QuantizedModel(program, done.plan)
    outs = run_calls(qm, calls)
    sqnr = []
    for r in range(n_ranges):
        idx = [i for i, cr in enumerate(call_ranges) if cr == r]
        sqnr.append(numerics.sqnr_db(torch.cat([refs[i].flatten() for i in idx]),
                                     torch.cat([outs[i].flatten() for i in idx])))
    return sqnr, qm


def _achieved(alloc: Allocation) -> str:
    return (f"average W {alloc.weight_bits:.3f} bits, A {alloc.act_bits:.3f} bits, "
            f"{alloc.weight_bytes / 2**20:.2f} MiB of weights")


def _record(sens: Sensitivity, alloc: Allocation, budget: Budget, base: Recipe, group, measured,
            seconds: float) -> dict:
    return {
        "base_recipe": base.name,
        "group": group if isinstance(group, str) else getattr(group, "__name__", "callable"),
        "budget": {k: getattr(budget, k) for k in ("weight_bits", "act_bits", "weight_bytes")},
        "achieved": {"weight_bits": alloc.weight_bits, "act_bits": alloc.act_bits,
                     "weight_bytes": alloc.weight_bytes},
        "candidates": [list(c) for c in sens.candidates],
        "bounds": list(sens.bounds),
        "calls_per_range": list(sens.calls_per_range),
        "units": {u: list(m) for u, m in sens.units.items()},
        "roles": dict(sens.roles),
        "metrics": dict(sens.metrics),
        "damage": {u: d.tolist() for u, d in sens.damage.items()},
        "choice": {u: list(c) for u, c in alloc.choice.items()},
        "predicted_damage": alloc.damage,
        "measured_sqnr_db": measured,
        "seconds": seconds,
        "notes": list(sens.notes),
    }
