"""The per-layer balancing search (``balance="search"``): for each producer, the balancing
(none / smooth / rotate / smooth+rotate) and the smoothing exponent alpha that minimise the
layers' output error on the calibration inputs.

    calibration calls ─ record_calibration ─> statistics (smoothing) + input rows per layer
    select (the recipe's widths, no balancing) ─> plan
    per producer (the linears that share one balanced input: ``methods.balance.balance_groups``)
        per candidate (kind, alpha) of ``BalanceSearch.candidates``:
            W', m·d, R  = methods.balance.layer_transforms    (what the balance pass folds)
            y_q         = methods.int_weight.EagerLinear      (what the quantize pass emits)
            score       = mean over the producer's layers of |y_q - y|^2 / |y|^2
    ─> the plan with each producer's best candidate, the note of every layer saying what was
       chosen and the output SQNR it scored

A candidate is scored with the same eager reference ``tests/methods/test_parity.py`` holds to the
program built from the same plan, on input rows recorded from the floating-point model, so the
error the search reports for a layer is what the program's layer computes on those rows (each row
is quantized on its own: per-token activations and per-channel weights).

Assumes: ``plan`` comes from ``passes.select.select_linears`` with the recipe (quantized layers, no
balancing yet). Rewrites no graph; returns a plan and the record of what was scored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from viditq_compile.config.plan import LayerPlan, Plan
from viditq_compile.config.recipe import SEARCH_MAX_ROWS, Recipe, RecipeError
from viditq_compile.graph import modules
from viditq_compile.graph.sites import GraphTensors, LinearSite
from viditq_compile.methods import balance, int_weight
from viditq_compile.numerics import quant as numerics
from viditq_compile.passes.select import buildable_balance

log = logging.getLogger(__name__)

__all__ = ["Candidate", "LayerChoice", "record_inputs", "record_calibration", "choose_balance",
           "search_balance", "label"]

Call = tuple[tuple, dict]


@dataclass(frozen=True)
class Candidate:
    """One balancing tried for a producer: ``kind`` (``None``: no balancing), ``alpha`` (kinds that
    smooth), ``seed`` (kinds that rotate), the producer's score (mean noise-to-signal of its layers'
    outputs) and each layer's."""

    kind: str | None
    alpha: float | None
    seed: int | None
    score: float
    layer_nsr: Mapping[str, float]

    @property
    def sqnr_db(self) -> float:
        return numerics.nsr_db(self.score)


@dataclass(frozen=True)
class LayerChoice:
    """What the search chose for one layer: its producer's best ``Candidate`` (``balance``,
    ``alpha``), the layer's own output SQNR there (``sqnr_db``, dB, on ``rows`` input rows), the
    producer (its first layer's name) and every candidate the producer was scored at."""

    layer: str
    producer: str
    balance: str | None
    alpha: float | None
    rotation_seed: int | None
    sqnr_db: float
    rows: int
    candidates: tuple[Candidate, ...]

    def to_dict(self) -> dict:
        return {"layer": self.layer, "producer": self.producer, "balance": self.balance, "alpha": self.alpha,
                "rotation_seed": self.rotation_seed, "sqnr_db": self.sqnr_db, "rows": self.rows,
                "candidates": [{"balance": c.kind, "alpha": c.alpha, "rotation_seed": c.seed,
                                "sqnr_db": c.sqnr_db}
                               for c in self.candidates]}


def label(kind: str | None, alpha: float | None, seed: int | None = None) -> str:
    """``"none"``, ``"rotate"``, ``"smooth+rotate a=0.6"``, ``"rotate seed=3"``: a candidate as the
    report writes it (the seed when one is given)."""
    return (kind or "none") + (f" a={alpha:g}" if alpha is not None else "") + \
        (f" seed={seed}" if seed is not None else "")


# ----------------------------------------------------------------------------------------------
# calibration inputs


def _check_max_rows(max_rows: Any) -> int:
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows must be an int >= 1, got {max_rows!r}")
    return max_rows


def _subsample(rows: Tensor, n: int, seed: int) -> Tensor:
    """``n`` of ``rows``, drawn without replacement (seeded), kept in their order."""
    if rows.shape[0] <= n:
        return rows
    idx = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return rows[idx]


def record_inputs(model: nn.Module, calls: Sequence[Call], layers: Sequence[str] | None = None,
                  max_rows: int = SEARCH_MAX_ROWS) -> dict[str, Tensor]:
    """The input rows of each linear layer of ``model`` (``graph.modules.linear_layers``; only
    ``layers`` when given) over the calibration ``calls``: layer -> [rows, K] in the layer's input
    dtype, at most ``max_rows`` per layer, drawn evenly from every call (seeded, so two runs record
    the same rows). A 1x1 convolution's input is recorded channels-last, as its linear reads it.
    Runs under ``torch.no_grad()`` in eval mode; every hook is removed and the training flags
    restored, also when a call raises. A layer that never ran has no entry."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    max_rows = _check_max_rows(max_rows)
    calls = list(calls)
    if not calls:
        raise ValueError("record_inputs needs at least one calibration call")
    found = modules.linear_layers(model)
    if layers is not None:
        missing = [n for n in layers if n not in found]
        if missing:
            raise ValueError(f"layer(s) {missing[:4]} are not linear layers of {type(model).__name__}")
        found = {n: found[n] for n in layers}
    per_call = max(1, -(-max_rows // len(calls)))
    rows: dict[str, list[Tensor]] = {n: [] for n in found}
    seen = {n: 0 for n in found}

    def hook(name: str):
        def pre(module, args):
            x = modules.to_tokens(module, args[0]).detach()
            x = x.reshape(-1, x.shape[-1])
            rows[name].append(_subsample(x, per_call, seed=seen[name]).clone())
            seen[name] += 1
        return pre

    training = {m: m.training for m in model.modules()}
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in found.items()]
    model.eval()
    try:
        with torch.no_grad():
            for i, call in enumerate(calls):
                if not (isinstance(call, tuple) and len(call) == 2):
                    raise TypeError(f"calibration call {i} must be an (args, kwargs) pair")
                model(*call[0], **call[1])
    finally:
        for h in handles:
            h.remove()
        for m, flag in training.items():
            m.training = flag
    return {n: _subsample(torch.cat(r), max_rows, seed=len(r)) for n, r in rows.items() if r}


def record_calibration(model: nn.Module, calibration: Any, max_rows: int = SEARCH_MAX_ROWS):
    """``(calls, stats, inputs)`` for a search: the calibration calls (an iterable of
    ``(args, kwargs)`` or a sampler callable, recorded once), their ``CalibrationStats`` and the
    layers' input rows (``record_inputs``)."""
    from viditq_compile.calibration.observe import calibrate, calibration_kind, resolve_calibration

    if calibration is None:
        raise RecipeError("balance='search' scores each layer's output on calibration inputs: pass "
                          "calibration= (an iterable of (args, kwargs) model calls or a sampler callable)")
    kind = calibration_kind(calibration)
    if kind in ("statistics", "path"):
        raise RecipeError(f"balance='search' scores each layer's output on calibration inputs, so it needs the "
                          f"calibration calls (an iterable of (args, kwargs) or a sampler callable), not "
                          f"{'statistics' if kind == 'statistics' else 'a statistics file'}")
    calls = resolve_calibration(model, calibration, entry="search")
    stats = calibrate(model, calls, progress=False)
    return calls, stats, record_inputs(model, calls, max_rows=max_rows)


# ----------------------------------------------------------------------------------------------
# the search


def _producers(sites: list[LinearSite], plan: Plan) -> list[list[LinearSite]]:
    """The quantized sites grouped as the balance pass groups a plan that balances every layer
    alike (``balance_groups``): the sites that must share one balancing vector."""
    probe = Plan(recipe=plan.recipe, layers={
        n: replace(lp, balance="rotate", alpha=None, rotation_seed=0) if lp.quantized else lp
        for n, lp in plan.layers.items()})
    return [members for members, _ in balance.balance_groups(sites, probe)]


class _Layer:
    """One layer of a producer: its weight and bias in a holder ``nn.Linear`` (what
    ``EagerLinear`` takes), its input rows and their floating-point output."""

    def __init__(self, site: LinearSite, bias: Tensor | None, x: Tensor):
        w = site.weight.detach()  # type: ignore[union-attr]  # quantized sites have real weights
        if x.dim() != 2 or x.shape[1] != site.in_features:
            raise ValueError(f"layer {site.name!r}: calibration inputs have shape {tuple(x.shape)}, "
                             f"the layer takes K={site.in_features}")
        self.module = nn.Linear(site.in_features, site.out_features, bias=bias is not None, device="meta")
        self.module.weight = nn.Parameter(w, requires_grad=False)
        if bias is not None:
            self.module.bias = nn.Parameter(bias.detach(), requires_grad=False)
        self.x = x
        with torch.no_grad():
            self.y = F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))

    def nsr(self, lp: LayerPlan, transform) -> float:
        """Noise-to-signal of the layer's output quantized as ``lp`` (balanced by ``transform``)."""
        eager = int_weight.EagerLinear(self.module, lp, transform)
        with torch.no_grad():
            return numerics.noise_to_signal(self.y, eager(self.module, (self.x,), None))


def _bias(tensors: GraphTensors, site: LinearSite) -> Tensor | None:
    if site.bias is None:
        return None
    _, b = tensors.weight_of(site.bias)
    if b is None:
        raise ValueError(f"layer {site.name!r}: its bias is computed in the graph, so the balancing search "
                         f"cannot score its output; balance it by a rule instead of balance='search'")
    return b


def choose_balance(tensors: GraphTensors, sites: list[LinearSite], plan: Plan, recipe: Recipe, stats,
                   inputs: Mapping[str, Tensor] | None) -> tuple[Plan, dict[str, LayerChoice]]:
    """The plan with every producer's balancing chosen (module docstring), and per quantized layer
    what was chosen (``LayerChoice``).

    tensors / sites: the graph the plan is for; plan: ``select_linears``'s, for ``recipe`` (whose
    ``balance_search`` gives the candidates, ``seed`` the rotation seed); stats: the
    ``CalibrationStats`` smoothing needs (without them for a layer its producer is not smoothed,
    and the note says so); inputs: layer -> [rows, K] input rows (``record_inputs``). A producer
    whose layers have no recorded rows is left unbalanced, with a note and a warning.
    """
    request = recipe.balance_search
    if request is None:
        raise ValueError(f"recipe {recipe.name!r} does not search the balancing (balance_search is None)")
    if inputs is None:
        raise RecipeError(f"recipe {recipe.name!r} uses balance='search', which scores each layer's output on "
                          f"the calibration inputs: it needs the calibration calls (an iterable of (args, "
                          f"kwargs) or a sampler), not statistics alone; build the plan with "
                          f"viditq_compile.mixed_precision.balance_search.search_balance(model, calls, recipe) "
                          f"and apply it with plan=")
    t0 = time.perf_counter()
    layers = dict(plan.layers)
    choices: dict[str, LayerChoice] = {}
    for members in _producers(sites, plan):
        names = list(dict.fromkeys(s.name for s in members))
        notes: list[str] = []
        lacking = [n for n in names if n not in inputs]
        if lacking:
            why = "no calibration inputs (the layer did not run on the calibration calls): not balanced"
            log.warning("balance search: %s: %s", ", ".join(lacking), why)
            for n in names:
                layers[n] = replace(layers[n], note=_join(layers[n].note, f"balance search: {why}"))
            continue
        can_smooth = stats is not None and all(n in stats for n in names)
        can_rotate = balance.rotates(buildable_balance(members[0], "rotate", True)[0])
        if not can_smooth:
            notes.append("no calibration statistics: smoothing not searched")
        if not can_rotate:
            notes.append(f"no Hadamard construction for width {members[0].in_features}: rotation not searched")
        cands = request.candidates(can_smooth, can_rotate, recipe.seed)
        if not cands:
            notes.append(f"no candidate of {list(request.kinds)} can be built: not balanced")
            cands = [(None, None, None)]
        first = {s.name: s for s in members}
        scored = _score(tensors, members, {n: _Layer(first[n], _bias(tensors, first[n]), inputs[n]) for n in names},
                        {n: layers[n] for n in names}, cands, stats)
        best = min(scored, key=lambda c: c.score)  # the first of equals: candidates come simplest first
        for n in names:
            lp = _with_balance(layers[n], best.kind, best.alpha, best.seed)
            shown = label(best.kind, best.alpha, best.seed if request.seeds else None)
            text = (f"balance search: {shown} of {len(scored)} candidates, output "
                    f"SQNR {numerics.nsr_db(best.layer_nsr[n]):.2f} dB on {inputs[n].shape[0]} rows")
            none = next((c for c in scored if c.kind is None), None)
            if none is not None and best.kind is not None:
                text += f" (none: {numerics.nsr_db(none.layer_nsr[n]):.2f} dB)"
            layers[n] = replace(lp, note=_join(lp.note, *notes, text))
            choices[n] = LayerChoice(n, names[0], best.kind, best.alpha, best.seed, numerics.nsr_db(best.layer_nsr[n]),
                                     int(inputs[n].shape[0]), tuple(scored))
    out = replace(plan, layers=layers)
    out.validate()
    log.info("balance search: %d producers, %d layers in %.1f s", len({c.producer for c in choices.values()}),
             len(choices), time.perf_counter() - t0)
    return out, choices


def _with_balance(lp: LayerPlan, kind: str | None, alpha: float | None, seed: int | None) -> LayerPlan:
    return replace(lp, balance=kind, alpha=alpha if balance.smooths(kind) else None,
                   rotation_seed=seed if balance.rotates(kind) else None)


def _score(tensors, members: list[LinearSite], held: Mapping[str, _Layer], lps: Mapping[str, LayerPlan],
           cands, stats) -> list[Candidate]:
    out = []
    for kind, alpha, seed in cands:
        trial = {n: _with_balance(lp, kind, alpha, seed) for n, lp in lps.items()}
        transforms = balance.layer_transforms(members, Plan(recipe="balance search", layers=trial), stats) \
            if kind is not None else {}
        nsr = {n: held[n].nsr(trial[n], transforms.get(n)) for n in held}
        out.append(Candidate(kind, alpha, seed, sum(nsr.values()) / len(nsr), nsr))
    return out


def _join(*parts: str | None) -> str | None:
    return "; ".join(p for p in parts if p) or None


def search_balance(model: nn.Module, calibration: Any, recipe: str | Recipe | Mapping = "w4a8-search", *,
                   args: tuple | None = None, kwargs: dict | None = None) -> tuple[Plan, dict[str, LayerChoice]]:
    """``(plan, choices)``: the concrete per-layer plan of a ``balance="search"`` recipe for ``model``
    (``choose_balance`` on the graph captured from ``args`` / ``kwargs``, default the first
    calibration call), carrying the statistics its smoothing needs:
    ``vq.quantize(model, args, kwargs, plan=plan)`` builds the program the search scored."""
    from viditq_compile.graph.capture import capture, eval_mode
    from viditq_compile.graph.sites import ExportedTensors
    from viditq_compile.passes.conv_as_linear import convs_as_linears
    from viditq_compile.passes.select import select_linears

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    r = Recipe.resolve(recipe)
    r.check_supported()
    if r.balance_search is None:
        raise RecipeError(f"recipe {r.name!r} does not search the balancing: use balance='search' "
                          f"(e.g. the w4a8-search preset)")
    calls, stats, inputs = record_calibration(model, calibration, r.balance_search.max_rows)
    a, kw = (calls[0] if args is None and kwargs is None else (tuple(args or ()), dict(kwargs or {})))
    with eval_mode(model):
        tensors = ExportedTensors(capture(model, a, kw))
    convs_as_linears(tensors)
    sites = tensors.linear_sites()
    plan = select_linears(sites, r, stats, graph=tensors.gm)
    plan, choices = choose_balance(tensors, sites, plan, r, stats, inputs)
    plan.calibration = stats
    return plan, choices
