"""A PNG heat map of a mixed-precision plan: layers x timestep ranges, coloured by sensitivity.

Only numpy and the standard library, so a search can leave a picture behind on any machine:
the PNG encoder, the colormap and a 5x9 bitmap font are here.

Picture, top to bottom: the title (double size); the column labels centred over their columns;
the grid, one row per layer with its label right-aligned to its left (long names lose their head,
``..blocks.17.attn2.to_k``), each cell filled with the colour of its value on a log scale and the
chosen widths (``marks``) written in black or white, whichever contrasts more. Right of the grid,
the colour bar: ``value_label`` above it, the maximum at its top, the minimum at its bottom, and,
when they occur, a red swatch for ``inf`` and a note that zeros are drawn at the minimum.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from viditq_compile.report.png import GLYPH_H, GLYPH_W, draw_text, encode_png, text_width

# --- colour ------------------------------------------------------------------------------------

# viridis (matplotlib) at 0, 1/8, ..., 1: perceptually uniform, monotone in lightness, legible in
# grey and to the colour-blind; linear interpolation between nine anchors stays within a few levels.
_VIRIDIS = np.array([
    (68, 1, 84), (71, 45, 123), (59, 82, 139), (44, 114, 142), (33, 145, 140),
    (39, 173, 129), (94, 201, 98), (173, 220, 48), (253, 231, 37)], np.float64)
INF_COLOR = (220, 20, 60)  # red: no viridis colour is near it
_WHITE, _BLACK, _INK = (255, 255, 255), (0, 0, 0), (40, 40, 40)


def colormap(t: np.ndarray) -> np.ndarray:
    """``t``: any shape, float in [0, 1] (clipped) -> [..., 3] uint8 viridis colours."""
    t = np.clip(np.asarray(t, np.float64), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    i = np.minimum(t.astype(np.int64), len(_VIRIDIS) - 2)
    f = (t - i)[..., None]
    return np.rint(_VIRIDIS[i] * (1 - f) + _VIRIDIS[i + 1] * f).astype(np.uint8)


def _luminance(rgb) -> float:
    """WCAG relative luminance of an sRGB colour."""
    c = np.asarray(rgb, np.float64) / 255.0
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return float(c @ np.array([0.2126, 0.7152, 0.0722]))


def contrast_ratio(a, b) -> float:
    la, lb = sorted((_luminance(a), _luminance(b)))
    return (lb + 0.05) / (la + 0.05)


def _text_color_on(bg) -> tuple:
    # the better of black and white always reaches a WCAG contrast ratio of at least 4.58
    return _BLACK if contrast_ratio(bg, _BLACK) >= contrast_ratio(bg, _WHITE) else _WHITE


def _fmt(v: float) -> str:
    return f"{v:.3g}"


# --- inputs and layout -------------------------------------------------------------------------

_MAX_ROW_LABEL, _MAX_COL_LABEL = 48, 16
_MARGIN, _PAD, _GAP = 8, 3, 6
_BAR_W, _BAR_H = 14, 160


def _truncate(label: str, n: int) -> str:
    # layer names share their heads (transformer_blocks.) and differ in their tails (17.attn2.to_k)
    return label if len(label) <= n else ".." + label[len(label) - n + 2:]


def range_labels(bounds: Sequence[float], name: str = "t") -> list[str]:
    """Column labels for the ranges of ``Plan.timestep_bounds``: ``t<=250``, ``250<t<=500``, ``t>500``."""
    b = [f"{x:g}" for x in bounds]
    if not b:
        return ["all " + name]
    return [f"{name}<={b[0]}"] + [f"{lo}<{name}<={hi}" for lo, hi in zip(b, b[1:])] + [f"{name}>{b[-1]}"]


def _check(values, marks, row_labels, col_labels) -> tuple[np.ndarray, list, list[str], list[str]]:
    try:
        v = np.array(values, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"values must be a 2-D array of numbers: {e}") from None
    if v.ndim != 2 or v.size == 0:
        raise ValueError(f"values must be a non-empty 2-D array [layers, ranges], got shape {v.shape}")
    n, m = v.shape
    bad = np.argwhere(np.isnan(v) | (v < 0))
    if len(bad):
        i, j = bad[0]
        raise ValueError(f"values[{i}, {j}] = {v[i, j]}: values must be >= 0 (inf allowed), not NaN or negative")
    for what, labels, want in (("row_labels", row_labels, n), ("col_labels", col_labels, m)):
        if isinstance(labels, str) or len(labels) != want:
            raise ValueError(f"{what} must be a sequence of {want} labels (values has shape {v.shape}), "
                             f"got {labels!r}")
    if marks is not None:
        if isinstance(marks, str) or len(marks) != n:
            raise ValueError(f"marks must have {n} rows like values (shape {v.shape}), got {len(marks)}")
        for i, row in enumerate(marks):
            if isinstance(row, str) or len(row) != m:
                raise ValueError(f"marks[{i}] must have {m} entries like values (shape {v.shape}), got {row!r}")
        marks = [[str(s) for s in row] for row in marks]
    return v, marks, [_truncate(str(s), _MAX_ROW_LABEL) for s in row_labels], \
        [_truncate(str(s), _MAX_COL_LABEL) for s in col_labels]


@dataclass(frozen=True)
class Layout:
    """Pixel geometry. Cell ``(i, j)`` covers x in ``[grid_x + j * pitch_x, + cell_w)`` and y in
    ``[grid_y + i * pitch_y, + cell_h)``; one background pixel separates neighbouring cells."""
    width: int
    height: int
    grid_x: int
    grid_y: int
    cell_w: int
    cell_h: int
    bar_x: int
    bar_y: int

    @property
    def pitch_x(self) -> int:
        return self.cell_w + 1

    @property
    def pitch_y(self) -> int:
        return self.cell_h + 1

    def cell_center(self, i: int, j: int) -> tuple[int, int]:
        """(x, y) of the middle of cell (i, j)."""
        return self.grid_x + j * self.pitch_x + self.cell_w // 2, self.grid_y + i * self.pitch_y + self.cell_h // 2


@dataclass(frozen=True)
class _Legend:
    lo: float  # log10 of the smallest positive finite value
    hi: float
    heading: str  # above the bar
    top: str  # beside the bar's ends
    bottom: str
    notes: tuple[str, ...]  # under the bar: "inf" (with a red swatch), zeros


def _legend(v: np.ndarray, value_label: str) -> _Legend:
    finite = v[np.isfinite(v)]
    pos = finite[finite > 0]
    if pos.size:
        lo, hi, top, bottom = math.log10(pos.min()), math.log10(pos.max()), _fmt(pos.max()), _fmt(pos.min())
    else:
        lo = hi = 0.0
        top = bottom = "0" if finite.size else ""
    notes = []
    if np.isinf(v).any():
        notes.append("inf")
    if (finite == 0).any() and pos.size:
        notes.append("0 drawn as min")
    heading = value_label + (" (log)" if hi > lo else "")
    return _Legend(lo, hi, heading, top, bottom, tuple(notes))


def _layout(v, marks, row_labels, col_labels, title, legend: _Legend) -> Layout:
    n, m = v.shape
    mark_w = max((text_width(s) for row in marks for s in row), default=0) if marks else 0
    cell_w = max(mark_w, max(text_width(c) for c in col_labels), 2 * GLYPH_W) + 4 * _PAD
    cell_h = GLYPH_H + 2 * _PAD
    title_h = 2 * GLYPH_H + _GAP if title else 0
    label_w = max(text_width(s) for s in row_labels)
    grid_x = _MARGIN + label_w + _GAP
    grid_y = _MARGIN + title_h + GLYPH_H + _PAD
    grid_right, grid_bottom = grid_x + m * (cell_w + 1) - 1, grid_y + n * (cell_h + 1) - 1
    bar_x, bar_y = grid_right + 3 * _GAP, grid_y + GLYPH_H + _PAD
    text_right = max([bar_x + text_width(legend.heading)]
                     + [bar_x + _BAR_W + _GAP + text_width(s) for s in (legend.top, legend.bottom)]
                     + [bar_x + _BAR_W + _GAP + text_width(s) for s in legend.notes])
    legend_bottom = bar_y + _BAR_H + len(legend.notes) * (GLYPH_H + _GAP)
    width = max(text_right, _MARGIN + text_width(title, 2)) + _MARGIN
    return Layout(width, max(grid_bottom, legend_bottom) + _MARGIN, grid_x, grid_y, cell_w, cell_h, bar_x, bar_y)


def heatmap_layout(values, marks, row_labels, col_labels, *, title: str = "", value_label: str = "damage") -> Layout:
    """The geometry ``heatmap_png`` draws with for these arguments."""
    v, marks, row_labels, col_labels = _check(values, marks, row_labels, col_labels)
    return _layout(v, marks, row_labels, col_labels, title, _legend(v, value_label))


# --- drawing -----------------------------------------------------------------------------------


def _cell_colors(v: np.ndarray, legend: _Legend) -> np.ndarray:
    """[N, M] values -> [N, M, 3] uint8. Zeros sit at the smallest positive value (log scale)."""
    logv = np.log10(np.where(np.isfinite(v) & (v > 0), v, 10.0 ** legend.lo))
    span = legend.hi - legend.lo
    t = (logv - legend.lo) / span if span > 0 else np.full(v.shape, 0.5)  # all equal: mid-scale
    rgb = colormap(t)
    rgb[np.isinf(v)] = INF_COLOR
    return rgb


def heatmap_png(values: np.ndarray, marks: Sequence[Sequence[str]] | None, row_labels: Sequence[str],
                col_labels: Sequence[str], *, title: str = "", value_label: str = "damage") -> bytes:
    """PNG bytes of the heat map (module docstring).

    ``values``: [N layers, M ranges], float >= 0, ``inf`` allowed; colour on a log scale between the
    smallest and largest positive finite value. ``marks``: None or N rows of M strings (``"W4A8"``)
    written in the cells. ``row_labels``: N layer names; ``col_labels``: M range names
    (``range_labels``). Raises ValueError naming the first bad shape, label count or value.
    """
    v, marks, row_labels, col_labels = _check(values, marks, row_labels, col_labels)
    legend = _legend(v, value_label)
    lay = _layout(v, marks, row_labels, col_labels, title, legend)
    img = np.full((lay.height, lay.width, 3), 255, np.uint8)
    if title:
        draw_text(img, _MARGIN, _MARGIN, title, _INK, scale=2)
    colors = _cell_colors(v, legend)
    n, m = v.shape
    for j, label in enumerate(col_labels):
        x = lay.grid_x + j * lay.pitch_x + (lay.cell_w - text_width(label)) // 2
        draw_text(img, x, lay.grid_y - GLYPH_H - _PAD, label, _INK)
    for i in range(n):
        y = lay.grid_y + i * lay.pitch_y
        draw_text(img, lay.grid_x - _GAP - text_width(row_labels[i]), y + _PAD, row_labels[i], _INK)
        for j in range(m):
            x = lay.grid_x + j * lay.pitch_x
            img[y:y + lay.cell_h, x:x + lay.cell_w] = colors[i, j]
            if marks and marks[i][j]:
                s = marks[i][j]
                draw_text(img, x + (lay.cell_w - text_width(s)) // 2, y + _PAD, s, _text_color_on(colors[i, j]))
    _draw_legend(img, lay, legend)
    return encode_png(img)


def _draw_legend(img: np.ndarray, lay: Layout, legend: _Legend) -> None:
    x, y = lay.bar_x, lay.bar_y
    draw_text(img, x, y - GLYPH_H - _PAD, legend.heading, _INK)
    ramp = colormap(np.linspace(1.0, 0.0, _BAR_H))  # top of the bar = largest value
    img[y:y + _BAR_H, x:x + _BAR_W] = ramp[:, None, :]
    tx = x + _BAR_W + _GAP
    draw_text(img, tx, y, legend.top, _INK)
    draw_text(img, tx, y + _BAR_H - GLYPH_H, legend.bottom, _INK)
    for k, note in enumerate(legend.notes):
        ny = y + _BAR_H + _GAP + k * (GLYPH_H + _GAP)
        if note == "inf":
            img[ny:ny + GLYPH_H, x:x + _BAR_W] = INF_COLOR
        draw_text(img, tx, ny, note, _INK)


def write_heatmap(path: str | os.PathLike, values: np.ndarray, marks: Sequence[Sequence[str]] | None,
                  row_labels: Sequence[str], col_labels: Sequence[str], *, title: str = "",
                  value_label: str = "damage") -> None:
    """``heatmap_png`` written to ``path``."""
    png = heatmap_png(values, marks, row_labels, col_labels, title=title, value_label=value_label)
    with open(path, "wb") as f:
        f.write(png)
