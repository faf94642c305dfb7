"""The quantization report: one row per linear layer, what it became or why it did not."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Optional


@dataclass(frozen=True)
class LayerReport:
    name: str
    in_features: int
    out_features: int
    weight_bits: Optional[int]
    act_bits: Optional[int]
    op: str
    note: str = ""
    balance: str = ""

    @property
    def quantized(self) -> bool:
        return self.weight_bits is not None


class Report:
    """Rows in graph order. ``str(report)`` is a table; ``report.records()`` the same as dicts."""

    def __init__(self, rows: Iterable[LayerReport], title: str = ""):
        self.rows = list(rows)
        self.title = title

    @property
    def num_quantized(self) -> int:
        return sum(r.quantized for r in self.rows)

    @property
    def num_fp(self) -> int:
        return len(self.rows) - self.num_quantized

    def records(self) -> list[dict]:
        return [asdict(r) for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def summary(self) -> str:
        return (f"{self.num_quantized} of {len(self.rows)} linear layers quantized, "
                f"{self.num_fp} kept in floating point")

    def __str__(self) -> str:
        head = ("layer", "shape (out x in)", "W", "A", "balance", "op", "note")
        body = [(r.name, f"{r.out_features} x {r.in_features}",
                 str(r.weight_bits) if r.quantized else "fp",
                 str(r.act_bits) if r.quantized else "fp", r.balance or "-", r.op, r.note)
                for r in self.rows]
        widths = [max(len(str(c)) for c in col) for col in zip(head, *body)] if body else \
            [len(h) for h in head]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [self.title] if self.title else []
        lines += [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*row) for row in body]
        lines.append(self.summary())
        return "\n".join(lines)

    __repr__ = __str__


def build_report(plan, title: str = "") -> Report:
    """The report of a plan as applied by the quantize pass (one row per layer)."""
    rows = []
    for lp in plan.layers.values():
        if lp.quantized:
            notes = ["asymmetric weights"] if not lp.weight_sym else []
            if lp.weight_group:
                notes.append(f"group {lp.weight_group}")
            if lp.act_static:
                notes.append("static per-tensor activations")
            if lp.note:
                notes.append(lp.note)
            balance = ""
            if lp.balance:
                balance = lp.balance + (f" a={lp.alpha:g}" if lp.alpha is not None else "")
            op = "viditq.w8a8_linear" if lp.single_op else "viditq.qlinear"
            rows.append(LayerReport(lp.name, lp.in_features, lp.out_features, lp.weight_bits,
                                    lp.act_bits, op, "; ".join(notes), balance))
        else:
            rows.append(LayerReport(lp.name, lp.in_features, lp.out_features, None, None,
                                    "aten.linear (fp)", lp.reason or ""))
    return Report(rows, title)
