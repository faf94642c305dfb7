"""``quantize``: model + example inputs + recipe -> ``QuantizedModel`` (an exported program)."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from viditq_compile.config.plan import Plan
from viditq_compile.config.recipe import Recipe
from viditq_compile.graph.capture import capture
from viditq_compile.graph.sites import ExportedTensors
from viditq_compile.pipeline import quantize_graph
from viditq_compile.program import QuantizedModel

log = logging.getLogger(__name__)


def quantize(model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None, *,
             recipe: str | os.PathLike | Recipe | dict = "w8a8", plan: Plan | None = None,
             calibration: Any = None, dynamic: Any = True) -> QuantizedModel:
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
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if plan is not None and not isinstance(plan, Plan):
        raise TypeError(f"plan must be a viditq_compile.Plan, got {type(plan).__name__}")
    r = Recipe.resolve(recipe)
    r.check_supported()
    if plan is None and r.budget is not None:
        plan, searched = _search_plan(model, r, calibration)
        if dynamic is True and _runs(searched, args, kwargs or {}):
            return searched  # the program the search measured: the model is not captured again
        calibration = None  # the searched plan carries the statistics it was made with
    from viditq_compile.calibration.observe import resolve_calibration

    if calibration is not None:
        stats = resolve_calibration(model, calibration, recipe=r)
    elif plan is not None and plan.calibration is not None:
        stats = plan.calibration  # a searched plan carries the statistics it was made with
    else:  # the recipe's calib_data.save_path, when it names an existing file
        stats = resolve_calibration(model, None, recipe=r)
    was_training = model.training
    model.eval()
    try:
        ep = capture(model, args, kwargs, dynamic=dynamic)
    finally:
        model.train(was_training)
    done = quantize_graph(ExportedTensors(ep), r, plan, stats)
    qm = QuantizedModel(ep, done.plan)
    log.info("quantized %d linear calls; %s", done.count, qm.report.summary())
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
