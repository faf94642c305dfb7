"""Bit-width allocation: one candidate width per (unit, timestep range), least total damage under a budget.

Step 3 of ViDiT-Q's mixed-precision search (arXiv 2406.02540). The sensitivity pass measures, for
each allocation unit u (a layer or a group of layers), timestep range r and candidate
c = (weight_bits, act_bits), a damage ``d[u][r, c] >= 0``, assumed additive over units. Each
unit is one item of a multiple-choice knapsack whose options are the tuples of candidates over
the ranges: a unit's stored bytes count each distinct weight width once (W4A8 and W4A4 share
the W4 weights), which couples its ranges, so ranges cannot be separate items.

Method and what is exact:

* Costs are integers (bit sums times parameters or activation elements, the latter scaled by
  the common denominator of the floats; bytes), and a budget becomes the largest integer total
  it allows, so whether an allocation meets it is decided exactly, never in floating point.
* The dynamic programme runs over each unit's cost above its cheapest option, on a grid of at
  most ``resolution`` cells per constraint, item costs rounded up, so its result always meets
  the budget. When the common divisor of the cost differences fits the slack in ``resolution``
  cells the grid is that divisor and the optimum is exact; otherwise the damage is at most the
  optimum under the budget tightened by ``len(units)`` grid steps (a step is at most
  slack / resolution plus that divisor).
* Several constraints: one DP over all of them when every grid is exact and the state space has
  at most ``_MAX_TABLE / len(units)`` cells (exact). Otherwise the DP runs over the first
  constraint given (in the order weight_bits, act_bits, weight_bytes) and the others join the
  damage through Lagrange multipliers, each the smallest that meets its constraint, found by a
  fixed number of bisection steps (nested for two). The result meets every constraint and is
  the optimum among allocations costing no more than it does in each relaxed constraint, but it
  can miss the optimum under the budget itself (the duality gap). With one relaxed constraint
  and an exact grid, ``BudgetError`` means no allocation fits; with two it can also mean the
  search missed a budget that is only just feasible.
* ``Allocation.exact`` says whether the damage is the proven minimum. Ties go to the earlier
  candidate tuple of a unit and to the lowest total cost in the first constraint.
* When the widest candidate (at least as wide as every other in both widths) fits everywhere,
  it is returned without search: it is the reference the damages are measured against, so a
  narrower candidate measuring less damage is noise, not a gain.
"""

from __future__ import annotations

import itertools
import logging
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import reduce

import numpy as np

from viditq_compile.config.budget import MINIMUM_TEXT, Budget, BudgetError, is_int, is_real

log = logging.getLogger(__name__)

_MAX_OPTIONS = 4096      # candidates ** ranges per unit; the DP loops over them for every unit
_MAX_TABLE = 1 << 22     # grid cells times units of a multi-constraint DP: its choice tables and its work
_MAX_BITS = 16
_BISECT_STEPS = (40, 20)  # per multiplier, with one / two multipliers (nested, so 20 * 20 DPs)
_LAMBDA_RANGE = 1e-18     # lowest multiplier tried, relative to the one that overrides all damage



@dataclass(frozen=True)
class Unit:
    """One allocation unit. ``weight_bytes``: bytes of one stored weight version per weight bit
    width (codes plus scales and zero points, as the caller packs them); keyed by width alone
    because a unit's symmetry and group size are fixed by the recipe, not searched. ``None``:
    ``ceil(weight_params * bits / 8)``, the codes without scales."""

    name: str
    weight_params: int
    act_elems: float
    weight_bytes: Mapping[int, int] | None = None

    def stored_bytes(self, bits: int) -> int:
        if self.weight_bytes is None:
            return -(-self.weight_params * bits // 8)
        return self.weight_bytes[bits]


@dataclass(frozen=True)
class Allocation:
    """The chosen candidate index per timestep range for each unit, its total predicted damage,
    the achieved budget values (all three, whichever were constrained) and whether the damage
    is the proven minimum (see the module docstring)."""

    choice: dict[str, tuple[int, ...]]
    damage: float
    weight_bits: float
    act_bits: float
    weight_bytes: int
    candidates: tuple[tuple[int, int], ...]
    exact: bool

    def widths(self, unit: str) -> tuple[tuple[int, int], ...]:
        """``(weight_bits, act_bits)`` per timestep range for ``unit``."""
        return tuple(self.candidates[c] for c in self.choice[unit])


def allocate(units: Sequence[Unit], candidates: Sequence[tuple[int, int]],
             damage: Mapping[str, np.ndarray], budget: Budget, *, resolution: int = 2000) -> Allocation:
    """Pick a candidate per (unit, range) minimising the summed damage under ``budget``.

    ``damage[unit.name]``: [n_ranges, n_candidates] float, the same n_ranges for every unit,
    ranges in the order the caller's timestep ranges use. Raises ``BudgetError`` when no
    allocation meets the budget, ``ValueError`` for malformed inputs.
    """
    units = tuple(units)
    cands = _check_candidates(candidates)
    _check_units(units, cands)
    if not (isinstance(resolution, numbers.Integral) and resolution >= 1):
        raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
    dmg_tables = _check_damage(units, damage, len(cands))
    n_ranges = dmg_tables[0].shape[0]
    if len(cands) ** n_ranges > _MAX_OPTIONS:
        raise ValueError(f"{len(cands)} candidates over {n_ranges} timestep ranges give "
                         f"{len(cands) ** n_ranges} options per unit (at most {_MAX_OPTIONS}); "
                         "use fewer candidates or fewer timestep ranges")
    options = list(itertools.product(range(len(cands)), repeat=n_ranges))
    opts = np.array(options, dtype=np.int64).reshape(len(options), n_ranges)
    # [n_opt] per unit: an option's damage is the sum of its ranges' damages
    dmg = [t[np.arange(n_ranges), opts].sum(axis=1) for t in dmg_tables]
    costs = _costs(units, cands, options, budget)
    given = [c for c in costs if c.limit is not None]

    short = {c.name: (c.budget, c.value(sum(map(min, c.per_unit)))) for c in given
             if sum(map(min, c.per_unit)) > c.limit}
    if short:
        raise BudgetError("; ".join(f"{n} budget {_num(b)} cannot be met: {MINIMUM_TEXT[n].format(_fmt(v))} "
                                    f"({_fmt(v - b)} over)" for n, (b, v) in short.items()),
                          {n: v - b for n, (b, v) in short.items()})

    def result(choice: list[int], exact: bool) -> Allocation:
        total = math.fsum(d[o] for d, o in zip(dmg, choice))
        bits = [c.value(c.total(choice)) for c in costs]
        return Allocation({u.name: options[o] for u, o in zip(units, choice)}, total,
                          float(bits[0]), float(bits[1]), int(bits[2]), cands, exact)

    widest = [i for i, (w, a) in enumerate(cands) if all(w >= w2 and a >= a2 for w2, a2 in cands)]
    if widest:
        choice = [options.index((widest[0],) * n_ranges)] * len(units)
        if all(c.meets(choice) for c in given):
            least = math.fsum(float(d.min()) for d in dmg)
            return result(choice, exact=math.fsum(d[o] for d, o in zip(dmg, choice)) == least)

    grids = [_Grid(c, resolution) for c in given]
    states = math.prod(g.cap + 1 for g in grids)
    if len(grids) == 1 or (all(g.exact for g in grids) and states * len(units) <= _MAX_TABLE):
        cells = [np.stack([g.cells[u] for g in grids], axis=1) for u in range(len(units))]
        choice = _dp(dmg, cells, tuple(g.cap for g in grids))
        if choice is None:
            # each field fits alone: find the first that cannot be met with the ones before it,
            # and how low it goes while they are met (the first alone always has a solution)
            for k in range(len(grids) - 1, 0, -1):
                near = _dp([np.array(e, dtype=np.float64) for e in grids[k].excess],
                           [c[:, :k] for c in cells], tuple(g.cap for g in grids[:k]))
                if near is not None and not given[k].meets(near):
                    raise _joint_error(given, given[:k], given[k], near, "the least it can be is")
            raise BudgetError(" and ".join(f"{c.name} budget {_num(c.budget)}" for c in given)
                              + " cannot be met together", {})
        log.debug("allocate: one DP over %s, grid %s", [c.name for c in given], [g.cap for g in grids])
        return result(choice, exact=all(g.exact for g in grids))
    choice, lams = _lagrange(dmg, grids[0], given[1:], len(units))
    return result(choice, exact=grids[0].exact and not any(lams))


# ----------------------------------------------------------------------------- costs and grids

class _Cost:
    """One budget field as exact integers: ``per_unit[u][o]`` is option o's cost in unit u, an
    allocation meets the budget when its total is at most ``limit`` (``None``: unconstrained), and
    ``total / scale`` is the value reported in the budget's units."""

    def __init__(self, name: str, per_unit: list[list[int]], scale: int, budget):
        self.name, self.per_unit, self.scale, self.budget = name, per_unit, scale, budget
        exact = Fraction(int(budget)) if is_int(budget) else Fraction(float(budget or 0))
        self.limit = None if budget is None else math.floor(exact * scale)

    def total(self, choice: Sequence[int]) -> int:
        return sum(c[o] for c, o in zip(self.per_unit, choice))

    def meets(self, choice: Sequence[int]) -> bool:
        return self.limit is None or self.total(choice) <= self.limit

    def value(self, total: int):
        # exact, so float() of a total within the limit is never above the (float) budget
        return float(Fraction(total, self.scale)) if self.name != "weight_bytes" else total


def _costs(units, cands, options, budget: Budget) -> list[_Cost]:
    n_ranges = len(options[0])
    w_sum = [sum(cands[c][0] for c in o) for o in options]
    a_sum = [sum(cands[c][1] for c in o) for o in options]
    w_set = [sorted({cands[c][0] for c in o}) for o in options]
    # activation elements are floats: scale them by their common denominator to integers
    exact_act = [Fraction(float(u.act_elems)) for u in units]
    denom = reduce(math.lcm, (a.denominator for a in exact_act), 1)
    act = [int(a * denom) for a in exact_act]
    params = [int(u.weight_params) for u in units]  # Python ints: the totals outgrow int64
    return [
        _Cost("weight_bits", [[p * s for s in w_sum] for p in params], sum(params) * n_ranges, budget.weight_bits),
        _Cost("act_bits", [[k * s for s in a_sum] for k in act], sum(act) * n_ranges, budget.act_bits),
        _Cost("weight_bytes", [[sum(int(u.stored_bytes(b)) for b in ws) for ws in w_set] for u in units],
              1, budget.weight_bytes),
    ]


class _Grid:
    """A constraint discretised for the DP: ``cells[u]`` [n_opt] int64, option cost above the
    unit's cheapest in grid steps, rounded up (``cap + 1`` marks options that never fit); ``cap``
    the slack in steps, rounded down. ``exact`` when the step divides every cost difference."""

    def __init__(self, cost: _Cost, resolution: int):
        base = [min(c) for c in cost.per_unit]
        self.cost, self.base = cost, base
        assert cost.limit is not None, "grids are built only for constrained budget fields"
        self.slack = cost.limit - sum(base)
        self.excess = [[x - b for x in c] for c, b in zip(cost.per_unit, base)]
        self.unit = reduce(math.gcd, itertools.chain.from_iterable(self.excess), 0)
        if self.unit == 0:  # every option costs the same
            self.step, self.cap, self.exact = 1, 0, True
        else:
            self.step = self.unit * max(1, -(-(self.slack // self.unit) // resolution))
            self.cap = self.slack // self.step
            self.exact = self.step == self.unit
        self.cells = [np.array([min(-(-x // self.step), self.cap + 1) for x in e], dtype=np.int64)
                      for e in self.excess]


# ------------------------------------------------------------------------------ the search

def _dp(values: list[np.ndarray], cells: list[np.ndarray], caps: tuple[int, ...]) -> list[int] | None:
    """Multiple-choice knapsack: one option per unit minimising the summed ``values`` (each
    [n_opt] float) with the summed ``cells`` (each [n_opt, k] int64) at most ``caps`` in every
    dimension. Returns the option per unit, or ``None`` when nothing fits.

    Ties: the earlier option in a unit, and among final states the first in C order (the lowest
    cost in the first constraint), so the result is deterministic.
    """
    caps_arr = np.asarray(caps)
    best = np.full(tuple(c + 1 for c in caps), np.inf)
    best[(0,) * len(caps)] = 0.0
    tables = []
    for val, cel in zip(values, cells):
        # options with the same grid cost: only the least damaging (earliest on ties) can win
        keep: dict[tuple[int, ...], int] = {}
        for o in np.flatnonzero((cel <= caps_arr).all(axis=1)).tolist():
            key = tuple(cel[o].tolist())
            if key not in keep or val[o] < val[keep[key]]:
                keep[key] = int(o)
        new = np.full_like(best, np.inf)
        arg = np.full(best.shape, -1, dtype=np.int16)
        for key, o in sorted(keep.items(), key=lambda kv: kv[1]):
            dst = tuple(slice(c, None) for c in key)
            src = tuple(slice(0, n - c) for c, n in zip(key, best.shape))
            cand = best[src] + val[o]
            view, arg_view = new[dst], arg[dst]
            better = cand < view
            view[better] = cand[better]
            arg_view[better] = o
        best = new
        tables.append(arg)
    if not np.isfinite(best).any():
        return None
    state = tuple(map(int, np.unravel_index(int(np.argmin(best)), best.shape)))
    choice = []
    for arg, cel in zip(reversed(tables), reversed(cells)):
        o = int(arg[state])
        choice.append(o)
        state = tuple(int(s - c) for s, c in zip(state, cel[o]))
    return choice[::-1]


def _lagrange(dmg, primary: _Grid, relaxed: list[_Cost], n_units: int) -> tuple[list[int], list[float]]:
    """DP over ``primary`` with each of ``relaxed`` added to the damage as ``lam * excess / unit``;
    each multiplier is the smallest found (bisection in log space, nested for two) whose
    allocation meets every relaxed constraint. Returns (choice, multipliers)."""
    grids = [_Grid(c, 1) for c in relaxed]  # only for the exact excess and its divisor
    norm = [[np.array([float(x) / (g.unit or 1) for x in e]) for e in g.excess] for g in grids]
    # at lam_hi one grid step of a relaxed cost outweighs all the damage there is
    lam_hi = 2.0 * (math.fsum(float(d.max()) for d in dmg) + 1.0)
    cells = [primary.cells[u][:, None] for u in range(n_units)]
    closest: list = []

    def solve(lams):
        values = [d + sum(lam * nm[u] for lam, nm in zip(lams, norm)) for u, d in enumerate(dmg)]
        choice = _dp(values, cells, (primary.cap,))
        closest[:] = [choice]
        return choice if all(c.meets(choice) for c in relaxed) else None

    def search(lams: list[float], depth: int):
        """(damage, choice, lams) of the best allocation found meeting every relaxed
        constraint, with multipliers from ``depth`` on searched; ``None`` when none is found."""
        if depth == len(relaxed):
            choice = solve(lams)
            return None if choice is None else (math.fsum(d[o] for d, o in zip(dmg, choice)), choice, lams)
        at = lambda lam: search(lams + [lam], depth + 1)  # noqa: E731
        found = at(0.0)
        if found is not None:
            return found
        found = at(lam_hi)
        if found is None:
            return None
        lo, hi = math.log(lam_hi * _LAMBDA_RANGE), math.log(lam_hi)
        for _ in range(_BISECT_STEPS[len(relaxed) - 1]):
            mid = 0.5 * (lo + hi)
            trial = at(math.exp(mid))
            if trial is None:
                lo = mid
            else:
                hi = mid
                found = min(found, trial, key=lambda t: t[0])
        return found

    found = search([], 0)
    if found is None:
        # a heuristic search: a budget this close to infeasible may still be met
        choice = closest[0]
        missed = next(c for c in relaxed if not c.meets(choice))
        raise _joint_error([primary.cost, *relaxed], [primary.cost], missed, choice,
                           "the closest allocation found gives")
    log.debug("allocate: DP over %s, multipliers %s for %s", primary.cost.name, found[2],
              [c.name for c in relaxed])
    return found[1], found[2]


# ------------------------------------------------------------------------------ validation

def _check_candidates(candidates) -> tuple[tuple[int, int], ...]:
    cands = tuple(tuple(c) if isinstance(c, (tuple, list)) else c for c in candidates)
    if not cands:
        raise ValueError("candidates is empty: give at least one (weight_bits, act_bits)")
    for c in cands:
        if not (isinstance(c, tuple) and len(c) == 2 and all(is_int(b) and 1 <= b <= _MAX_BITS for b in c)):
            raise ValueError(f"candidate {c!r} is not (weight_bits, act_bits) with integer widths in 1..{_MAX_BITS}")
    if len(set(cands)) != len(cands):
        raise ValueError(f"candidates repeat a width: {list(cands)}")
    return tuple((int(w), int(a)) for w, a in cands)


def _check_units(units: tuple[Unit, ...], cands) -> None:
    if not units:
        raise ValueError("units is empty")
    names = [u.name for u in units]
    if len(set(names)) != len(names):
        raise ValueError(f"unit names repeat: {sorted({n for n in names if names.count(n) > 1})}")
    for u in units:
        if not (is_int(u.weight_params) and u.weight_params > 0):
            raise ValueError(f"unit {u.name!r}: weight_params must be a positive integer, got {u.weight_params!r}")
        if not (is_real(u.act_elems) and math.isfinite(u.act_elems) and u.act_elems > 0):
            raise ValueError(f"unit {u.name!r}: act_elems must be a positive finite number, got {u.act_elems!r}")
        if u.weight_bytes is not None:
            for w in sorted({w for w, _ in cands}):
                b = u.weight_bytes.get(w)
                if b is None or not (is_int(b) and b >= 0):
                    raise ValueError(f"unit {u.name!r}: weight_bytes[{w}] must be a non-negative integer, got {b!r}")


def _check_damage(units, damage: Mapping[str, np.ndarray], n_cands: int) -> list[np.ndarray]:
    names = {u.name for u in units}
    unknown = sorted(set(damage) - names)
    missing = [u.name for u in units if u.name not in damage]
    if unknown:
        raise ValueError(f"damage given for unknown units {unknown}")
    if missing:
        raise ValueError(f"no damage for units {missing}")
    tables: list[np.ndarray] = []
    for u in units:
        t = np.asarray(damage[u.name], dtype=np.float64)
        if t.ndim != 2 or t.shape[0] < 1 or t.shape[1] != n_cands:
            raise ValueError(f"damage[{u.name!r}] must be [n_ranges, {n_cands}] (one column per candidate), "
                             f"got shape {t.shape}")
        if tables and t.shape[0] != tables[0].shape[0]:
            raise ValueError(f"damage[{u.name!r}] has {t.shape[0]} timestep ranges, "
                             f"damage[{units[0].name!r}] has {tables[0].shape[0]}")
        bad = ~(np.isfinite(t) & (t >= 0))
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise ValueError(f"damage[{u.name!r}][{r}, {c}] = {t[r, c]} is not a finite non-negative number")
        tables.append(t)
    return tables


def _fmt(x) -> str:
    if is_int(x):
        return str(x)
    return f"{x:.2f}" if abs(x) >= 0.01 or x == 0 else f"{x:.2g}"


def _joint_error(given: list[_Cost], within: list[_Cost], missed: _Cost, near: list[int], found: str) -> BudgetError:
    """Budgets each met alone, not together: ``near`` meets those ``within`` and misses ``missed``."""
    v, b = missed.value(missed.total(near)), missed.budget
    return BudgetError(
        " and ".join(f"{c.name} budget {_num(c.budget)}" for c in given) + " cannot be met together: with "
        + " and ".join(c.name for c in within) + f" within budget, {found} {missed.name} {_fmt(v)} "
        f"({_fmt(v - b)} over)", {missed.name: v - b})


def _num(budget) -> str:
    return str(budget) if is_int(budget) else f"{budget:g}"
