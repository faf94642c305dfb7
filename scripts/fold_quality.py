"""Output SQNR (dB) against floating point of the tiny zoo PixArt (``tests/zoo.py``) under the ViDiT-Q
presets with and without ``fold_balance`` (the out projections' balancing folded into the value
projections, one rotation block per head). Prints a Markdown table (RESULTS.md, "Folded balancing").

    PYTHONPATH=. .venv/bin/python scripts/fold_quality.py
"""

from __future__ import annotations

import dataclasses
import logging

import torch

import viditq_compile as vq
from tests import zoo
from viditq_compile.config.recipe import PRESETS
from viditq_compile.numerics.quant import sqnr_db


def main() -> None:
    logging.disable(logging.WARNING)
    torch.manual_seed(0)
    model, kwargs = zoo.build_pixart(seed=3)
    model.eval()
    stats = vq.calibrate(model, zoo.trajectory_calls(kwargs, seed=4)[:3], progress=False)
    with torch.no_grad():
        ref = model(**kwargs)[0]
    print("| recipe | run-time balancing | folded | out projections folded |")
    print("|---|---:|---:|---:|")
    for name in ("w8a8-viditq", "w4a8-viditq"):
        cells, folded = [], 0
        for fold in (False, True):
            qm = vq.quantize(model, (), kwargs, recipe=dataclasses.replace(PRESETS[name], fold_balance=fold),
                             calibration=stats)
            with torch.no_grad():
                cells.append(f"{sqnr_db(ref, qm(**kwargs)[0]):.1f}")
            folded = sum(1 for lp in qm.plan.layers.values() if lp.balance_folded_into)
        print(f"| `{name}` | {cells[0]} | {cells[1]} | {folded} |")


if __name__ == "__main__":
    main()
