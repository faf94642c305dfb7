import io
import struct
import zlib

import numpy as np
import pytest

from viditq_compile.report.heatmap import heatmap_layout, heatmap_png, range_labels, write_heatmap
from viditq_compile.report.png import encode_png

WHITE = (255, 255, 255)
COLS = range_labels([250, 500, 750])


def decode_png(png: bytes) -> np.ndarray:
    """A decoder for exactly what encode_png promises: RGB8, no interlace, filter 0 on every row,
    chunks with valid CRCs. Independent of Pillow, so a Pillow quirk cannot hide an encoder bug."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, kinds, idat, header = 8, [], b"", None
    while pos < len(png):
        (n,) = struct.unpack(">I", png[pos:pos + 4])
        kind, data = png[pos + 4:pos + 8], png[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", png[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(kind + data) & 0xFFFFFFFF, f"bad CRC on {kind}"
        kinds.append(kind)
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", data)
        elif kind == b"IDAT":
            idat += data
        pos += 12 + n
    assert kinds == [b"IHDR", b"IDAT", b"IEND"] and pos == len(png)
    w, h, depth, color_type, compression, filt, interlace = header
    assert (depth, color_type, compression, filt, interlace) == (8, 2, 0, 0, 0)
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + 3 * w)
    assert (rows[:, 0] == 0).all(), "every scanline uses filter type 0"
    return rows[:, 1:].reshape(h, w, 3)


def pillow_decode(png: bytes) -> np.ndarray:
    image = pytest.importorskip("PIL.Image", reason="Pillow is not installed (it comes with diffusers)")
    im = image.open(io.BytesIO(png))
    assert im.format == "PNG" and im.mode == "RGB"
    return np.asarray(im)


def luminance(rgb) -> float:
    c = np.asarray(rgb, np.float64) / 255.0
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return float(0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2])


def wcag_contrast(a, b) -> float:
    la, lb = sorted((luminance(a), luminance(b)))
    return (lb + 0.05) / (la + 0.05)


def cell(img, lay, i, j):
    x, y = lay.grid_x + j * lay.pitch_x, lay.grid_y + i * lay.pitch_y
    return img[y:y + lay.cell_h, x:x + lay.cell_w]


def render(values, marks=None, rows=None, cols=None, **kw):
    values = np.asarray(values, np.float64)
    rows = rows if rows is not None else [f"transformer_blocks.{i}.attn2.to_k" for i in range(values.shape[0])]
    cols = cols if cols is not None else [f"r{j}" for j in range(values.shape[1])]
    png = heatmap_png(values, marks, rows, cols, **kw)
    return decode_png(png), heatmap_layout(values, marks, rows, cols, **kw)


def colorbar(img, lay):
    """The bar's pixels, top (largest value) first, read from the picture itself."""
    col = img[lay.bar_y:, lay.bar_x + 2]
    end = int(np.argmax((col == WHITE).all(-1)))
    return col[:end].astype(np.int64)


def test_encode_png_matches_pillow_and_reference_decoder():
    rgb = np.random.default_rng(0).integers(0, 256, (7, 13, 3), dtype=np.uint8)
    png = encode_png(rgb)
    np.testing.assert_array_equal(decode_png(png), rgb)
    np.testing.assert_array_equal(pillow_decode(png), rgb)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((4, 4), np.uint8), r"\[H, W, 3\]"),
    (np.zeros((4, 4, 4), np.uint8), r"\[H, W, 3\]"),
    (np.zeros((4, 4, 3), np.float32), "uint8"),
    (np.zeros((0, 4, 3), np.uint8), "non-empty"),
])
def test_encode_png_rejects(bad, match):
    with pytest.raises(ValueError, match=match):
        encode_png(bad)


def test_heatmap_decodes_identically_with_pillow():
    values = 10.0 ** np.random.default_rng(1).uniform(-6, 1, (5, 4))
    values[2, 1], values[4, 3] = 0.0, np.inf
    marks = [["W8A8", "W4A8", "W4A4", "4/8"]] * 5
    png = heatmap_png(values, marks, [f"blocks.{i}.ff" for i in range(5)], COLS, title="PixArt W4A8")
    np.testing.assert_array_equal(pillow_decode(png), decode_png(png))


def test_size_matches_layout():
    values = np.random.default_rng(2).uniform(0, 1, (40, 4))
    img, lay = render(values, cols=COLS, title="plan", value_label="relative damage, summed over the batch")
    assert img.shape == (lay.height, lay.width, 3)
    ink = np.nonzero((img != WHITE).any(-1))
    assert ink[0].max() < lay.height - 4 and ink[1].max() < lay.width - 4, "a margin is left on every side"
    assert lay.grid_x + 4 * lay.pitch_x <= lay.bar_x < lay.width
    assert lay.grid_y + 40 * lay.pitch_y <= lay.height
    # each cell is filled and one background pixel separates neighbours
    x, y = lay.cell_center(0, 0)
    assert tuple(img[y, x]) != WHITE
    assert tuple(img[y, lay.grid_x + lay.cell_w]) == WHITE
    assert tuple(img[lay.grid_y + lay.cell_h, x]) == WHITE
    # independently of Layout: one more row (same range, so the same legend) is one more row pitch
    img2, _ = render(np.vstack([values, values[:1]]), cols=COLS, title="plan",
                     value_label="relative damage, summed over the batch")
    assert img2.shape[0] - img.shape[0] == lay.cell_h + 1 and img2.shape[1] == img.shape[1]


def test_larger_value_is_later_in_colormap_on_a_log_scale():
    values = np.array([[1e-6, 1e-4, 1e-2, 1.0, 1e2]])
    img, lay = render(values)
    colors = [cell(img, lay, 0, j)[0, 0].astype(np.int64) for j in range(5)]
    # viridis brightens monotonically in green from dark purple to yellow
    greens = [c[1] for c in colors]
    assert greens == sorted(greens) and len(set(greens)) == 5
    # each cell's colour sits on the picture's own colour bar, larger values higher up
    bar = colorbar(img, lay)
    pos = [int(np.argmin(((bar - c) ** 2).sum(-1))) for c in colors]
    assert all(((bar[p] - c) ** 2).sum() <= 12 for p, c in zip(pos, colors))
    assert pos == sorted(pos, reverse=True)
    # log scale: evenly spaced decades are evenly spaced along the bar
    steps = np.diff(pos[::-1]) / (len(bar) - 1)
    np.testing.assert_allclose(steps, 0.25, atol=0.02)


def test_marks_contrast_with_their_cells():
    values = np.array([[1e-6, 1e-3, 1.0], [0.3, 1e-2, np.inf]])
    marks = [["W8A8", "W4A8", "W4A4"], ["W8A8", "W4A8", "W4A4"]]
    img, lay = render(values, marks)
    masks = {}
    for i in range(2):
        for j in range(3):
            c = cell(img, lay, i, j)
            bg = tuple(c[0, 0])
            text = (c != bg).any(-1)
            assert text.sum() > 10, f"no mark drawn in cell ({i}, {j})"
            ink = {tuple(p) for p in c[text]}
            assert len(ink) == 1 and ink <= {(0, 0, 0), WHITE}, ink
            assert wcag_contrast(ink.pop(), bg) >= 4.5
            masks[i, j] = text
    # the mark is the text itself: same string, same pixels whatever the colour underneath
    for j in range(3):
        np.testing.assert_array_equal(masks[0, j], masks[1, j])
    assert (masks[0, 0] != masks[0, 1]).any()
    # without marks the cells are flat colour
    img, lay = render(values, None)
    assert all(len(np.unique(cell(img, lay, i, j).reshape(-1, 3), axis=0)) == 1
               for i in range(2) for j in range(3))


def test_row_labels_drawn_right_aligned_and_truncated_from_the_left():
    head_a, head_b = "a" * 80, "b" + "a" * 79
    rows = [head_a + ".17.attn2.to_k", head_b + ".17.attn2.to_k", head_a + ".17.attn2.to_v", ""]
    img, lay = render(np.ones((4, 2)), rows=rows)

    def label(i):
        y = lay.grid_y + i * lay.pitch_y
        return img[y:y + lay.cell_h, :lay.grid_x]

    dark = [(label(i) < 128).all(-1) for i in range(4)]
    assert dark[0].any()
    assert lay.grid_x - 12 <= np.nonzero(dark[0].any(0))[0].max() < lay.grid_x
    np.testing.assert_array_equal(label(0), label(1))  # heads dropped, the tail kept
    assert (label(0) != label(2)).any()
    assert not dark[3].any()


def test_inf_is_red_and_zero_is_drawn_at_the_minimum():
    values = np.array([[0.0, 1e-3], [1.0, np.inf]])
    img, lay = render(values)
    np.testing.assert_array_equal(cell(img, lay, 0, 0)[0, 0], cell(img, lay, 0, 1)[0, 0])
    r, g, b = (int(v) for v in cell(img, lay, 1, 1)[0, 0])
    assert r > 200 and g < 60 and b < 100
    legend = img[:, lay.bar_x:]
    assert ((legend == (r, g, b)).all(-1)).sum() > 50, "the legend shows the inf colour"
    assert not (colorbar(img, lay) == (r, g, b)).all(-1).any(), "inf is no colormap colour"


@pytest.mark.parametrize("values", [np.full((3, 2), 0.25), np.zeros((3, 2)), np.full((3, 2), np.inf),
                                    np.array([[7.0]])], ids=["equal", "zeros", "inf", "1x1"])
def test_degenerate_values_render_uniformly(values):
    img, lay = render(values, [["W4A8"] * values.shape[1]] * values.shape[0])
    corners = {tuple(cell(img, lay, i, j)[0, 0]) for i in range(values.shape[0]) for j in range(values.shape[1])}
    assert len(corners) == 1 and corners != {WHITE}


GOOD = dict(values=np.ones((2, 3)), marks=None, row_labels=["a", "b"], col_labels=["x", "y", "z"])


@pytest.mark.parametrize("change, match", [
    (dict(values=np.ones(3)), r"2-D.*\(3,\)"),
    (dict(values=np.ones((2, 3, 1))), r"2-D.*\(2, 3, 1\)"),
    (dict(values=np.ones((0, 3)), row_labels=[]), "non-empty"),
    (dict(values=[[1.0, -0.5, 1.0], [1.0, 1.0, 1.0]]), r"values\[0, 1\] = -0.5"),
    (dict(values=[[1.0, 1.0, 1.0], [1.0, 1.0, np.nan]]), r"values\[1, 2\] = nan"),
    (dict(values=[[-np.inf, 1.0, 1.0], [1.0, 1.0, 1.0]]), r"values\[0, 0\] = -inf"),
    (dict(values=[["a", "b", "c"], ["d", "e", "f"]]), "numbers"),
    (dict(row_labels=["a"]), r"row_labels must be a sequence of 2 labels.*\['a'\]"),
    (dict(row_labels="ab"), "row_labels"),
    (dict(col_labels=["x", "y"]), r"col_labels must be a sequence of 3"),
    (dict(marks=[["W8A8"] * 3]), "marks must have 2 rows"),
    (dict(marks=[["W8A8"] * 3, ["W8A8"] * 2]), r"marks\[1\] must have 3 entries"),
])
def test_bad_inputs_raise_naming_the_value(change, match):
    kw = {**GOOD, **change}
    with pytest.raises(ValueError, match=match):
        heatmap_png(kw["values"], kw["marks"], kw["row_labels"], kw["col_labels"])


def test_deterministic_bytes_and_write_heatmap(tmp_path):
    values = np.array([[1e-5, 2.0], [0.0, np.inf]])
    args = (values, [["W8A8", "W4A8"], ["W4A4", "W4A4"]], ["blocks.0.attn1.to_q", "blocks.0.ff"], COLS[:2])
    png = heatmap_png(*args, title="t")
    assert heatmap_png(*args, title="t") == png
    assert heatmap_png(values * 2, *args[1:], title="t") != png
    write_heatmap(tmp_path / "plan.png", *args, title="t")
    assert (tmp_path / "plan.png").read_bytes() == png


def test_range_labels():
    assert COLS == ["t<=250", "250<t<=500", "500<t<=750", "t>750"]
    assert range_labels([]) == ["all t"]
