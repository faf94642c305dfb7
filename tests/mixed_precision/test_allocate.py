"""allocate: the DP against brute force over every assignment on small instances, and its contract."""

import functools
import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from viditq_compile.config.budget import Budget, BudgetError
from viditq_compile.mixed_precision import allocate as alloc_mod
from viditq_compile.mixed_precision.allocate import Allocation, Unit, allocate

CANDIDATE_SETS = [
    [(8, 8), (4, 8)],
    [(8, 8), (4, 8), (4, 4)],
    [(4, 4), (8, 8), (6, 6)],   # widest not first
    [(8, 4), (4, 8)],           # no candidate is widest in both
]
BUDGET_KINDS = [("weight_bits",), ("act_bits",), ("weight_bytes",), ("weight_bits", "act_bits"),
                ("weight_bits", "weight_bytes"), ("act_bits", "weight_bytes"),
                ("weight_bits", "act_bits", "weight_bytes")]


def _instance(seed, n_units=None, n_ranges=None, cands=None, hi=40):
    rng = np.random.default_rng(seed)
    n_units = n_units or int(rng.integers(3, 5))
    cands = cands or CANDIDATE_SETS[seed % len(CANDIDATE_SETS)]
    n_ranges = n_ranges or (1 if len(cands) == 3 and n_units == 4 and seed % 2 else int(rng.integers(1, 3)))
    units = []
    for i in range(n_units):
        params = int(rng.integers(1, hi))
        # odd units: packed codes only; even ones: codes plus a per-width overhead for scales
        stored = None if i % 2 else {w: params * w // 8 + int(rng.integers(0, 9)) for w, _ in cands}
        units.append(Unit(f"blocks.{i}.attn", params, float(rng.integers(1, hi)), stored))
    damage = {u.name: rng.random((n_ranges, len(cands))) for u in units}
    return units, cands, damage


def _brute(units, cands, damage):
    """Every assignment, as flat arrays in C order over (unit, option): ``damage``, and per budget
    field the exact integer total, whose value in the budget's units is ``total / scale[field]``."""
    n_ranges = damage[units[0].name].shape[0]
    opts = list(itertools.product(range(len(cands)), repeat=n_ranges))
    per = {"damage": [], "weight_bits": [], "act_bits": [], "weight_bytes": []}
    for u in units:
        assert float(u.act_elems).is_integer()
        per["damage"].append(np.array([sum(damage[u.name][r, c] for r, c in enumerate(o)) for o in opts]))
        per["weight_bits"].append(np.array([u.weight_params * sum(cands[c][0] for c in o) for o in opts]))
        per["act_bits"].append(np.array([int(u.act_elems) * sum(cands[c][1] for c in o) for o in opts]))
        per["weight_bytes"].append(np.array([sum(u.weight_bytes[b] if u.weight_bytes else
                                                 math.ceil(u.weight_params * b / 8) for b in {cands[c][0] for c in o})
                                             for o in opts]))
    flat = {k: functools.reduce(lambda x, y: np.add.outer(x, y).ravel(), v) for k, v in per.items()}
    scale = {"weight_bits": sum(u.weight_params for u in units) * n_ranges,
             "act_bits": int(sum(u.act_elems for u in units)) * n_ranges, "weight_bytes": 1}
    return flat, scale, opts


def _fits(flat, scale, limits):
    """Which assignments meet ``limits`` (field -> budget), decided exactly."""
    ok = np.ones(flat["damage"].shape, dtype=bool)
    for k, b in limits.items():
        ok &= flat[k] <= math.floor(Fraction(b) * scale[k])
    return ok


def _index(a: Allocation, units, opts):
    return int(np.ravel_multi_index([opts.index(a.choice[u.name]) for u in units], [len(opts)] * len(units)))


def _random_budget(units, cands, damage, kinds, rng):
    """Each field somewhere between its narrowest and widest value, so that all kinds bind."""
    flat, scale, _ = _brute(units, cands, damage)
    limits = {}
    for k in kinds:
        lo, hi = Fraction(int(flat[k].min()), scale[k]), Fraction(int(flat[k].max()), scale[k])
        x = lo + (hi - lo) * Fraction(float(rng.uniform(0.0, 0.95)))
        limits[k] = int(math.floor(x)) if k == "weight_bytes" else float(x)
    return limits


def _check_feasible(a: Allocation, limits):
    for k, b in limits.items():
        assert getattr(a, k) <= b, (k, getattr(a, k), b)


def _expected(units, cands, damage, limits):
    """(brute-force optimum, whether the all-widest rule applies instead): when the widest
    candidate fits everywhere its damage is returned (see the module docstring)."""
    flat, scale, opts = _brute(units, cands, damage)
    dmg, ok = flat["damage"], _fits(flat, scale, limits)
    wide = [i for i, (w, x) in enumerate(cands) if all(w >= w2 and x >= a2 for w2, a2 in cands)]
    if wide:
        idx = np.ravel_multi_index([opts.index((wide[0],) * len(opts[0]))] * len(units), [len(opts)] * len(units))
        if ok[idx]:
            return dmg[idx], True
    return (dmg[ok].min() if ok.any() else None), False


@pytest.mark.parametrize("kinds", BUDGET_KINDS, ids="+".join)
def test_matches_brute_force(kinds):
    for seed in range(10):
        # three fields are solved exactly only on a small grid (see the module docstring)
        units, cands, damage = _instance(seed, hi=12 if len(kinds) == 3 else 40)
        limits = _random_budget(units, cands, damage, kinds, np.random.default_rng(seed))
        want, widest = _expected(units, cands, damage, limits)
        if want is None:  # every field fits alone, not all together
            with pytest.raises(BudgetError, match="cannot be met together"):
                allocate(units, cands, damage, Budget(**limits))
            continue
        a = allocate(units, cands, damage, Budget(**limits))
        _check_feasible(a, limits)
        flat, scale, opts = _brute(units, cands, damage)
        assert _fits(flat, scale, limits)[_index(a, units, opts)]
        assert a.exact or widest
        assert a.damage == pytest.approx(want, rel=1e-12, abs=1e-12), (seed, limits)


def test_coarse_grid_is_feasible_and_within_the_stated_bound():
    # costs in the 1e5s with resolution 8: the grid step exceeds the cost divisor, so the DP
    # result is only guaranteed to beat the optimum under the budget tightened by n_units steps
    n_exact = 0
    for seed in range(12):
        units, cands, damage = _instance(seed, cands=[(8, 8), (6, 8), (4, 8)], hi=10**5)
        limits = _random_budget(units, cands, damage, ("weight_bits",), np.random.default_rng(seed))
        a = allocate(units, cands, damage, Budget(**limits), resolution=8)
        _check_feasible(a, limits)
        n_exact += a.exact
        flat, scale, _ = _brute(units, cands, damage)
        dmg, P = flat["damage"], scale["weight_bits"]
        assert a.damage >= dmg[_fits(flat, scale, limits)].min() - 1e-12
        # the bound: the budget tightened by n_units steps of (slack / resolution + cost divisor)
        slack = Fraction(limits["weight_bits"]) - Fraction(int(flat["weight_bits"].min()), P)
        divisor = Fraction(math.gcd(*(u.weight_params * 2 for u in units)), P)
        tight = Fraction(limits["weight_bits"]) - len(units) * (slack / 8 + divisor)
        ok = flat["weight_bits"] <= math.floor(tight * P)
        if ok.any():
            assert a.damage <= dmg[ok].min() + 1e-12
    assert n_exact < 12  # the coarse grid was really exercised


@pytest.mark.parametrize("kinds", BUDGET_KINDS[3:], ids="+".join)
def test_lagrangian_is_feasible_and_optimal_at_its_own_costs(kinds, monkeypatch):
    # no multi-dimensional DP: the first field is searched, the others relaxed by multipliers
    monkeypatch.setattr(alloc_mod, "_MAX_TABLE", 1)
    n_solved = n_exact = 0
    for seed in range(10):
        units, cands, damage = _instance(seed)
        limits = _random_budget(units, cands, damage, kinds, np.random.default_rng(seed))
        want, widest = _expected(units, cands, damage, limits)
        if widest:
            continue
        try:
            a = allocate(units, cands, damage, Budget(**limits))
        except BudgetError:
            assert want is None or len(kinds) == 3  # one multiplier always finds a feasible point
            continue
        n_solved += 1
        _check_feasible(a, limits)
        assert a.damage >= want - 1e-12
        n_exact += a.exact
        if a.exact:
            assert a.damage == pytest.approx(want, rel=1e-12, abs=1e-12)
        # Lagrangian optimality: no allocation does better without costing more in a relaxed field
        flat, scale, opts = _brute(units, cands, damage)
        idx = _index(a, units, opts)
        ok = _fits(flat, scale, {kinds[0]: limits[kinds[0]]})
        for k in kinds[1:]:
            ok &= flat[k] <= flat[k][idx]
        assert a.damage <= flat["damage"][ok].min() + 1e-9
    assert n_solved >= 8 and n_exact < n_solved


def test_planted_sensitive_units_get_the_wide_widths():
    cands = [(8, 8), (4, 8), (4, 4)]
    units = [Unit(f"blocks.{i}.ff", 1000, 1000.0) for i in range(6)]
    damage = {u.name: np.array([[0.0, 0.01, 0.02], [0.0, 0.01, 0.02]]) for u in units}
    damage["blocks.2.ff"] = np.array([[0.0, 5.0, 9.0], [0.0, 5.0, 9.0]])
    damage["blocks.4.ff"] = np.array([[0.0, 0.01, 0.02], [0.0, 3.0, 7.0]])  # sensitive late only
    # weight bits: room for three (unit, range) pairs at W8 out of twelve
    a = allocate(units, cands, damage, Budget(weight_bits=5.0))
    assert a.widths("blocks.2.ff") == ((8, 8), (8, 8))
    assert a.widths("blocks.4.ff") == ((4, 8), (8, 8))
    assert all(w == (4, 8) for u in units if u.name not in ("blocks.2.ff", "blocks.4.ff")
               for w in a.widths(u.name))
    assert a.weight_bits == 5.0 and a.act_bits == 8.0 and a.exact


def test_infeasible_budgets_raise_with_the_shortfall():
    cands = [(8, 8), (4, 8), (4, 4)]
    units = [Unit("blocks.0.attn", 100, 50.0), Unit("blocks.0.ff", 300, 20.0, {8: 310, 4: 160})]
    damage = {u.name: np.ones((2, 3)) for u in units}
    with pytest.raises(BudgetError, match=r"weight_bits budget 3.5 cannot be met: the narrowest candidates "
                                          r"give 4.00 average weight bits \(0.50 over\)") as e:
        allocate(units, cands, damage, Budget(weight_bits=3.5, act_bits=6.0))
    assert e.value.shortfall == {"weight_bits": 0.5}
    with pytest.raises(BudgetError, match=r"act_bits budget 2 cannot be met: .* 4.00 average activation bits "
                                          r"\(2.00 over\); weight_bytes budget 207 cannot be met: "
                                          r"the smallest weight versions take 210 bytes \(3 over\)") as e:
        allocate(units, cands, damage, Budget(act_bits=2, weight_bytes=207))
    assert e.value.shortfall == {"act_bits": 2.0, "weight_bytes": 3}
    assert isinstance(e.value, ValueError)
    # the narrowest exactly is feasible
    a = allocate(units, cands, damage, Budget(weight_bits=4.0, act_bits=4.0, weight_bytes=210))
    assert (a.weight_bits, a.act_bits, a.weight_bytes) == (4.0, 4.0, 210)
    # each field fits alone, not both: every candidate spends 12 bits on weights and activations
    units = [Unit("blocks.0.attn", 100, 50.0), Unit("blocks.0.ff", 100, 50.0)]
    cands = [(8, 4), (4, 8)]
    with pytest.raises(BudgetError, match=r"weight_bits budget 4.5 and act_bits budget 5 cannot be met together: "
                                          r"with weight_bits within budget, the least it can be is act_bits 8.00 "
                                          r"\(3.00 over\)") as e:
        allocate(units, cands, {u.name: np.ones((1, 2)) for u in units}, Budget(weight_bits=4.5, act_bits=5))
    assert e.value.shortfall == {"act_bits": 3.0}


def test_loose_budgets_give_all_widest():
    for cands in CANDIDATE_SETS[:3]:
        units, _, damage = _instance(3, cands=cands)
        wide = max(cands)
        damage[units[0].name][:, cands.index(wide)] = 1.0  # noisy: wider measured worse; still chosen
        a = allocate(units, cands, damage, Budget(weight_bits=8.0, act_bits=8.0, weight_bytes=10**9))
        assert all(w == wide for u in units for w in a.widths(u.name))
        assert (a.weight_bits, a.act_bits) == (8.0, 8.0) and not a.exact


def test_weight_bytes_count_a_shared_w4_version_once():
    cands = [(8, 8), (4, 8), (4, 4)]
    units = [Unit("attn", 2000, 100.0, {8: 1000, 4: 600})]
    damage = {"attn": np.array([[0.0, 1.0, 3.0], [0.0, 0.5, 0.7]])}
    # W8 in range 0 and W4 in range 1 stores both versions
    a = allocate(units, cands, damage, Budget(weight_bits=6.0, weight_bytes=1600))
    assert a.widths("attn") == ((8, 8), (4, 8)) and a.weight_bytes == 1600
    a = allocate(units, cands, damage, Budget(weight_bits=6.0, weight_bytes=1599))
    assert a.widths("attn") == ((4, 8), (4, 8)) and a.weight_bytes == 600
    # W4A8 and W4A4 share the W4 weights
    a = allocate(units, cands, damage, Budget(act_bits=6.0, weight_bytes=600))
    assert a.widths("attn") == ((4, 8), (4, 4)) and a.weight_bytes == 600 and a.act_bits == 6.0


def test_deterministic_and_ties_prefer_the_cheaper():
    units, cands, damage = _instance(5, n_units=4, n_ranges=2, cands=[(8, 8), (4, 8), (4, 4)])
    budget = Budget(weight_bits=6.0, act_bits=7.0)
    a = allocate(units, cands, damage, budget)
    b = allocate(units, cands, dict(reversed(list(damage.items()))), budget)
    assert a == b
    zero = {u.name: np.zeros((2, 3)) for u in units}
    a = allocate(units, cands, zero, budget)
    assert a.damage == 0.0 and a.weight_bits == 4.0 and a.act_bits == 4.0


def test_realistic_sizes_are_exact_for_one_constraint():
    # PixArt-like: 28 blocks of five linears, four timestep ranges, 81 options per unit
    rng = np.random.default_rng(0)
    d, units, damage = 1152, [], {}
    for b in range(28):
        for name, (k, n) in {"qkv": (d, 3 * d), "proj": (d, d), "fc1": (d, 4 * d), "fc2": (4 * d, d)}.items():
            units.append(Unit(f"blocks.{b}.{name}", k * n, 4096.0 * k))
            s = rng.random() * 1e-3
            damage[units[-1].name] = np.array([[0.0, s, 8 * s]] * 4) * (1 + rng.random((4, 1)))
    a = allocate(units, [(8, 8), (4, 8), (4, 4)], damage, Budget(weight_bits=5.0))
    assert a.exact and a.weight_bits <= 5.0 and len(a.choice) == 112


@pytest.mark.parametrize("kwargs, match", [
    ({}, "at least one"),
    ({"weight_bits": -1.0}, r"Budget.weight_bits .* got -1.0"),
    ({"act_bits": float("nan")}, r"Budget.act_bits .* got nan"),
    ({"weight_bits": float("inf")}, r"Budget.weight_bits .* got inf"),
    ({"weight_bytes": 1.5}, r"Budget.weight_bytes .* got 1.5"),
    ({"weight_bytes": True}, r"Budget.weight_bytes .* got True"),
    ({"act_bits": 0}, r"Budget.act_bits .* got 0"),
])
def test_budget_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Budget(**kwargs)


def test_input_validation():
    units, cands, damage = _instance(1, n_units=3, n_ranges=2, cands=[(8, 8), (4, 8)])
    budget = Budget(weight_bits=6.0)

    def bad(match, units=units, cands=cands, damage=damage, **kw):
        with pytest.raises(ValueError, match=match):
            allocate(units, cands, damage, budget, **kw)

    bad(r"damage\['blocks.0.attn'\] must be \[n_ranges, 2\].*shape \(2, 3\)",
        damage={**damage, "blocks.0.attn": np.zeros((2, 3))})
    bad(r"damage\['blocks.1.attn'\] has 1 timestep ranges", damage={**damage, "blocks.1.attn": np.zeros((1, 2))})
    bad(r"damage\['blocks.2.attn'\]\[1, 0\] = nan", damage={**damage, "blocks.2.attn": np.array([[0, 1], [np.nan, 1]])})
    bad(r"damage\['blocks.2.attn'\]\[0, 1\] = -0.5", damage={**damage, "blocks.2.attn": np.array([[0, -.5], [0, 1]])})
    bad(r"unknown units \['blocks.9.attn'\]", damage={**damage, "blocks.9.attn": np.zeros((2, 2))})
    bad(r"no damage for units \['blocks.1.attn'\]", damage={k: v for k, v in damage.items() if k != "blocks.1.attn"})
    bad("candidates is empty", cands=[])
    bad(r"candidate \(0, 8\)", cands=[(8, 8), (0, 8)])
    bad(r"candidate \(4.0, 8\)", cands=[(8, 8), (4.0, 8)])
    bad(r"candidate \(4,\)", cands=[(8, 8), (4,)])
    bad("candidates repeat", cands=[(8, 8), (8, 8)])
    bad("units is empty", units=[], damage={})
    bad("unit names repeat", units=[units[0], units[0]])
    bad(r"unit 'x': weight_params .* got 0", units=[Unit("x", 0, 1.0)], damage={"x": np.zeros((2, 2))})
    bad(r"unit 'x': act_elems .* got nan", units=[Unit("x", 1, float("nan"))], damage={"x": np.zeros((2, 2))})
    bad(r"unit 'x': weight_bytes\[4\] .* got None", units=[Unit("x", 1, 1.0, {8: 1})], damage={"x": np.zeros((2, 2))})
    bad("resolution must be a positive integer", resolution=0)
    six = [(8, 8), (4, 8), (4, 4)]
    bad(r"6561 options per unit \(at most 4096\); use fewer candidates or fewer timestep ranges", cands=six,
        damage={u.name: np.zeros((8, 3)) for u in units})
