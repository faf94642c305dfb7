"""The balancing method (ViDiT-Q channel balancing): smoothing, randomized Hadamard rotation, or both.

What this module owns, and nothing else does:

- the method names a plan may hold (``LayerPlan.balance``: ``KINDS``) and what each one does
  (``smooths`` / ``rotates``; never test the string itself), with the ``LayerPlan`` fields the
  method uses (``FIELDS``: ``balance``, ``alpha``, ``rotation_seed``, ``balance_folded_into``, ``rotation_blocks``: a
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
from viditq_compile.numerics.hadamard import kron_apply, random_signs
from viditq_compile.numerics.parallel import rotation_factors

if TYPE_CHECKING:
    from viditq_compile.config.plan import Plan
    from viditq_compile.graph.sites import LinearSite

NAME = "balance"
KINDS = ("smooth", "rotate", "smooth+rotate")
"""The values ``LayerPlan.balance`` may hold besides ``None``."""
FIELDS = ("balance", "alpha", "rotation_seed", "rotation_blocks", "balance_folded_into")
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


def bias_name(layer: str) -> str:
    return f"{layer}.viditq_folded_bias"


@dataclass(frozen=True)
class LayerTransform:
    """One balanced layer: ``x' = balance(x, act_vector, rotation)``, ``W' = weight`` (fp32).

    A folded pair (``LayerPlan.balance_folded_into``): the out projection's transform has no
    activation side (``act_vector None``, ``rotation []``: its input arrives balanced) and the value
    projection's ``weight`` / ``bias`` (fp32, ``None``: no bias) carry the out projection's
    ``M = diag(act_vector) kron(rotation)`` on their output side; ``partner`` names the other
    layer of the pair, which computes with its transform even where it stays floating point."""

    act_vector: torch.Tensor | None
    rotation: list[torch.Tensor]
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    partner: str | None = None

    @property
    def balances_input(self) -> bool:
        return self.act_vector is not None or bool(self.rotation)


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
    folds = {name: lp.balance_folded_into for name, lp in plan.layers.items() if lp.balance_folded_into}
    if folds:
        by_name = {s.name: s for s in sites}
        for o, v in folds.items():
            if o not in by_name:
                continue
            if v not in by_name:  # never fold half a pair: o's W' is only right beside v's fold
                raise ValueError(f"layer {o!r}: balance_folded_into={v!r}, which is not among the layers given")
            fold_into_value(out, by_name[o], by_name[v], sites)
    return out


class EagerFolded:
    """The floating-point eager reference of one layer of a folded pair
    (``LayerTransform.partner``) where it stays unquantized while its partner is quantized: the
    layer computes with its transform's fp32 weight and bias (the out projection's ``W'`` on its
    balanced input, or the value projection's ``M``-folded weight), as the program's pair does in
    exact arithmetic. A forward hook replacing the layer's output."""

    def __init__(self, module, name: str, t: LayerTransform):
        from viditq_compile.graph import modules

        if not modules.is_linear_layer(module):
            raise TypeError(f"layer {name!r}: EagerFolded takes an nn.Linear or a linear convolution")
        self.t = t
        self.bias = module.bias if t.bias is None else t.bias

    def __call__(self, module, args, output):
        from viditq_compile.graph import modules

        x = modules.to_tokens(module, args[0])
        xf = numerics.balance_activation(x, self.t.act_vector, self.t.rotation) if self.t.balances_input \
            else x.to(torch.float32)
        y = torch.nn.functional.linear(xf, self.t.weight,
                                       self.bias.to(torch.float32) if self.bias is not None else None)
        return modules.from_tokens(module, y.to(x.dtype), args[0])


def fold_matrix(t: LayerTransform, k: int) -> torch.Tensor:
    """``M [k, k]`` fp32 with ``balance_activation(x, t.act_vector, t.rotation) == x @ M``."""
    m = torch.eye(k, dtype=torch.float32)
    if t.act_vector is not None:
        m = m * t.act_vector.to(torch.float32)[:, None]
    return kron_apply(m, [r.to(torch.float32) for r in t.rotation]) if t.rotation else m


def fold_into_value(transforms: dict[str, LayerTransform], out: LinearSite, value: LinearSite,
                    sites: list[LinearSite]) -> None:
    """Move out projection ``out``'s activation balancing into value projection ``value`` (in
    ``transforms``, in place): per head ``h``, ``W_v'[c_v(h, j)] = sum_i M[c_o(h, i), c_o(h, j)]
    W_v[c_v(h, i)]`` and likewise the bias, with the channels of ``graph.head_layout``. ``value``'s
    own input balancing, if any, stays. ``ValueError`` when ``M`` mixes two heads (a rotation wider
    than a head: ``rotation_blocks`` must give one block per head) or the graph has no head map."""
    from viditq_compile.graph.head_layout import HeadLayoutError, value_head_map

    t_o = transforms.get(out.name)
    if t_o is None or not t_o.balances_input:
        raise ValueError(f"layer {out.name!r}: balance_folded_into is set but the layer is not balanced")
    try:
        heads = value_head_map(out, sites)
    except HeadLayoutError as e:
        raise ValueError(f"layer {out.name!r}: its balancing cannot fold into {value.name!r}: {e}") from None
    if heads.value != value.name:
        raise ValueError(f"layer {out.name!r}: balance_folded_into={value.name!r} but the graph's value "
                         f"projection of its attention is {heads.value!r}")
    k = out.in_features
    m = fold_matrix(t_o, k)
    head_of = torch.empty(k, dtype=torch.int64)
    head_of[heads.out_channels.reshape(-1)] = torch.arange(heads.heads).repeat_interleave(heads.head_dim)
    across = head_of[:, None] != head_of[None, :]
    if bool(m[across].ne(0).any()):
        raise ValueError(f"layer {out.name!r}: its balancing mixes channels of different heads (a rotation "
                         f"of {k // (out_blocks(t_o) or 1)} channels, heads of {heads.head_dim}); it folds "
                         f"into {value.name!r} only with one rotation block per head")
    # mv[c_v(h, i), c_v(h, j)] = m[c_o(h, i), c_o(h, j)]
    po, pv = heads.out_channels, heads.value_channels
    mv = torch.zeros(value.out_features, value.out_features, dtype=torch.float32)
    for h in range(heads.heads):
        mv[pv[h][:, None], pv[h][None, :]] = m[po[h][:, None], po[h][None, :]]
    t_v = transforms.get(value.name)
    w_v = t_v.weight if t_v is not None else value.weight.detach().to(torch.float32)  # type: ignore[union-attr]
    b_v = _bias_value(value)
    transforms[value.name] = LayerTransform(
        t_v.act_vector if t_v is not None else None, t_v.rotation if t_v is not None else [],
        mv.t() @ w_v, b_v.to(torch.float32) @ mv if b_v is not None else None, partner=out.name)
    transforms[out.name] = LayerTransform(None, [], t_o.weight, partner=value.name)


def out_blocks(t: LayerTransform) -> int | None:
    """The number of diagonal blocks of ``t``'s rotation (``numerics.parallel.rotation_factors``
    puts an identity factor first), ``None`` for one full-width rotation or none."""
    if t.rotation and bool(torch.equal(t.rotation[0], torch.eye(t.rotation[0].shape[0]))):
        return int(t.rotation[0].shape[0])
    return None


def _bias_value(s: LinearSite) -> torch.Tensor | None:
    """The value of a site's bias (a parameter of the graph), ``None`` without one."""
    if s.bias is None:
        return None
    b = s.bias_value
    if not isinstance(b, torch.Tensor) or b.shape != (s.out_features,):
        raise ValueError(f"layer {s.name!r}: its bias has no value in the graph to fold into")
    return b.detach()


def _act_absmax(stats, name: str, k: int) -> torch.Tensor:
    a = stats.absmax(name).to(torch.float32)
    if a.shape != (k,):
        raise ValueError(f"calibration statistics of {name!r} have {tuple(a.shape)} channels, "
                         f"the layer has K={k}")
    return a
