"""PNG bar charts of the block benchmark, drawn with numpy and ``viditq_compile.report.heatmap``'s PNG
encoder and 5x9 bitmap font (no matplotlib, no Pillow).

Three charts, one horizontal bar per variant in the order given, bars coloured by family
(fp: eager / inductor, torchao, viditq), the value written at each bar's end:

- ``block-latency.png``: median latency per call in ms, the min-max of the rounds as a thin whisker;
- ``block-speedup.png``: speed-up against a chosen baseline (median of the baseline / median of the
  variant), with a dashed reference line at 1.0x;
- ``block-weights.png``: weight bytes relative to the fp32 model.

``render_charts(rows)`` returns ``{file name: PNG bytes}``; ``rows`` are the dicts of
``benchmarks/report.py``'s ``load_rows`` (keys ``variant``, ``kind``, ``median_s``, ``min_s``,
``max_s``, ``weight_bytes``, ``rounds``). The same rows give the same bytes. ``bar_chart_png`` is
the generic chart; ``chart_layout`` its geometry. Bad input (no bars, a value that is not a finite
number >= 0, an unknown family, a missing baseline) raises ValueError naming the problem.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from viditq_compile.report.png import GLYPH_H, draw_text, encode_png, text_width

log = logging.getLogger("viditq.bench.charts")

# tab10 blue / orange / green: distinct, and each takes dark text beside it on white
FAMILY_COLORS = {"fp": (31, 119, 180), "torchao": (255, 127, 14), "viditq": (44, 160, 44)}
FAMILY_LABELS = {"fp": "fp (eager / inductor)", "torchao": "torchao int8", "viditq": "viditq"}
INK, GRID, WHITE, REF_COLOR = (40, 40, 40), (225, 225, 225), (255, 255, 255), (214, 39, 40)

MARGIN, GAP, PAD = 10, 6, 3
BAR_H = GLYPH_H + 2 * PAD  # a bar is as tall as a line of text plus padding
ROW_PITCH = BAR_H + 5  # bar tops are this far apart; the plot has 5 px above the first bar
TICK = 3  # tick marks below the axis, px
SWATCH = GLYPH_H
PLOT_W = 480  # px from the zero line to the last tick

FP32_EAGER, BF16_COMPILED = "fp32-eager", "bf16-inductor"
FILES = {"latency": "block-latency.png", "speedup": "block-speedup.png", "weights": "block-weights.png"}


@dataclass(frozen=True)
class Bar:
    """One bar: ``value`` >= 0 drawn from 0; ``whisker`` (lo, hi) as a thin line across it;
    ``text`` written right of the bar (or of its whisker, whichever ends further right)."""
    label: str
    value: float
    family: str
    text: str = ""
    whisker: tuple[float, float] | None = None


@dataclass(frozen=True)
class Reference:
    """A dashed vertical line at ``value`` with ``label`` above the plot."""
    value: float
    label: str


@dataclass(frozen=True)
class ChartLayout:
    """Pixel geometry. Bar ``i`` covers y in ``[bar_y(i), bar_y(i) + BAR_H)`` and x from
    ``plot_x`` to ``x_of(value)``; the axis runs from 0 at ``plot_x`` to ``axis_max`` at
    ``plot_x + plot_w``, with a tick at every multiple of ``tick_step``."""
    width: int
    height: int
    plot_x: int
    plot_y: int
    plot_w: int
    plot_h: int
    axis_max: float
    tick_step: float
    tick_decimals: int

    def x_of(self, value: float) -> int:
        return self.plot_x + int(round(value / self.axis_max * self.plot_w))

    def bar_y(self, i: int) -> int:
        return self.plot_y + (ROW_PITCH - BAR_H) + i * ROW_PITCH

    @property
    def ticks(self) -> list[float]:
        n = int(round(self.axis_max / self.tick_step))
        return [k * self.tick_step for k in range(n + 1)]

    def tick_label(self, value: float) -> str:
        return f"{value:.{self.tick_decimals}f}"


# ----------------------------------------------------------------------------- checks


def _number(value, what: str) -> float:
    """``value`` as a float; ValueError unless it is a finite number >= 0."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} is {value!r}, not a number") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{what} is {value!r}: it must be a finite number >= 0")
    return v


def _check_bars(bars: Sequence[Bar], references: Sequence[Reference]) -> None:
    if not bars:
        raise ValueError("no variants to chart: the list of bars is empty")
    for b in bars:
        _number(b.value, f"bar {b.label!r}: value")
        if b.family not in FAMILY_COLORS:
            raise ValueError(f"bar {b.label!r}: unknown family {b.family!r} (one of {sorted(FAMILY_COLORS)})")
        if b.whisker is not None:
            lo = _number(b.whisker[0], f"bar {b.label!r}: whisker low end")
            hi = _number(b.whisker[1], f"bar {b.label!r}: whisker high end")
            if lo > hi:
                raise ValueError(f"bar {b.label!r}: whisker low end {lo} is above its high end {hi}")
    for r in references:
        _number(r.value, f"reference line {r.label!r}: value")


# ----------------------------------------------------------------------------- layout


def nice_step(vmax: float, target: int = 5) -> tuple[float, int]:
    """A tick step of 1, 2, 2.5 or 5 x 10^k giving at most about ``target`` intervals up to
    ``vmax`` (> 0), and the decimals its labels need."""
    raw = vmax / target
    exp = math.floor(math.log10(raw))
    for mult in (1, 2, 2.5, 5, 10):
        step = mult * 10.0 ** exp
        if step >= raw * (1 - 1e-12):
            break
    # digits after the point: 10^exp needs -exp of them, 2.5 x 10^exp one more, 10 x 10^exp one fewer
    decimals = max(0, -exp + (1 if mult == 2.5 else -1 if mult == 10 else 0))
    return step, decimals


def _layout(bars, title, subtitle, axis_label, references, plot_w) -> ChartLayout:
    top = max([b.value for b in bars] + [b.whisker[1] for b in bars if b.whisker]
              + [r.value for r in references])
    step, decimals = nice_step(top if top > 0 else 1.0)
    axis_max = step * max(1, math.ceil(top / step - 1e-9))
    # headings, top to bottom: title (double size), subtitle, family legend, reference labels
    y = MARGIN + 2 * GLYPH_H + GAP
    if subtitle:
        y += GLYPH_H + GAP
    y += GLYPH_H + GAP  # legend
    if references:
        y += GLYPH_H + PAD
    plot_y = y
    plot_h = (ROW_PITCH - BAR_H) + len(bars) * ROW_PITCH + (ROW_PITCH - BAR_H)
    plot_x = MARGIN + max(text_width(b.label) for b in bars) + GAP
    height = plot_y + plot_h + TICK + PAD + GLYPH_H + GAP + GLYPH_H + MARGIN
    lay = ChartLayout(0, height, plot_x, plot_y, plot_w, plot_h, axis_max, step, decimals)
    right = [plot_x + plot_w + text_width(lay.tick_label(axis_max)) // 2 + 1,
             MARGIN + text_width(title, 2), MARGIN + text_width(subtitle or ""),
             MARGIN + _legend_width(bars), plot_x + (plot_w + text_width(axis_label)) // 2]
    for b in bars:
        end = max(b.value, b.whisker[1] if b.whisker else 0.0)
        right.append(lay.x_of(end) + PAD + 1 + text_width(b.text))
    for r in references:
        right.append(_ref_label_x(lay, r) + text_width(r.label))
    return ChartLayout(max(right) + MARGIN, height, plot_x, plot_y, plot_w, plot_h, axis_max, step, decimals)


def _families(bars) -> list[str]:
    present = {b.family for b in bars}
    return [f for f in FAMILY_COLORS if f in present]


def _legend_width(bars) -> int:
    return sum(SWATCH + PAD + text_width(FAMILY_LABELS[f]) + 2 * GAP for f in _families(bars)) - 2 * GAP


def _ref_label_x(lay: ChartLayout, ref: Reference) -> int:
    return max(lay.plot_x, lay.x_of(ref.value) - text_width(ref.label) // 2)


def chart_layout(bars: Sequence[Bar], *, title: str, subtitle: str = "", axis_label: str = "",
                 references: Sequence[Reference] = (), plot_w: int = PLOT_W) -> ChartLayout:
    """The geometry ``bar_chart_png`` draws with for these arguments."""
    _check_bars(bars, references)
    return _layout(bars, title, subtitle, axis_label, references, plot_w)


# ----------------------------------------------------------------------------- drawing


def bar_chart_png(bars: Sequence[Bar], *, title: str, subtitle: str = "", axis_label: str = "",
                  references: Sequence[Reference] = (), plot_w: int = PLOT_W) -> bytes:
    """PNG bytes of a horizontal bar chart: labels right-aligned left of the bars, the x axis with
    ticks below them, ``axis_label`` under the ticks, the title, subtitle and a legend of the
    families present above. Raises ValueError naming the first bad bar or reference."""
    _check_bars(bars, references)
    lay = _layout(bars, title, subtitle, axis_label, references, plot_w)
    img = np.full((lay.height, lay.width, 3), 255, np.uint8)
    y = MARGIN
    draw_text(img, MARGIN, y, title, INK, scale=2)
    y += 2 * GLYPH_H + GAP
    if subtitle:
        draw_text(img, MARGIN, y, subtitle, INK)
        y += GLYPH_H + GAP
    x = MARGIN
    for fam in _families(bars):
        img[y:y + SWATCH, x:x + SWATCH] = FAMILY_COLORS[fam]
        draw_text(img, x + SWATCH + PAD, y, FAMILY_LABELS[fam], INK)
        x += SWATCH + PAD + text_width(FAMILY_LABELS[fam]) + 2 * GAP

    p0, p1 = lay.plot_y, lay.plot_y + lay.plot_h  # plot top, axis row
    for t in lay.ticks:  # grid, tick marks and their labels
        tx = lay.x_of(t)
        img[p0:p1, tx] = GRID
        img[p1:p1 + TICK, tx] = INK
        s = lay.tick_label(t)
        draw_text(img, tx - text_width(s) // 2, p1 + TICK + PAD, s, INK)
    if axis_label:
        draw_text(img, lay.plot_x + (lay.plot_w - text_width(axis_label)) // 2,
                  p1 + TICK + PAD + GLYPH_H + GAP, axis_label, INK)

    for i, b in enumerate(bars):
        by = lay.bar_y(i)
        draw_text(img, lay.plot_x - GAP - text_width(b.label), by + PAD, b.label, INK)
        x1 = lay.x_of(b.value)
        if b.value > 0:
            img[by:by + BAR_H, lay.plot_x:max(x1, lay.plot_x + 1)] = FAMILY_COLORS[b.family]
        end = x1
        if b.whisker is not None:
            lo, hi = lay.x_of(b.whisker[0]), lay.x_of(b.whisker[1])
            cy = by + BAR_H // 2
            img[cy, lo:hi + 1] = INK
            img[cy - 3:cy + 4, lo] = INK
            img[cy - 3:cy + 4, hi] = INK
            end = max(end, hi)
        draw_text(img, end + PAD + 1, by + PAD, b.text, INK)

    for r in references:  # dashed, over the bars; its label above the plot
        rx = lay.x_of(r.value)
        ys = np.arange(p0, p1)
        img[ys[(ys - p0) % 7 < 4], rx] = REF_COLOR
        draw_text(img, _ref_label_x(lay, r), p0 - GLYPH_H - PAD, r.label, REF_COLOR)
    img[p0:p1 + 1, lay.plot_x] = INK  # the zero line and the axis
    img[p1, lay.plot_x:lay.plot_x + lay.plot_w + 1] = INK
    return encode_png(img)


# ----------------------------------------------------------------------------- the benchmark's charts


def family_of(row: dict) -> str:
    kind, name = row.get("kind"), str(row["variant"])
    if kind == "viditq" or name.startswith("viditq"):
        return "viditq"
    if kind == "torchao" or name.startswith("torchao"):
        return "torchao"
    return "fp"


def _check_rows(rows: Sequence[dict]) -> None:
    if not rows:
        raise ValueError("no variants to chart: the list of benchmark rows is empty")
    for r in rows:
        name = r.get("variant")
        if _number(r.get("median_s"), f"variant {name!r}: median_s") <= 0:
            raise ValueError(f"variant {name!r}: median_s is {r['median_s']}, it must be > 0")
        for key in ("min_s", "max_s"):  # optional (the whisker)
            if r.get(key) is not None:
                _number(r[key], f"variant {name!r}: {key}")


def _by_name(rows: Sequence[dict], name: str, what: str) -> dict:
    for r in rows:
        if r["variant"] == name:
            return r
    raise ValueError(f"{what} {name!r} is not among the variants {[r['variant'] for r in rows]}")


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def latency_bars(rows: Sequence[dict]) -> list[Bar]:
    """A bar per row: median ms, written at its end, and the min-max whisker when both are known."""
    _check_rows(rows)
    bars = []
    for r in rows:
        lo, hi = r.get("min_s"), r.get("max_s")
        whisker = (lo * 1e3, hi * 1e3) if lo is not None and hi is not None else None
        bars.append(Bar(r["variant"], r["median_s"] * 1e3, family_of(r), _ms(r["median_s"]), whisker))
    return bars


def latency_chart(rows: Sequence[dict], *, title: str = "PixArt-Sigma block") -> bytes:
    """Median ms per call, min-max whisker."""
    bars = latency_bars(rows)
    rounds = rows[0].get("rounds")
    of = f" of {rounds} rounds" if rounds else ""
    return bar_chart_png(bars, title=f"{title}: latency",
                         subtitle=f"bar: median{of}, whisker: min to max (lower is better)",
                         axis_label="ms per call")


def speedup_chart(rows: Sequence[dict], baseline: str = BF16_COMPILED, *,
                  title: str = "PixArt-Sigma block") -> bytes:
    """Median of ``baseline`` / median of each variant, reference line at 1.0x."""
    _check_rows(rows)
    base = _by_name(rows, baseline, "baseline")["median_s"]
    bars = [Bar(r["variant"], base / r["median_s"], family_of(r), f"{base / r['median_s']:.2f}x")
            for r in rows]
    return bar_chart_png(bars, title=f"{title}: speed-up vs {baseline}",
                         subtitle=f"median of {baseline} / median of the variant (higher is better)",
                         axis_label=f"x {baseline}", references=[Reference(1.0, f"1.0x = {baseline}")])


def weight_chart(rows: Sequence[dict], reference: str = FP32_EAGER, *,
                 title: str = "PixArt-Sigma block") -> bytes:
    """Weight bytes / weight bytes of ``reference``; rows without a byte count are left out."""
    _check_rows(rows)
    ref = _number(_by_name(rows, reference, "reference").get("weight_bytes"),
                  f"variant {reference!r}: weight_bytes")
    if ref <= 0:
        raise ValueError(f"variant {reference!r}: weight_bytes is {ref}, it must be > 0")
    bars = []
    for r in rows:
        if r.get("weight_bytes") is None:
            continue
        n = _number(r["weight_bytes"], f"variant {r['variant']!r}: weight_bytes")
        bars.append(Bar(r["variant"], n / ref, family_of(r), f"{n / ref:.3f}x  {n / 2**20:.2f} MiB"))
    return bar_chart_png(bars, title=f"{title}: weight memory",
                         subtitle=f"bytes of weights, scales and biases / bytes of {reference} (lower is better)",
                         axis_label=f"x {reference} weight bytes")


def render_charts(rows: Sequence[dict], *, baseline: str = BF16_COMPILED, weight_reference: str = FP32_EAGER,
                  title: str = "PixArt-Sigma block") -> dict[str, bytes]:
    """``{file name: PNG}`` for the three charts (``FILES``); the speed-up chart is left out when
    ``baseline`` was not run, the weight chart when ``weight_reference`` was not or has no bytes."""
    _check_rows(rows)
    names = {r["variant"] for r in rows}
    out = {FILES["latency"]: latency_chart(rows, title=title)}
    if baseline in names:
        out[FILES["speedup"]] = speedup_chart(rows, baseline, title=title)
    else:
        log.warning("no speed-up chart: baseline %r was not run", baseline)
    if weight_reference in names and _by_name(rows, weight_reference, "reference").get("weight_bytes"):
        out[FILES["weights"]] = weight_chart(rows, weight_reference, title=title)
    else:
        log.warning("no weight chart: %r was not run or has no weight bytes", weight_reference)
    return out
