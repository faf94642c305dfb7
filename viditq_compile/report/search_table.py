"""The search record of a plan made by ``viditq_compile.search``, for people: a table and a heat map."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from viditq_compile.numerics.quant import nsr_db
from viditq_compile.report.heatmap import range_labels
from viditq_compile.report.heatmap import write_heatmap as write_png

if TYPE_CHECKING:  # the plan calls these: a type only
    from viditq_compile.config.plan import Plan


def _sensitivity(rec: dict, unit: str, r: int) -> float:
    """A unit's sensitivity in range ``r``: its damage at the narrowest candidate width (fewest
    weight + activation bits, then fewest weight bits)."""
    cands = [tuple(c) for c in rec["candidates"]]
    narrowest = min(range(len(cands)), key=lambda i: (sum(cands[i]), cands[i][0]))
    return rec["damage"][unit][r][narrowest]


def search_report(plan: Plan) -> str:
    """The plan's search as a table: one row per unit; per timestep range the chosen widths, and
    the unit's sensitivity (output SQNR, dB, with the unit alone at the narrowest candidate);
    then the budget, what was achieved and the measured SQNR of the whole plan."""
    rec = plan.search
    if not rec:
        raise ValueError("this plan was not made by search (it has no search record)")
    cands = [tuple(c) for c in rec["candidates"]]
    labels = range_labels(rec["bounds"])
    head = ["unit", "role", "metric"] + labels
    rows = []
    for u, choice in rec["choice"].items():
        cells = [f"W{cands[c][0]}A{cands[c][1]} ({nsr_db(_sensitivity(rec, u, r)):5.1f} dB)"
                 for r, c in enumerate(choice)]
        rows.append([u, rec["roles"][u], rec["metrics"][u]] + cells)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    b, a = rec["budget"], rec["achieved"]
    lines = [f"viditq search (base recipe {rec['base_recipe']!r}, {len(rec['choice'])} units, "
             f"{len(labels)} timestep range(s), {rec['seconds']:.1f} s); per range: chosen widths "
             f"(sensitivity: SQNR of the unit alone at the narrowest width)",
             fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in rows]
    lines.append("budget:   " + ", ".join(f"{k} {v:g}" for k, v in b.items() if v is not None))
    lines.append(f"achieved: weight_bits {a['weight_bits']:.3f}, act_bits {a['act_bits']:.3f}, "
                 f"weight_bytes {a['weight_bytes']}")
    lines.append("measured output SQNR per range: " +
                 ", ".join(f"{lab} {v:.1f} dB" for lab, v in zip(labels, rec["measured_sqnr_db"])))
    for name, a in (rec.get("attention") or {}).items():
        lines.append(f"attention {name} ({a['kind']}, {a['metric']} metric): int8 alone scores "
                     f"{a['db']:.1f} dB (worst range) -> {a['format']}")
    lines += [f"note: {n}" for n in rec["notes"]]
    return "\n".join(lines)


def write_heatmap(plan: Plan, path: str | os.PathLike) -> None:
    """PNG: units x timestep ranges, colour = sensitivity (damage at the narrowest width), mark =
    the chosen widths."""
    rec = plan.search
    if not rec:
        raise ValueError("this plan was not made by search (it has no search record)")
    cands = [tuple(c) for c in rec["candidates"]]
    units = list(rec["choice"])
    values = np.array([[_sensitivity(rec, u, r) for r in range(len(rec["choice"][u]))] for u in units])
    marks = [[f"W{cands[c][0]}A{cands[c][1]}" for c in rec["choice"][u]] for u in units]
    write_png(path, values, marks, units, range_labels(rec["bounds"]),
              title=f"viditq search: sensitivity and chosen widths ({rec['base_recipe']})",
              value_label="damage at the narrowest width")
