"""FP8 (e4m3) against int8 W8A8 on the outlier PixArt of benchmarks/RESULTS.md (quality, CPU):
output SQNR against FP, mean over the 6 trajectory timesteps, calibrated on another trajectory.

    PYTHONPATH=. .venv/bin/python scripts/fp8_quality.py
"""

import statistics

import torch

import viditq_compile as vq
from tests import zoo
from viditq_compile.numerics.quant import sqnr_db

RECIPES = ("w8a8-dynamic", "w8a8-viditq", "w8a8-fp8", "w8a8-fp8-viditq")


def main() -> None:
    model, kwargs = zoo.build_outlier_pixart()
    calib = zoo.trajectory_calls(kwargs, seed=1)
    evals = zoo.trajectory_calls(kwargs, seed=2)
    print("| recipe | SQNR dB (mean of 6 timesteps) |\n|---|---:|")
    for recipe in RECIPES:
        qm = vq.quantize(model, (), kwargs, recipe=recipe, calibration=calib)
        with torch.no_grad():
            s = [sqnr_db(model(**kw)[0], qm(**kw)[0]) for _, kw in evals]
        print(f"| `{recipe}` | {statistics.mean(s):.1f} |")


if __name__ == "__main__":
    main()
