"""Output SQNR (dB) against floating point of the tiny zoo PixArts (``tests/zoo.py``: the seeded one and
the outlier one), linears FP or W8A8, attention FP or SageAttention-style int8 (``attention`` recipe key)
with 128-token or per-token Q / K scales. Prints a Markdown table (RESULTS.md, "Quantized attention").

    PYTHONPATH=. .venv/bin/python scripts/attention_quality.py
"""

from __future__ import annotations

import dataclasses
import logging

import torch

import viditq_compile as vq
from tests.zoo import build_outlier_pixart, build_pixart
from viditq_compile.config.recipe import AttentionRule, Recipe
from viditq_compile.numerics.quant import sqnr_db

RULES = {"attention fp": None,
         "int8, 128-token blocks": AttentionRule(self_attn="int8", temporal_attn="int8", block=128),
         "int8, per token (default)": AttentionRule(self_attn="int8", temporal_attn="int8", block=1)}


def main() -> None:
    logging.disable(logging.WARNING)
    print("| model | linears | " + " | ".join(RULES) + " |")
    print("|---|---|" + "---:|" * len(RULES))
    for label, builder in (("tiny PixArt", build_pixart), ("outlier PixArt", build_outlier_pixart)):
        model, kwargs = builder()
        model.eval()
        with torch.no_grad():
            ref = model(**kwargs)[0]
        for base in ("fp", "w8a8"):
            cells = []
            for rule in RULES.values():
                recipe = Recipe.preset(base)
                if rule is not None:
                    recipe = dataclasses.replace(recipe, attention=rule)
                qm = vq.quantize(model, (), kwargs, recipe=recipe)
                with torch.no_grad():
                    cells.append(f"{sqnr_db(ref, qm(**kwargs)[0]):.1f} ({len(qm.report.attentions)} int8)")
            print(f"| {label} | {base.upper() if base != 'fp' else 'FP'} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
