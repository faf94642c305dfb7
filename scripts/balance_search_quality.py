"""The per-layer balancing search against the W4A8 preset's fixed balancing on the outlier PixArt of
benchmarks/RESULTS.md (quality, CPU): output SQNR against FP, mean over the 6 trajectory timesteps,
calibrated (and searched) on one trajectory, evaluated on another.

    PYTHONPATH=. .venv/bin/python scripts/balance_search_quality.py

Rows: ``w4a8`` (smoothing alpha 0.5 + rotation, seed 0, for every layer), then ``w4a8-search`` with
growing candidate sets: the preset's grid (none / smooth / rotate / smooth+rotate, alpha 0.3 ... 0.9,
the recipe's rotation seed), and the same grid with more rotation seeds. Each searched plan is built
with ``vq.quantize(..., plan=plan)``; the table also gives the mean of the layers' scored SQNR.
"""

import statistics
import sys
import time
from collections import Counter

import torch

import viditq_compile as vq
from tests import zoo
from viditq_compile.config.recipe import BalanceSearch, Recipe
from viditq_compile.mixed_precision.balance_search import label, search_balance
from viditq_compile.numerics.quant import sqnr_db

GRIDS = {
    "preset grid (16 candidates per producer)": BalanceSearch(),
    "+ rotation seeds 0-7": BalanceSearch(seeds=tuple(range(8))),
    "+ rotation seeds 0-15": BalanceSearch(seeds=tuple(range(16))),
}


def _eval(model, qm, evals) -> float:
    with torch.no_grad():
        return statistics.mean(sqnr_db(model(**kw)[0], qm(**kw)[0]) for _, kw in evals)


def main() -> None:
    model, kwargs = zoo.build_outlier_pixart()
    calib = zoo.trajectory_calls(kwargs, seed=1)
    evals = zoo.trajectory_calls(kwargs, seed=2)
    fixed = _eval(model, vq.quantize(model, (), kwargs, recipe="w4a8", calibration=calib), evals)
    print("| W4A8 balancing | candidates per producer | search s | mean layer SQNR dB (scored) "
          "| output SQNR dB (mean of 6 timesteps) | vs fixed |\n|---|---:|---:|---:|---:|---:|")
    # the preset's own balancing as a one-candidate search: its layers' scored SQNR, the same program
    one = BalanceSearch(kinds=("smooth+rotate",), alphas=(0.5,))
    plan, choices = search_balance(model, calib, Recipe.preset("w4a8-search").with_(balance_search=one))
    same = _eval(model, vq.quantize(model, (), kwargs, plan=plan), evals)
    if abs(same - fixed) > 1e-6:
        raise SystemExit(f"the one-candidate search should rebuild w4a8: {same} dB vs {fixed} dB")
    layer = statistics.mean(c.sqnr_db for c in choices.values())
    print(f"| `w4a8`: smoothing α 0.5 + rotation, every layer | 1 | - | {layer:.2f} | {fixed:.2f} | 0 |",
          flush=True)
    for what, grid in GRIDS.items():
        t0 = time.perf_counter()
        plan, choices = search_balance(model, calib, Recipe.preset("w4a8-search").with_(balance_search=grid))
        seconds = time.perf_counter() - t0
        got = _eval(model, vq.quantize(model, (), kwargs, plan=plan), evals)
        n = len(next(iter(choices.values())).candidates)
        layer = statistics.mean(c.sqnr_db for c in choices.values())
        print(f"| `w4a8-search`, {what} | {n} (max) | {seconds:.0f} | {layer:.2f} | {got:.2f} | "
              f"{got - fixed:+.2f} |", flush=True)
        kinds = Counter(label(c.balance, c.alpha) for c in choices.values())
        print(f"  chosen: {dict(kinds.most_common())}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
