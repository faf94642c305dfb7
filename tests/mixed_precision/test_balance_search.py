"""The per-layer balancing search (``balance="search"``): what it chooses, that the error it scores
for the chosen plan is the error of the program built from that plan, layer by layer, and what it
refuses."""

from __future__ import annotations

import pytest
import torch
from torch import fx

import viditq_compile as vq
from tests import zoo
from viditq_compile.config.recipe import BalanceSearch, Recipe, RecipeError
from viditq_compile.mixed_precision.balance_search import label, record_inputs, search_balance
from viditq_compile.numerics import quant as numerics

QLINEAR = torch.ops.viditq.qlinear.default
SUFFIX = ".viditq_w_q"
SMALL = BalanceSearch(alphas=(0.4, 0.6), seeds=(0, 5))


def _calls(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [((torch.randn(2, 16, 64, generator=g) * torch.tensor([30.0] * 3 + [1.0] * 61),
              torch.randn(2, 64, generator=g)), {}) for _ in range(n)]


def _recipe(base="w4a8", search=SMALL):
    return Recipe.preset(base).with_(name=f"{base}-small-search", balance="search", balance_search=search)


def _layer_of(node: fx.Node) -> str:
    found: list = []
    fx.node.map_arg((node.args, node.kwargs), found.append)
    return next(n.target[: n.target.index(SUFFIX)] for n in found if n.op == "get_attr" and SUFFIX in n.target)


def _program_errors(qm, model, calls) -> dict[str, float]:
    """SQNR (dB) of every quantized layer of the program ``qm``, each fed the input the floating-point
    model gives that layer (so upstream rounding does not enter), pooled over the calls: the
    program's own ``quantize_act`` + ``qlinear`` nodes, run by an ``fx.Interpreter`` whose
    environment holds the floating-point inputs."""
    gm = qm.module
    mods = dict(model.named_modules())
    ops = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == QLINEAR]
    names = {n: _layer_of(n) for n in ops}
    ref: dict[str, list] = {v: [] for v in names.values()}
    got: dict[str, list] = {v: [] for v in names.values()}
    for args, kwargs in calls:
        seen: dict[str, tuple] = {}
        hooks = [mods[v].register_forward_hook(lambda m, a, y, v=v, seen=seen: seen.__setitem__(v, (a[0], y)))
                 for v in set(names.values())]
        try:
            with torch.no_grad():
                model(*args, **kwargs)
        finally:
            for h in hooks:
                h.remove()
        env = {node.args[0].args[0].args[0]: seen[v][0] for node, v in names.items()}
        interp = fx.Interpreter(gm, garbage_collect_values=False)
        interp.run(*torch.utils._pytree.tree_leaves((args, kwargs)), initial_env=env)
        for node, v in names.items():
            ref[v].append(seen[v][1].flatten())
            got[v].append(interp.env[node].flatten())
    return {v: numerics.sqnr_db(torch.cat(ref[v]), torch.cat(got[v])) for v in ref}


@pytest.fixture(scope="module")
def searched():
    from tests.conftest import ModulatedMLP

    torch.manual_seed(0)
    model = ModulatedMLP().eval()
    calls = _calls()
    plan, choices = search_balance(model, calls, _recipe())
    return model, calls, plan, choices


def test_candidates_follow_the_grid_and_what_a_producer_can_take():
    s = BalanceSearch(alphas=(0.3, 0.7), seeds=(1, 2))
    assert s.candidates(seed=9) == [(None, None, None), ("smooth", 0.3, None), ("smooth", 0.7, None),
                                    ("rotate", None, 1), ("rotate", None, 2),
                                    ("smooth+rotate", 0.3, 1), ("smooth+rotate", 0.7, 1),
                                    ("smooth+rotate", 0.3, 2), ("smooth+rotate", 0.7, 2)]
    assert BalanceSearch(alphas=(0.5,)).candidates(can_smooth=False, seed=9) == [(None, None, None),
                                                                               ("rotate", None, 9)]
    assert BalanceSearch(kinds=("smooth",), alphas=(0.5,)).candidates(can_smooth=False) == []
    assert label("smooth+rotate", 0.6) == "smooth+rotate a=0.6" and label(None, None) == "none"


def test_record_inputs_caps_the_rows_and_is_repeatable(mlp_block):
    m, _ = mlp_block
    calls = _calls(n=3)
    few = record_inputs(m, calls, max_rows=40)
    assert set(few) == {"fc1", "fc2", "proj_out"}
    assert few["fc1"].shape == (40, 64) and few["fc2"].shape == (40, 256)
    assert torch.equal(few["fc1"], record_inputs(m, calls, max_rows=40)["fc1"])
    every = record_inputs(m, calls, layers=["fc1"], max_rows=10_000)
    assert set(every) == {"fc1"} and every["fc1"].shape == (3 * 2 * 16, 64)
    assert not m._forward_pre_hooks and not m.fc1._forward_pre_hooks
    with pytest.raises(ValueError, match="max_rows must be an int >= 1, got 0"):
        record_inputs(m, calls, max_rows=0)
    with pytest.raises(ValueError, match="not linear layers"):
        record_inputs(m, calls, layers=["norm"])


def test_each_producer_gets_its_best_candidate(searched):
    _, _, plan, choices = searched
    assert set(choices) == {"fc1", "fc2"}  # proj_out stays floating point (a family keep-FP name)
    assert not plan.layers["proj_out"].quantized
    for name, c in choices.items():
        assert len(c.candidates) == len(SMALL.candidates())
        best = min(c.candidates, key=lambda k: k.score)
        assert (c.balance, c.alpha, c.rotation_seed) == (best.kind, best.alpha, best.seed)
        lp = plan.layers[name]
        assert (lp.balance, lp.alpha, lp.rotation_seed) == (c.balance, c.alpha, c.rotation_seed)
        assert f"{c.sqnr_db:.2f} dB" in lp.note and c.rows == 96
    # the outlier channels make balancing win on fc1
    assert choices["fc1"].balance is not None
    assert choices["fc1"].sqnr_db > next(k for k in choices["fc1"].candidates if k.kind is None).sqnr_db


def test_the_error_the_search_reports_is_the_error_of_the_built_programs_layer(searched):
    model, calls, plan, choices = searched
    qm = vq.quantize(model, calls[0][0], plan=plan)
    measured = _program_errors(qm, model, calls)
    assert set(measured) == set(choices)
    for name, c in choices.items():
        assert measured[name] == pytest.approx(c.sqnr_db, abs=1e-3), name


def test_the_report_shows_what_was_chosen_and_the_scored_error(searched):
    model, calls, plan, choices = searched
    qm = vq.quantize(model, calls[0][0], plan=plan)
    rows = {r.name: r for r in qm.report.rows}
    for name, c in choices.items():
        assert rows[name].balance == (label(c.balance, c.alpha) if c.balance else "")
        assert "balance search: " in rows[name].note and f"SQNR {c.sqnr_db:.2f} dB" in rows[name].note
    assert "balance search" in str(qm.report)


def test_the_plan_round_trips_and_re_applies(searched, tmp_path):
    model, calls, plan, _ = searched
    plan.save(tmp_path / "plan.json")
    again = vq.Plan.load(tmp_path / "plan.json")
    assert again.layers == plan.layers
    qm, qm2 = (vq.quantize(model, calls[0][0], plan=p) for p in (plan, again))
    with torch.no_grad():
        assert torch.equal(qm(*calls[1][0]), qm2(*calls[1][0]))


def test_a_producer_without_statistics_is_not_smoothed(mlp_block):
    from viditq_compile.calibration.observe import calibrate
    from viditq_compile.graph.capture import capture
    from viditq_compile.graph.sites import ExportedTensors
    from viditq_compile.mixed_precision.balance_search import choose_balance
    from viditq_compile.passes.select import select_linears

    m, args = mlp_block
    calls = _calls(n=2)
    stats = calibrate(m, calls, layers=lambda n: n != "fc2", progress=False)
    tensors = ExportedTensors(capture(m, args, {}))
    sites = tensors.linear_sites()
    r = _recipe()
    plan, choices = choose_balance(tensors, sites, select_linears(sites, r, stats, graph=tensors.gm), r, stats,
                                   record_inputs(m, calls))
    assert not any(k.kind in ("smooth", "smooth+rotate") for k in choices["fc2"].candidates)
    assert "no calibration statistics: smoothing not searched" in plan.layers["fc2"].note
    assert any(k.kind == "smooth+rotate" for k in choices["fc1"].candidates)


def test_search_recipes_need_the_calibration_calls(mlp_block):
    m, args = mlp_block
    stats = vq.calibrate(m, _calls(n=2), progress=False)
    with pytest.raises(RecipeError, match="balance='search'.*needs the calibration calls"):
        vq.quantize(m, args, recipe="w4a8-search", calibration=stats)
    with pytest.raises(RecipeError, match="pass calibration="):
        search_balance(m, None, "w4a8-search")
    with pytest.raises(RecipeError, match="balance='search'.*needs the calibration calls.*not statistics"):
        search_balance(m, stats, "w4a8-search")
    with pytest.raises(RecipeError, match="'w4a8' does not search the balancing"):
        search_balance(m, _calls(n=1), "w4a8")


def test_quantize_with_a_search_recipe_and_calls_builds_the_searched_plan(searched):
    """``vq.quantize(..., recipe=<search>, calibration=calls)`` searches and builds in one call: the
    same plan ``search_balance`` returns, the same program."""
    model, calls, plan, _ = searched
    qm = vq.quantize(model, calls[0][0], recipe=_recipe(), calibration=calls)
    assert qm.plan.layers == plan.layers
    with torch.no_grad():
        assert torch.equal(qm(*calls[1][0]), vq.quantize(model, calls[0][0], plan=plan)(*calls[1][0]))


def test_the_backend_refuses_a_search_recipe_without_a_plan(mlp_block):
    m, args = mlp_block
    compiled = torch.compile(m, backend="viditq", options={"recipe": "w4a8-search"})
    with pytest.raises(Exception, match="searches the balancing per layer.*search_balance"):
        compiled(*args)


@pytest.mark.slow
def test_outlier_pixart_search_beats_the_fixed_preset_per_layer():
    """On the outlier PixArt every producer's chosen balancing scores at least the W4A8 preset's
    fixed smoothing + rotation (α 0.5, seed 0), which is among the candidates."""
    model, kwargs = zoo.build_outlier_pixart()
    calls = zoo.trajectory_calls(kwargs, seed=1)[:2]
    r = _recipe(search=BalanceSearch(kinds=("smooth+rotate",), alphas=(0.3, 0.5, 0.7), seeds=(0, 1)))
    plan, choices = search_balance(model, calls, r)
    assert len(choices) == len(plan.quantized) > 10
    for c in choices.values():
        fixed = next(k for k in c.candidates if (k.kind, k.alpha, k.seed) == ("smooth+rotate", 0.5, 0))
        chosen = next(k for k in c.candidates if (k.kind, k.alpha, k.seed) == (c.balance, c.alpha, c.rotation_seed))
        assert chosen.score <= fixed.score
    qm = vq.quantize(model, (), kwargs, plan=plan)
    measured = _program_errors(qm, model, calls)
    for name, c in choices.items():
        assert measured[name] == pytest.approx(c.sqnr_db, abs=1e-3), name
