"""The select pass: which linear layers are quantized, and how wide.

Reads a graph's linear sites and a recipe, writes a ``Plan``. It rewrites nothing.
"""

from __future__ import annotations

import logging

from ..plan import LayerPlan, Plan, PlanError
from ..recipe import Recipe
from .sites import LinearSite

log = logging.getLogger(__name__)


def select_linears(sites: list[LinearSite], recipe: Recipe) -> Plan:
    """One ``LayerPlan`` per distinct layer name, in graph order.

    A layer stays floating point, with the reason recorded, when the recipe is ``fp``, when the
    graph gives it no real weight (computed weights), or when its name matches the recipe's
    ``remain_fp_regex`` (by default the DiT embedders, adaLN, patch embedding and final
    projection). Every other layer gets the recipe's default widths.
    """
    recipe.check_supported()
    plan = Plan(recipe=recipe.name)
    for s in sites:
        if s.name in plan.layers:
            continue
        fp_reason = None
        if not recipe.enabled:
            fp_reason = f"recipe {recipe.name!r} keeps every layer in floating point"
        elif s.fp_reason:
            fp_reason = s.fp_reason
            # the recipe asked for this layer to be quantized; say so beyond the report
            log.warning("layer %s stays in floating point: %s", s.name, s.fp_reason)
        elif recipe.keeps_fp(s.name):
            fp_reason = "kept by remain_fp_regex"
        if fp_reason:
            plan.layers[s.name] = LayerPlan(s.name, s.in_features, s.out_features, reason=fp_reason)
        else:
            plan.layers[s.name] = LayerPlan(
                s.name, s.in_features, s.out_features, weight_bits=recipe.weight.bits,
                act_bits=recipe.act.bits, weight_sym=recipe.weight.sym, act_sym=recipe.act.sym)
    return plan


def match_plan(sites: list[LinearSite], plan: Plan) -> Plan:
    """Check a given plan against a graph; layers the plan omits stay floating point.

    Raises ``PlanError`` for a plan layer the graph lacks, or one whose shape differs.
    """
    by_name = {s.name: s for s in sites}
    for name, lp in plan.layers.items():
        s = by_name.get(name)
        if s is None:
            raise PlanError(f"plan names layer {name!r}, which the model does not have "
                            f"(it has {len(by_name)} linear layers)")
        if (s.in_features, s.out_features) != (lp.in_features, lp.out_features):
            raise PlanError(f"plan layer {name!r} is {lp.out_features}x{lp.in_features} but the "
                            f"model's is {s.out_features}x{s.in_features}")
        lp.validate()
        if lp.quantized and s.fp_reason:
            raise PlanError(f"plan quantizes {name!r} but it cannot be: {s.fp_reason}")
    out = Plan(recipe=plan.recipe)
    for s in sites:
        if s.name not in out.layers:
            out.layers[s.name] = plan.layers.get(s.name) or LayerPlan(
                s.name, s.in_features, s.out_features, reason="not in the plan")
    return out
