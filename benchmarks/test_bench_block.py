"""One PixArt-Σ transformer block, every variant in group ``pixart-block``.

Run: ``pytest -q benchmarks --benchmark-only --benchmark-json=benchmarks/results.json`` then
``python benchmarks/report.py benchmarks/results.json``. Variants, setup and environment switches:
see ``benchmarks/conftest.py``. Select a subset with ``-k``, e.g. ``-k "viditq or eager"``.
"""

from __future__ import annotations

import math
import os

import pytest


@pytest.mark.benchmark(group="pixart-block")
def test_pixart_block(benchmark, variant):
    info = variant.extra_info
    benchmark.extra_info.update(info)
    if hasattr(os, "getloadavg"):
        benchmark.extra_info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    benchmark.pedantic(variant.run, rounds=info["rounds"], warmup_rounds=info["warmup_rounds"],
                       iterations=1)
    sqnr = variant.extra_info.get("sqnr_db")
    # a broken variant should not publish a timing as if it were fine
    assert sqnr is None or (math.isfinite(sqnr) and sqnr > 15.0), \
        f"{variant.name}: output SQNR vs fp32 eager is {sqnr} dB"
