"""The select pass: which linear layers are quantized, and how wide.

Reads a graph's linear sites and a recipe, writes a ``Plan``. It rewrites nothing.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from viditq_compile.config.capabilities import WEIGHT_BITS, weight_width_refusal
from viditq_compile.config.plan import LayerPlan, Plan, PlanError
from viditq_compile.config.recipe import Recipe, RecipeError
from viditq_compile.graph.roles import keep_fp_by_graph
from viditq_compile.graph.sites import LinearSite
from viditq_compile.methods import balance
from viditq_compile.numerics import quant as numerics
from viditq_compile.numerics.hadamard import hadamard_order_split

log = logging.getLogger(__name__)


def select_linears(sites: list[LinearSite], recipe: Recipe, stats=None, *, graph=None) -> Plan:
    """One ``LayerPlan`` per distinct layer name, in graph order.

    A layer stays floating point, with the reason recorded, when the recipe is ``fp``, when the
    graph gives it no real weight (computed weights), when ``graph`` (the ``fx.GraphModule`` the
    sites are in) shows it is a conditioning, embedding or final-projection layer
    (``graph.roles.keep_fp_by_graph``, unless the recipe's ``keep_fp_from_graph`` is off), or when
    its name matches the recipe's ``remain_fp_regex``. The default regex (the families' names of
    embedders, adaLN, patch embedding and final projection) is a hint: it decides only the layers
    the graph cannot place (or all layers when no ``graph`` is given). Every other layer gets
    the recipe's default widths, group and balancing, unless
    its weights cannot be stored at that width (``capabilities.weight_width_refusal``: odd K for
    int4) or the integer GEMM over its K (or weight group) could overflow the int32 accumulator
    (``numerics.max_k_for_int32``, ``accumulator_overflow``): such a layer falls to the next wider
    weight width that works, the plan's ``note`` saying why (``K=7 is odd: int4 packs two values
    per byte; W8 instead``), and when no integer width works it stays floating point with the
    refusals in its reason. Either way a warning is logged.

    A recipe with ``balance="search"`` (``recipe.balance_search``) gets no balancing here: the
    pipeline then chooses it per producer (``mixed_precision.balance_search.choose_balance``).
    A recipe with ``fold_balance`` gets its out projections' balancing folded into their value
    projections (``passes.fold_balance``), after the balancing is chosen.

    ``stats`` (``CalibrationStats`` or ``None``) decides what data-dependent parts can be built:
    without statistics for a layer, smoothing is dropped (``smooth+rotate`` becomes ``rotate``)
    and the plan's ``note`` says so; a width with no Hadamard construction is not rotated; a
    static per-tensor activation scale (the naive baseline) needs statistics and otherwise falls
    back to dynamic per-token scales. Each such change is logged and shown in the report.
    """
    recipe.check_supported()
    if recipe.static_act and stats is None:
        raise RecipeError(f"recipe {recipe.name!r} uses static per-tensor activation scales, "
                          f"which come from calibration: pass calibration=")
    placed = keep_fp_by_graph(graph, sites) if graph is not None and recipe.enabled \
        and recipe.keep_fp_from_graph else {}
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
        elif placed.get(s.name):
            fp_reason = f"kept by the graph: {placed[s.name]}"
        elif recipe.keeps_fp(s.name) and not (recipe.names_are_hints and s.name in placed):
            fp_reason = ("kept by name: a family keep-FP name (the graph cannot place it)"
                         if recipe.names_are_hints and graph is not None else "kept by remain_fp_regex")
        elif recipe.layer_bits(s.name) is None:
            fp_reason = "kept by mixed_precision (its FP entry)"
        if fp_reason:
            plan.layers[s.name] = LayerPlan(s.name, s.in_features, s.out_features, reason=fp_reason)
            continue
        plan.layers[s.name] = _widest_that_works(_quantized_layer(s, recipe, stats))
    if recipe.fold_balance:
        from viditq_compile.passes.fold_balance import fold_balance

        plan = fold_balance(sites, plan)[0]
    return plan


def _widest_that_works(lp: LayerPlan) -> LayerPlan:
    """``lp`` at its weight width, or at the next wider one its shape and the int32 accumulator
    allow (with a note saying why), or floating point with every refusal in its reason."""
    assert lp.weight_bits is not None and lp.timestep_widths is None
    refusals: list[str] = []
    for bits in [lp.weight_bits] + sorted(b for b in WEIGHT_BITS if b > lp.weight_bits):
        at = replace(lp, weight_bits=bits)
        why = layer_refusal(at)
        if why is None:
            if refusals:
                fell = "; ".join(refusals) + f"; W{bits} instead"
                log.warning("layer %s: %s", lp.name, fell)
                at = replace(at, note="; ".join(filter(None, (lp.note, fell))))
            return at
        refusals.append(why)
    # the recipe asked for this layer; quantized, it would fail or its GEMM would wrap silently
    reason = "; ".join(refusals)
    log.warning("layer %s stays in floating point: %s", lp.name, reason)
    return LayerPlan(lp.name, lp.in_features, lp.out_features, reason=reason)


def weight_refusal(lp: LayerPlan) -> str | None:
    """Why ``lp``'s weights cannot be stored at one of its weight widths (every timestep range is
    checked; ``capabilities.weight_width_refusal``), or None when they can (or it stays FP)."""
    if not lp.quantized:
        return None
    for bits in dict.fromkeys(v[0] for v in lp.versions()):
        why = weight_width_refusal(lp.in_features, lp.out_features, bits, lp.weight_group)
        if why:
            return why
    return None


def layer_refusal(lp: LayerPlan) -> str | None:
    """Why ``lp`` cannot be quantized as planned (``weight_refusal``, then
    ``accumulator_overflow``), or None when it can."""
    return weight_refusal(lp) or accumulator_overflow(lp)


def accumulator_overflow(lp: LayerPlan) -> str | None:
    """Why ``lp``'s integer GEMM could overflow int32 at one of its widths (every timestep range is
    checked), or None when it cannot (or the layer stays floating point). The K summed is the
    weight group for grouped weights, else ``in_features``."""
    if not lp.quantized or lp.fp8:  # e4m3 GEMMs accumulate in fp32
        return None
    k = lp.weight_group or lp.in_features
    for weight_bits, act_bits, sym in lp.versions():
        bound = numerics.max_k_for_int32(act_bits, weight_bits, sym, lp.act_static)
        if k > bound:
            what = "group" if lp.weight_group else "K"
            kind = ("" if sym else ", asymmetric weights") + (", static activation scales" if lp.act_static else "")
            return (f"{what}={k} exceeds the int32 accumulator bound {bound} for W{weight_bits}A{act_bits}"
                    f"{kind} (the integer GEMM would wrap)")
    return None


def _quantized_layer(s: LinearSite, recipe: Recipe, stats) -> LayerPlan:
    notes = []
    has_stats = stats is not None and s.name in stats
    group = recipe.weight_group
    if group is not None and s.in_features % group:
        notes.append(f"K={s.in_features} is not a multiple of group {group}: per output channel")
        group = None
    static = recipe.static_act
    if static and not has_stats:
        notes.append("no calibration statistics: dynamic per-token activations instead of a "
                     "static per-tensor scale")
        static = False
    method = alpha = seed = None
    rule = recipe.balance_for(s.name)
    if rule is not None and not (rule.optional and stats is None):
        method, why = buildable_balance(s, rule.method, has_stats)
        notes += why
        if method:
            alpha = rule.alpha if balance.smooths(method) else None
            seed = recipe.seed if balance.rotates(method) else None
    for n in notes:
        log.warning("layer %s: %s", s.name, n)
    weight_bits, act_bits = recipe.layer_bits(s.name)  # type: ignore[misc]  # not FP: checked by the caller
    return LayerPlan(s.name, s.in_features, s.out_features, weight_bits=weight_bits,
                     act_bits=act_bits, weight_sym=recipe.weight.sym,
                     act_sym=recipe.act.sym, weight_group=group, act_static=static,
                     balance=method, alpha=alpha, rotation_seed=seed,
                     note="; ".join(notes) or None, number_format=recipe.number_format)


def buildable_balance(s: LinearSite, method: str | None, has_stats: bool) -> tuple[str | None, list[str]]:
    """The part of balancing ``method`` that ``s`` can be built with, and notes on what was
    dropped: smoothing needs calibration statistics (``has_stats``), rotation a Hadamard
    construction of the layer's width (``numerics.hadamard.hadamard_order_split``)."""
    notes = []
    if balance.smooths(method) and not has_stats:
        method = balance.kind_of(False, balance.rotates(method))
        notes.append("no calibration statistics: smoothing skipped" + (", rotation only" if method else ""))
    if balance.rotates(method):
        try:
            hadamard_order_split(s.in_features)
        except ValueError:
            method = balance.kind_of(balance.smooths(method), False)
            notes.append(f"no Hadamard construction for width {s.in_features}: not rotated")
    return method, notes


def match_plan(sites: list[LinearSite], plan: Plan, stats=None) -> Plan:
    """Check a given plan against a graph; layers the plan omits stay floating point.

    Raises ``PlanError`` for a plan layer the graph lacks, one whose shape differs, one that
    needs calibration statistics (smoothing, static activation scales) that ``stats`` lacks, or
    one it quantizes at a weight width its shape cannot take (odd K for int4: ``Plan.validate``
    applies ``capabilities.weight_width_refusal``) or at widths whose integer GEMM could overflow
    int32 (``accumulator_overflow``). A plan is
    explicit, so such a layer is refused by name rather than moved to another width or to floating
    point as ``select_linears`` does.
    """
    by_name = {s.name: s for s in sites}
    plan.validate()
    if stats is None:
        stats = plan.calibration
    for name, lp in plan.layers.items():
        s = by_name.get(name)
        if s is None:
            raise PlanError(f"plan names layer {name!r}, which the model does not have "
                            f"(it has {len(by_name)} linear layers)")
        if (s.in_features, s.out_features) != (lp.in_features, lp.out_features):
            raise PlanError(f"plan layer {name!r} is {lp.out_features}x{lp.in_features} but the "
                            f"model's is {s.out_features}x{s.in_features}")
        if lp.quantized and s.fp_reason:
            raise PlanError(f"plan quantizes {name!r} but it cannot be: {s.fp_reason}")
        overflow = accumulator_overflow(lp)
        if overflow:
            raise PlanError(f"plan quantizes {name!r} but it cannot be: {overflow}; keep it in "
                            f"floating point (weight_bits null), or use narrower widths or a weight group")
    missing = [n for n in plan.needs_calibration if stats is None or n not in stats]
    if missing:
        raise PlanError(f"the plan smooths or statically scales {len(missing)} layer(s) "
                        f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}), which "
                        f"needs calibration statistics for them: pass calibration=")
    out = Plan(recipe=plan.recipe, timestep_bounds=plan.timestep_bounds,
               timestep_input=plan.timestep_input, search=plan.search,
               calibration=plan.calibration)
    for s in sites:
        if s.name not in out.layers:
            out.layers[s.name] = plan.layers.get(s.name) or LayerPlan(
                s.name, s.in_features, s.out_features, reason="not in the plan")
    out.tensor_parallel = plan.tensor_parallel  # set once the layers it names are in
    out.attention = plan.attention
    return out
