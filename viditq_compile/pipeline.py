"""The one sequence that turns a captured graph and a recipe (or a plan) into a quantized graph.

``quantize_graph``: the convolutions that are linears become linears (``passes.conv_as_linear``),
then select (recipe -> plan) or match (given plan -> checked against the graph), then every
method's pass in ``methods.registry`` order (balance, then the integer method's quantize pass);
before those, the recipe's attention rule (``passes.quantize_attention``: SDPA -> ``viditq.attention``).
``vq.quantize`` runs it on a ``torch.export`` program, the ``viditq`` backend on each Dynamo
graph, and ``vq.search`` on the program whose accuracy it records, so a plan means the same thing
on every route.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from viditq_compile.config.plan import Plan, PlanError
from viditq_compile.config.recipe import Recipe
from viditq_compile.graph.sites import DynamoTensors, GraphTensors
from viditq_compile.methods import registry
from viditq_compile.mixed_precision.balance_search import choose_balance
from viditq_compile.passes.conv_as_linear import convs_as_linears
from viditq_compile.passes.fold_balance import fold_balance
from viditq_compile.passes.fuse_qkv import Fusion, fuse_shared_inputs
from viditq_compile.passes.quantize_attention import choose_attentions, quantize_attention
from viditq_compile.passes.select import match_plan, select_linears

log = logging.getLogger(__name__)


@dataclass
class Quantized:
    """What ``quantize_graph`` did: the plan it applied (with the statistics it needs), the number
    of linear calls each method rewrote, the ids of the model's float weights it quantized (a
    rewritten convolution's ``[O, I, 1, ...]`` parameter, not the view its linear reads), and the
    number of convolutions rewritten as linears."""

    plan: Plan
    rewrites: dict[str, int]
    weights: set[int]
    convs_as_linears: int = 0
    fusion: Fusion | None = None
    """What ``passes.fuse_qkv`` fused (None: the pass did not run on this graph)."""
    balance_choices: dict | None = None
    """For a ``balance="search"`` recipe: layer -> ``mixed_precision.balance_search.LayerChoice``
    (the balancing chosen and the output error it scored); ``None`` otherwise."""
    attention: list = field(default_factory=list)
    """``passes.quantize_attention.AttentionChoice`` per attention of the graph (what it became
    and why; ``rewrites["attention"]`` counts the quantized ones)."""

    @property
    def count(self) -> int:
        """Linear calls lowered to integer ops."""
        return self.rewrites.get("int_weight", 0)


def quantize_graph(tensors: GraphTensors, recipe: Recipe | None, plan: Plan | None = None, stats=None,
                   cache=None, fuse: bool | None = None, tensor_parallel=None,
                   balance_inputs=None) -> Quantized:
    """Quantize the graph of ``tensors`` in place (see the module docstring).

    ``plan``: apply it (``match_plan``: every layer it names must be in the graph, with its shape)
    instead of selecting by ``recipe`` (which may then be ``None``). ``stats``:
    ``CalibrationStats``; statistics that disagree
    with a layer's width are refused, layers they lack are logged (the plan notes what each lost).
    ``cache``: quantized weights shared across graphs (see ``passes.quantize.quantize_linears``).
    ``balance_inputs``: layer -> [rows, K] calibration input rows
    (``mixed_precision.balance_search.record_inputs``), which a ``balance="search"`` recipe needs: the
    select step then chooses each producer's balancing by its layers' output error on them
    (``choose_balance``; refused with a ``RecipeError`` without them).
    ``tensor_parallel``: a ``parallel.tp_plan.TensorParallel``, applied to the plan before any
    method's pass (block-diagonal rotations for row-parallel layers, the splits checked).
    ``fuse``: give the quantized linears that read one activation (q / k / v) one GEMM
    (``passes.fuse_qkv``, bit-exact). ``None``: on for a graph compiled in this process (a Dynamo
    graph, ``DynamoTensors``), off for an exported program, which keeps one op per layer because
    artifacts, their consistency checks, the report and the search name each op by its layer.
    """
    if plan is not None and not isinstance(plan, Plan):
        raise TypeError(f"plan must be a viditq_compile.Plan, got {type(plan).__name__}")
    if not isinstance(recipe, Recipe) and not (recipe is None and plan is not None):
        raise TypeError(f"recipe must be a viditq_compile.Recipe (or None with a plan), got "
                        f"{type(recipe).__name__}")
    if fuse is not None and not isinstance(fuse, bool):
        raise TypeError(f"fuse must be a bool or None, got {type(fuse).__name__}")
    convs = convs_as_linears(tensors)
    choices = None
    sites = tensors.linear_sites()
    if stats is not None:
        _check_stats(stats, sites)
    if plan is not None:
        p = match_plan(sites, plan, stats)
    else:
        assert recipe is not None  # checked above
        p = select_linears(sites, recipe, stats, graph=tensors.gm)
        if recipe.balance_search is not None:
            p, choices = choose_balance(tensors, sites, p, recipe, stats, balance_inputs)
            if recipe.fold_balance:
                p = fold_balance(sites, p)[0]
    if tensor_parallel is not None:
        folded = [n for n, lp in p.layers.items() if lp.balance_folded_into]
        if folded:
            raise PlanError(f"the plan folds the balancing of {len(folded)} layer(s) ({', '.join(folded[:3])}) "
                            f"into their value projections, which tensor parallelism does not build: "
                            f"use a recipe without fold_balance")
        p = tensor_parallel.apply(p)
    if p.needs_calibration and p.calibration is None:
        p.calibration = stats  # so that the plan re-applies (and saves) with what it needs
    weights = {id(s.param) for s in sites if p.layers[s.name].quantized and s.param is not None}
    # the recipe's attention rule (no plan field carries it): before the linears are rewritten,
    # since the roles that tell self / temporal / cross attention read the float linears
    # a plan that records its attention rule rebuilds what it was made with; otherwise the recipe's
    rule = p.attention_rule() if p.attention is not None else recipe.attention if recipe is not None else None
    keep = dict((p.attention or {}).get("kept", {})) if p.attention is not None else None
    attention = choose_attentions(tensors.gm, sites, rule, keep=keep) if rule is not None else []
    if rule is not None and rule.quantizes:
        kept = {c.name: c.reason for c in attention if not c.quantized and rule.format_of(c.kind) != "fp"}
        p.attention = {**rule.to_dict(), **({"kept": kept} if kept else {})}
    attention_rewrites = quantize_attention(tensors.gm, attention)
    rewrites = {m.name: m.rewrite(tensors, sites, p, stats=stats, cache=cache) for m in registry.METHODS}
    rewrites["attention"] = attention_rewrites
    if fuse is None:
        fuse = isinstance(tensors, DynamoTensors)
    fusion = fuse_shared_inputs(tensors, cache) if fuse else None
    return Quantized(p, rewrites, weights, convs, fusion, balance_choices=choices, attention=attention)


def _check_stats(stats, sites) -> None:
    """Statistics whose widths disagree with the model are refused; layers they lack are only
    logged here (the plan's notes say what each such layer lost)."""
    missing = stats.check_model({s.name: s.in_features for s in sites if s.weight is not None})
    if missing:
        log.warning("calibration statistics lack %d linear layer(s): %s", len(missing),
                    ", ".join(missing[:8]) + (", ..." if len(missing) > 8 else ""))
