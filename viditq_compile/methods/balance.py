"""The balancing method (ViDiT-Q channel balancing): smoothing, randomized Hadamard rotation, or both.

What this module owns, and nothing else does:

- the method names a plan may hold (``LayerPlan.balance``: ``KINDS``) and what each one does
  (``smooths`` / ``rotates``; never test the string itself), with the ``LayerPlan`` fields the
  method uses (``FIELDS``: ``balance``, ``alpha``, ``rotation_seed``, ``rotation_blocks``: a
  block-diagonal rotation for a row-parallel layer, ``numerics.parallel.rotation_factors``);
- the names of the tensors it adds to a program (``vector_name``, ``hadamard_name``,
  ``weight_name``);
- its eager reference (``layer_transforms``: the activation vector ``m * d``, the Hadamard
  factors and the balanced fp32 weight ``W'``), which the graph pass (``passes.balance``) emits
  and the search's eager layers (``methods.eager``) apply, so both compute the same rounding.

    v = m * d,   W' = (W * d / m) R_H        (m: smoothing vector, d: random +-1 signs,
                                             R_H: normalized Hadamard as Kronecker factors)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from viditq_compile.numerics import quant as numerics
from viditq_compile.numerics.hadamard import random_signs
from viditq_compile.numerics.parallel import rotation_factors

if TYPE_CHECKING:
    from viditq_compile.config.plan import Plan
    from viditq_compile.graph.sites import LinearSite

NAME = "balance"
KINDS = ("smooth", "rotate", "smooth+rotate")
"""The values ``LayerPlan.balance`` may hold besides ``None``."""
FIELDS = ("balance", "alpha", "rotation_seed", "rotation_blocks")
"""The ``LayerPlan`` fields this method reads."""


def check_kind(kind) -> None:
    if kind is not None and kind not in KINDS:
        raise ValueError(f"balance {kind!r} is not one of {KINDS} or None")


def smooths(kind: str | None) -> bool:
    """Whether balancing ``kind`` smooths (needs calibration statistics and an ``alpha``)."""
    check_kind(kind)
    return kind in ("smooth", "smooth+rotate")


def rotates(kind: str | None) -> bool:
    """Whether balancing ``kind`` rotates (needs a ``rotation_seed`` and a Hadamard order)."""
    check_kind(kind)
    return kind in ("rotate", "smooth+rotate")


def kind_of(smooth: bool, rotate: bool) -> str | None:
    """The kind that smooths and/or rotates as asked; ``None`` for neither."""
    return {(True, True): "smooth+rotate", (True, False): "smooth", (False, True): "rotate"}.get(
        (bool(smooth), bool(rotate)))


def vector_name(layer: str) -> str:
    return f"{layer}.viditq_balance_vector"


def hadamard_name(k: int, i: int, blocks: int = 1) -> str:
    """Factor ``i`` of the rotation of width ``k`` (``blocks`` > 1: block-diagonal)."""
    return f"viditq_hadamard.{k}.{i}" if blocks == 1 else f"viditq_hadamard.{k}x{blocks}.{i}"


def weight_name(layer: str) -> str:
    return f"{layer}.viditq_balanced_weight"


@dataclass(frozen=True)
class LayerTransform:
    """One balanced layer: ``x' = balance(x, act_vector, rotation)``, ``W' = weight`` (fp32)."""

    act_vector: torch.Tensor
    rotation: list[torch.Tensor]
    weight: torch.Tensor


def balance_groups(sites: list[LinearSite], plan: Plan) -> list[tuple[list[LinearSite], tuple]]:
    """Balanced sites grouped by the transform they must share, in graph order.

    Sites are linked when they read the same tensor or belong to the same layer (a layer called
    on two inputs needs one W'); each connected component with the same (method, alpha, seed,
    rotation blocks) is one group.
    """
    parent: dict = {}

    def find(k):
        while parent.setdefault(k, k) != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    chosen = []
    for s in sites:
        lp = plan.layers[s.name]
        if not lp.quantized or lp.balance is None:
            continue
        key = (lp.balance, lp.alpha, lp.rotation_seed, lp.rotation_blocks)
        chosen.append((s, key))
        a, b = find(("x", s.x, key)), find(("layer", s.name, key))
        parent[a] = b
    groups: dict = {}
    for s, key in chosen:
        groups.setdefault(find(("layer", s.name, key)), ([], key))[0].append(s)
    return list(groups.values())


def layer_transforms(sites: list[LinearSite], plan: Plan, stats=None) -> dict[str, LayerTransform]:
    """The balancing of every balanced layer of ``plan``, computed once per transform group
    (``balance_groups``): the activation vector ``m · d``, the Hadamard factors and W'.

    Shared by this pass and the sensitivity pass, so that the search measures the same rounding
    the quantized program does. A weight holding NaN or Inf is refused (``ValueError`` naming the
    layer, what is not finite and where) before it is balanced.
    """
    out: dict[str, LayerTransform] = {}
    for members, (method, alpha, seed, blocks) in balance_groups(sites, plan):
        layers = {s.name: s for s in members}  # one entry per distinct layer
        k = members[0].in_features
        weights = {name: s.weight.detach().to(torch.float32) for name, s in layers.items()}  # type: ignore[union-attr]
        for name, w in weights.items():
            # checked before balancing: a rotation would spread one NaN over its whole row
            bad = numerics.nonfinite_summary(w)
            if bad:
                raise ValueError(f"layer {name!r}: weight contains NaN or Inf ({bad}); it cannot be "
                                 f"balanced or quantized")
        smooth = signs = None
        factors: list[torch.Tensor] = []
        if smooths(method):
            w_max = torch.stack([w.abs().amax(dim=0) for w in weights.values()]).amax(dim=0)
            a_max = torch.stack([_act_absmax(stats, name, k) for name in layers]).amax(dim=0)
            smooth = numerics.smoothing_vector(w_max, a_max, alpha)
        if rotates(method):
            signs = random_signs(k, seed)
            factors = rotation_factors(k, blocks)
        act_vec = smooth * signs if smooth is not None and signs is not None else \
            (smooth if smooth is not None else signs)
        for name in layers:
            w_bal = numerics.balance_weight(weights[name], smooth, signs, factors)
            out[name] = LayerTransform(act_vec.contiguous(), factors, w_bal)  # type: ignore[union-attr]  # smoothed or rotated
    return out


def _act_absmax(stats, name: str, k: int) -> torch.Tensor:
    a = stats.absmax(name).to(torch.float32)
    if a.shape != (k,):
        raise ValueError(f"calibration statistics of {name!r} have {tuple(a.shape)} channels, "
                         f"the layer has K={k}")
    return a
