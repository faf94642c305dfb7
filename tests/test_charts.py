"""benchmarks/charts.py (PNG bar charts of the block benchmark) and its use by benchmarks/report.py,
on a synthetic pytest-benchmark JSON."""

import copy
import importlib.util
import math
import pathlib
import struct
import sys
import zlib

import numpy as np
import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    """A benchmarks/ script by path: benchmarks/ is not a package and tests do not edit sys.path."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


charts = _load("charts")
report = _load("report")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# variant: (kind, median ms, min ms, max ms, weight MiB, SQNR dB)
VARIANTS = {
    "fp32-eager": ("eager", 500.0, 490.0, 520.0, 80.0, None),
    "bf16-inductor": ("inductor", 300.0, 290.0, 310.0, 40.0, 49.0),
    "torchao-int8-bf16": ("torchao", 200.0, 198.0, 204.0, 20.0, 35.7),
    "viditq-w8a8-bf16": ("viditq", 180.0, 175.0, 190.0, 20.1, 35.6),
}


def bench_json(variants=VARIANTS) -> dict:
    benchmarks = []
    for name, (kind, med, lo, hi, mib, sqnr) in variants.items():
        benchmarks.append({
            "group": "pixart-block", "name": f"test_pixart_block[{name}]", "param": name,
            "stats": {"median": med / 1e3, "min": lo / 1e3, "max": hi / 1e3, "mean": med / 1e3,
                      "stddev": 0.001, "rounds": 5},
            "extra_info": {"variant": name, "kind": kind, "dtype": "bf16", "weight_bytes": int(mib * 2**20),
                           "compile_s": 0.0 if kind == "eager" else 12.5, "sqnr_db": sqnr,
                           "peak_rss_delta_mb": 100.0, "rss_delta_mb": 90.0, "rounds": 5,
                           "config": {"dim": 64, "heads": 2, "head_dim": 32, "batch": 2, "tokens": 16,
                                      "text_tokens": 8}},
        })
    return {"benchmarks": benchmarks, "machine_info": {"cpu": {"brand_raw": "Test CPU", "count": 2}},
            "datetime": "2026-01-01T00:00:00", "version": "5.3.1"}


def decode(png: bytes) -> np.ndarray:
    """[H, W, 3] pixels of what heatmap.encode_png writes (RGB8, filter 0, IHDR / IDAT / IEND)."""
    assert png[:8] == PNG_SIGNATURE
    w, h = struct.unpack(">II", png[16:24])
    (n,) = struct.unpack(">I", png[33:37])
    assert png[37:41] == b"IDAT"
    rows = np.frombuffer(zlib.decompress(png[41:41 + n]), np.uint8).reshape(h, 1 + 3 * w)
    return rows[:, 1:].reshape(h, w, 3)


def test_charts_are_pngs_of_the_layout_size_and_deterministic():
    rows = report.load_rows(bench_json())
    pngs = charts.render_charts(rows)
    assert sorted(pngs) == ["block-latency.png", "block-speedup.png", "block-weights.png"]
    for png in pngs.values():
        assert png[:8] == PNG_SIGNATURE and png[12:16] == b"IHDR"
    again = charts.render_charts(report.load_rows(copy.deepcopy(bench_json())))
    assert again == pngs, "the same JSON gives the same bytes"

    # the latency chart: size from chart_layout; one more variant adds exactly one row pitch
    bars = charts.latency_bars(rows)
    assert [b.text for b in bars] == ["500.0", "300.0", "200.0", "180.0"]
    assert bars[0].whisker == pytest.approx((490.0, 520.0))
    img = decode(pngs["block-latency.png"])
    lay = charts.chart_layout(bars, title="PixArt-Sigma block: latency",
                              subtitle="bar: median of 5 rounds, whisker: min to max (lower is better)",
                              axis_label="ms per call")
    assert img.shape == (lay.height, lay.width, 3)
    more = dict(VARIANTS, **{"bf16-eager": ("eager", 290.0, 280.0, 300.0, 40.0, 47.5)})
    img2 = decode(charts.latency_chart(report.load_rows(bench_json(more))))
    assert img2.shape[0] - img.shape[0] == charts.ROW_PITCH and img2.shape[1] == img.shape[1]

    # bars: family colour from the zero line to the median; the axis reaches past the largest whisker
    assert lay.axis_max >= 520.0 and lay.ticks[0] == 0.0 and math.isclose(lay.ticks[-1], lay.axis_max)
    for i, r in enumerate(rows):
        y = lay.bar_y(i) + 1
        colour = charts.FAMILY_COLORS[charts.family_of(r)]
        assert tuple(img[y, lay.plot_x + 2]) == colour
        assert tuple(img[y, lay.x_of(r["median_s"] * 1e3) - 1]) == colour
        assert tuple(img[y, lay.x_of(r["median_s"] * 1e3) + 1]) != colour


def test_speedup_chart_has_a_reference_line_at_one():
    rows = report.load_rows(bench_json())
    bars = [charts.Bar(r["variant"], 0.3 / r["median_s"], charts.family_of(r)) for r in rows]
    ref = charts.Reference(1.0, "1.0x = bf16-inductor")
    lay = charts.chart_layout(bars, title="t", references=[ref])
    img = decode(charts.bar_chart_png(bars, title="t", references=[ref]))
    column = img[lay.plot_y:lay.plot_y + lay.plot_h, lay.x_of(1.0)]
    assert (column == charts.REF_COLOR).all(-1).sum() > lay.plot_h // 3, "a dashed red line at 1.0x"


def test_bad_input_raises_value_error_naming_the_problem():
    with pytest.raises(ValueError, match="no variants"):
        charts.render_charts([])
    with pytest.raises(ValueError, match="no variants"):
        charts.bar_chart_png([], title="t")
    for bad in (float("nan"), float("inf"), None):
        rows = report.load_rows(bench_json())
        rows[2]["median_s"] = bad
        with pytest.raises(ValueError, match=r"'torchao-int8-bf16': median_s"):
            charts.latency_chart(rows)
    with pytest.raises(ValueError, match="'b': value"):
        charts.bar_chart_png([charts.Bar("a", 1.0, "fp"), charts.Bar("b", -1.0, "fp")], title="t")
    with pytest.raises(ValueError, match="unknown family 'gpu'"):
        charts.bar_chart_png([charts.Bar("a", 1.0, "gpu")], title="t")
    with pytest.raises(ValueError, match="baseline 'fp16-eager' is not among"):
        charts.speedup_chart(report.load_rows(bench_json()), "fp16-eager")


def test_report_writes_charts_and_links_them(tmp_path, capsys):
    src = tmp_path / "run.json"
    src.write_text(report.json.dumps(bench_json()))
    out = tmp_path / "RESULTS.md"
    out.write_text("# Results\n\nkept\n")
    assert report.main([str(src), "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Results\n\nkept\n") and report.START in text and report.END in text
    for name in ("block-latency.png", "block-speedup.png", "block-weights.png"):
        assert f"](charts/{name})" in text
        assert (tmp_path / "charts" / name).read_bytes()[:8] == PNG_SIGNATURE
    assert "| variant | median ms | min ms | max ms | vs fp32 eager | vs bf16 compiled |" in text
    assert "peak RSS Δ MiB" in text and "compile s" in text

    capsys.readouterr()
    assert report.main([str(src), "--out", str(out), "--headline"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| variant | median ms | vs bf16 compiled | vs torchao int8 (bf16) | weight MiB | SQNR dB |"
    assert lines[2:6] == ["| `fp32-eager` | 500.0 | 0.60× | 0.40× | 80.00 | ref |",
                          "| `bf16-inductor` | 300.0 | 1.00× | 0.67× | 40.00 | 49.0 |",
                          "| `torchao-int8-bf16` | 200.0 | 1.50× | 1.00× | 20.00 | 35.7 |",
                          "| `viditq-w8a8-bf16` | 180.0 | 1.67× | 1.11× | 20.10 | 35.6 |"]
    assert out.read_text() == text, "--headline writes nothing"


def test_report_rewrites_only_the_readme_numbers_block(tmp_path):
    src = tmp_path / "run.json"
    src.write_text(report.json.dumps(bench_json()))
    out, readme = tmp_path / "RESULTS.md", tmp_path / "README.md"
    before, after = "# Tool\n\nintro\n", "\nhand-written notes\n"
    readme.write_text(f"{before}{report.README_START}\nstale table\n{report.README_END}{after}")
    assert report.main([str(src), "--out", str(out), "--no-chart", "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith(before) and text.endswith(after) and "stale table" not in text
    assert "| `viditq-w8a8-bf16` | 180.0 | 1.67× | 1.11× | 20.10 | 35.6 |" in text
    assert "Generated by `make bench` (2026-01-01" in text
    # a README without the markers is refused, not appended to
    readme.write_text("# Tool\n")
    assert report.main([str(src), "--out", str(out), "--no-chart", "--readme", str(readme)]) == 2
    assert readme.read_text() == "# Tool\n"
