#!/usr/bin/env python3
"""Turn the pytest-benchmark JSON of ``benchmarks/test_bench_block.py`` into ``RESULTS.md``.

Usage: ``python benchmarks/report.py benchmarks/runs/*.json [--out benchmarks/RESULTS.md]``

Only the block between ``<!-- block-benchmark:start -->`` and ``<!-- block-benchmark:end -->``
is (re)written; the rest of the file is kept. The block has two tables (latency: medians, min,
max, speed-ups against each baseline -- fp32 eager, bf16 compiled, torchao int8 -- and SQNR;
memory and compile time: weight bytes, peak RSS, compile seconds), links to three PNG charts
(``benchmarks/charts.py``: latency, speed-up vs ``--chart-baseline``, weight bytes vs fp32) written
to ``charts/`` next to the output, and the issue's targets as PASS/FAIL lines (the exit status is
0 either way unless ``--strict``).

When the JSON holds the video block (group ``stdit3-block``: an OpenSORA STDiT3 spatial + temporal
block pair), a second block between ``<!-- video-benchmark:start -->`` and
``<!-- video-benchmark:end -->`` gets its latency table (speed-ups against bf16 compiled and torchao
int8, SQNR against its fp32 eager output, weight bytes, compile seconds).

``--headline`` writes nothing: it prints the compact table for the README (variant, median ms,
speed-up vs bf16 compiled and vs torchao int8, weight MiB, SQNR) in Markdown.

Speed-ups are ratios of medians. The tables need only the standard library; the charts numpy and
``viditq_compile.report.heatmap`` (``--no-chart`` skips them).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from pathlib import Path

log = logging.getLogger("viditq.bench.report")

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "RESULTS.md"
GROUP = "pixart-block"
START = "<!-- block-benchmark:start -->"
END = "<!-- block-benchmark:end -->"
VIDEO_GROUP = "stdit3-block"
VIDEO_START = "<!-- video-benchmark:start -->"
VIDEO_END = "<!-- video-benchmark:end -->"

# display order; unknown variants go last, in JSON order
ORDER = ["fp32-eager", "bf16-eager", "fp32-inductor", "bf16-inductor", "torchao-int8-bf16",
         "torchao-int8-fp32", "viditq-w8a8-fp32", "viditq-w8a8-bf16"]
FP32_EAGER = "fp32-eager"
BF16_COMPILED = "bf16-inductor"
TORCHAO_BF16 = "torchao-int8-bf16"
VIDITQ_PREFIX = "viditq-"

# (label, baseline variant, minimum speed-up) -- from the issue
SPEED_TARGETS = [
    ("faster than fp32 eager", FP32_EAGER, 3.5),
    ("faster than bf16 torch.compile", BF16_COMPILED, 1.6),
    ("faster than torchao int8 dyn-act/int8-weight compiled (bf16)", TORCHAO_BF16, 1.1),
]
WEIGHT_RATIO_TARGET = 0.27  # quantized weight bytes <= 0.27 x fp32
# ViDiT-Q balancing (issue 3): online smoothing + rotation costs at most 10% over plain W8A8,
# and W4A8 weights are at most 0.15 x fp32 bytes
PLAIN_W8A8 = "viditq-w8a8-bf16"
BALANCE_OVERHEAD_TARGET = {"viditq-w8a8-balanced-bf16": 1.10, "viditq-w4a8-balanced-bf16": None}
W4_WEIGHT_RATIO_TARGET = {"viditq-w4a8-balanced-bf16": 0.15}


class ReportError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- loading


def load_rows(data: dict, group: str = GROUP) -> list[dict]:
    """The rows of benchmark group ``group``; ``ReportError`` when there are none."""
    rows = []
    for b in data.get("benchmarks", []):
        if b.get("group") != group:
            continue
        info = b.get("extra_info") or {}
        stats = b["stats"]
        name = info.get("variant") or b.get("param") or b["name"]
        rows.append({
            "variant": name,
            "dtype": info.get("dtype"),
            "kind": info.get("kind"),
            "median_s": stats["median"],
            "min_s": stats["min"],
            "max_s": stats.get("max"),
            "mean_s": stats["mean"],
            "stddev_s": stats["stddev"],
            "rounds": stats["rounds"],
            "weight_bytes": info.get("weight_bytes"),
            "compile_s": info.get("compile_s"),
            "quantize_s": info.get("quantize_s"),
            "sqnr_db": info.get("sqnr_db"),
            "rss_delta_mb": info.get("rss_delta_mb"),
            "peak_rss_delta_mb": info.get("peak_rss_delta_mb"),
            "loadavg_1m": info.get("loadavg_1m"),
            "quantized_layers": info.get("quantized_layers"),
            "batch": info.get("batch"),
            "config": info.get("config"),
            "threads": info.get("threads"),
        })
    if not rows:
        raise ReportError(f"no benchmarks in group {group!r} in the JSON (was "
                          f"benchmarks/test_bench_block.py run with --benchmark-json?)")
    rank = {v: i for i, v in enumerate(ORDER)}
    rows.sort(key=lambda r: rank.get(r["variant"], len(ORDER)))
    return rows


# ----------------------------------------------------------------------------- formatting


def _fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}" if ms < 1000 else f"{ms:,.0f}"


def _fmt_x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "—"
    if n >= 2**20:
        return f"{n / 2**20:.2f} MiB"
    return f"{n / 2**10:.1f} KiB"


def _fmt_s(s: float | None) -> str:
    return "—" if s is None else f"{s:.1f}"


def _fmt_mb(mb: float | None) -> str:
    return "—" if mb is None else f"{mb:.1f}"


def _fmt_sqnr(row: dict) -> str:
    if row["variant"] == FP32_EAGER:
        return "ref"
    v = row["sqnr_db"]
    if v is None:
        return "∞ (exact)" if row["kind"] is not None else "—"
    return f"{v:.1f}"


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


# ----------------------------------------------------------------------------- sections


BASELINES = [(FP32_EAGER, "vs fp32 eager"), (BF16_COMPILED, "vs bf16 compiled"),
             (TORCHAO_BF16, "vs torchao int8 (bf16)")]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _rule(n: int) -> str:
    return "|" + "|".join(["---"] + ["---:"] * (n - 1)) + "|"


def derive(rows: list[dict]) -> dict:
    """Per variant: speed-up against each baseline (None when it was not run) and weight bytes
    relative to fp32 eager."""
    by = {r["variant"]: r for r in rows}
    fp32_bytes = by[FP32_EAGER]["weight_bytes"] if FP32_EAGER in by else None
    return {r["variant"]: {
        "speedup": {base: _ratio(by[base]["median_s"] if base in by else None, r["median_s"])
                    for base, _ in BASELINES},
        "weight_ratio": _ratio(r["weight_bytes"], fp32_bytes)} for r in rows}


def build_tables(rows: list[dict]) -> tuple[str, str, dict]:
    """The latency table (medians, min, max, speed-ups against each baseline, SQNR), the memory
    and compile-time table (weight bytes, RSS columns when the JSON has them, compile s) and the
    derived ratios."""
    derived = derive(rows)
    head = ["variant", "median ms", "min ms", "max ms"] + [label for _, label in BASELINES] + ["SQNR dB"]
    lat = [_row(head), _rule(len(head))]
    for r in rows:
        sp = derived[r["variant"]]["speedup"]
        lat.append(_row([f"`{r['variant']}`", _fmt_ms(r["median_s"]), _fmt_ms(r["min_s"]),
                         _fmt_ms(r.get("max_s"))] + [_fmt_x(sp[base]) for base, _ in BASELINES]
                        + [_fmt_sqnr(r)]))
    peak = any(r.get("peak_rss_delta_mb") is not None for r in rows)
    rss = any(r.get("rss_delta_mb") is not None for r in rows)
    head = (["variant", "weight bytes", "× fp32 bytes"] + (["peak RSS Δ MiB"] if peak else [])
            + (["RSS Δ MiB"] if rss else []) + ["compile s"])
    mem = [_row(head), _rule(len(head))]
    for r in rows:
        wr = derived[r["variant"]]["weight_ratio"]
        mem.append(_row([f"`{r['variant']}`", _fmt_bytes(r["weight_bytes"]),
                         "—" if wr is None else f"{wr:.3f}"]
                        + ([_fmt_mb(r.get("peak_rss_delta_mb"))] if peak else [])
                        + ([_fmt_mb(r.get("rss_delta_mb"))] if rss else []) + [_fmt_s(r["compile_s"])]))
    return "\n".join(lat), "\n".join(mem), derived


# the README's rows: the three baselines and every viditq variant
HEADLINE_BASELINES = [FP32_EAGER, BF16_COMPILED, TORCHAO_BF16]


def headline_table(rows: list[dict], derived: dict | None = None) -> str:
    """Compact Markdown table for the README: variant, median ms, speed-up vs bf16 compiled and
    vs torchao int8 (bf16), weight MiB, SQNR dB."""
    derived = derived or derive(rows)
    head = ["variant", "median ms", "vs bf16 compiled", "vs torchao int8 (bf16)", "weight MiB", "SQNR dB"]
    lines = [_row(head), _rule(len(head))]
    for r in rows:
        if r["variant"] not in HEADLINE_BASELINES and not r["variant"].startswith(VIDITQ_PREFIX):
            continue
        sp = derived[r["variant"]]["speedup"]
        wb = r["weight_bytes"]
        lines.append(_row([f"`{r['variant']}`", _fmt_ms(r["median_s"]), _fmt_x(sp[BF16_COMPILED]),
                           _fmt_x(sp[TORCHAO_BF16]), "—" if wb is None else f"{wb / 2**20:.2f}",
                           _fmt_sqnr(r)]))
    return "\n".join(lines)


def headline_caption(data: dict, rows: list[dict]) -> str:
    mi = data.get("machine_info") or {}
    cpu = mi.get("cpu") or {}
    vb = mi.get("viditq_bench") or {}
    cfg = vb.get("config") or rows[0].get("config") or {}
    brand = cpu.get("brand_raw") or mi.get("processor") or "unknown CPU"
    cores = cpu.get("count") or vb.get("cpu_count") or "?"
    return (f"PixArt-Σ transformer block (hidden {cfg.get('dim')}, batch {cfg.get('batch')}, "
            f"{cfg.get('tokens')} image + {cfg.get('text_tokens')} text tokens) on {brand}, {cores} cores; "
            f"median of {vb.get('rounds') or rows[0]['rounds']} rounds, speed-ups are ratios of medians, "
            f"SQNR: output vs fp32 eager. Full tables, memory, compile times and charts: "
            f"[`benchmarks/RESULTS.md`](benchmarks/RESULTS.md).")


README_START = "<!-- bench-headline:start -->"
README_END = "<!-- bench-headline:end -->"


def _video_rows(data: dict) -> list[tuple[dict, list[float | None]]] | None:
    """The video block's rows, each with its speed-ups over ``VIDEO_BASELINES``; None when the
    run has none."""
    try:
        rows = load_rows(data, VIDEO_GROUP)
    except ReportError:
        return None
    by = {r["variant"]: r for r in rows}
    return [(r, [_ratio(by[b]["median_s"] if b in by else None, r["median_s"]) for b, _ in VIDEO_BASELINES])
            for r in rows]


def video_headline_table(data: dict) -> str | None:
    """Compact Markdown table of the video block for the README (None when the run has none)."""
    video = _video_rows(data)
    if video is None:
        return None
    cfg = video[0][0].get("config") or {}
    head = ["variant", "median ms"] + [label for _, label in VIDEO_BASELINES] + ["SQNR dB"]
    lines = [_row(head), _rule(len(head))]
    for r, ratios in video:
        sqnr = "—" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f}"
        lines.append(_row([f"`{r['variant']}`", _fmt_ms(r["median_s"])] + [_fmt_x(x) for x in ratios] + [sqnr]))
    return (f"OpenSORA STDiT3 spatial + temporal block pair, batch {cfg.get('batch')}, {cfg.get('frames')} "
            f"frames × {cfg.get('tokens')} tokens, {cfg.get('text_tokens')} caption tokens, same run:\n\n"
            + "\n".join(lines))


def readme_section(data: dict, rows: list[dict]) -> str:
    """The README's generated numbers: the block's headline table and caption, the video block's
    table, the date and commit of the run; between ``README_START`` and ``README_END``."""
    vb = (data.get("machine_info") or {}).get("viditq_bench") or {}
    commit = (data.get("commit_info") or {}).get("id") or ""
    when = str(data.get("datetime") or "")[:10]
    parts = [README_START, f"Generated by `make bench` ({when}, commit `{commit[:12]}`, torch "
             f"{(vb.get('versions') or {}).get('torch') or '?'}; "
             f"`benchmarks/report.py --readme README.md`).", ""]
    if rows:
        parts += [headline_table(rows), "", headline_caption(data, rows), ""]
    video = video_headline_table(data)
    if video:
        parts += [video, ""]
    parts.append(README_END)
    return "\n".join(parts) + "\n"


def check_targets(rows: list[dict], derived: dict) -> tuple[list[str], bool | None]:
    """PASS/FAIL lines per viditq variant; overall verdict from the fastest viditq variant."""
    vq = [r for r in rows if r["variant"].startswith(VIDITQ_PREFIX)]
    if not vq:
        return ["- FAIL  no viditq variant in the results"], False
    vq.sort(key=lambda r: r["median_s"])
    lines, verdicts = [], {}
    for r in vq:
        name = r["variant"]
        d = derived[name]
        ok_all = True
        for label, base, target in SPEED_TARGETS:
            s = d["speedup"][base]
            if s is None:
                lines.append(f"- SKIP  `{name}` ≥ {target}× {label}: `{base}` was not run")
                ok_all = False
                continue
            ok = s >= target
            ok_all &= ok
            lines.append(f"- {'PASS' if ok else 'FAIL'}  `{name}` {s:.2f}× {label} "
                         f"(target ≥ {target}×)")
        wr = d["weight_ratio"]
        if wr is None:
            lines.append(f"- SKIP  `{name}` weight bytes ≤ {WEIGHT_RATIO_TARGET}× fp32: "
                         f"no byte counts")
            ok_all = False
        else:
            ok = wr <= WEIGHT_RATIO_TARGET
            ok_all &= ok
            lines.append(f"- {'PASS' if ok else 'FAIL'}  `{name}` weight bytes "
                         f"{wr:.3f}× fp32 (target ≤ {WEIGHT_RATIO_TARGET}×)")
        verdicts[name] = ok_all
    lines += _balance_checks(rows, derived)
    best = vq[0]["variant"]
    overall = verdicts[best]
    lines.append(f"- **Overall: {'PASS' if overall else 'FAIL'}** — judged on the fastest "
                 f"W8A8 variant, `{best}`")
    return lines, overall


def _balance_checks(rows: list[dict], derived: dict) -> list[str]:
    """Cost of online balancing against plain W8A8, and the W4A8 weight budget."""
    median = {r["variant"]: r["median_s"] for r in rows}
    lines = []
    for name, target in BALANCE_OVERHEAD_TARGET.items():
        if name not in median or PLAIN_W8A8 not in median:
            continue
        ratio = median[name] / median[PLAIN_W8A8]
        if target is None:
            lines.append(f"- INFO  `{name}` takes {ratio:.2f}× the time of `{PLAIN_W8A8}`")
        else:
            lines.append(f"- {'PASS' if ratio <= target else 'FAIL'}  `{name}` takes {ratio:.2f}× "
                         f"the time of `{PLAIN_W8A8}` (target ≤ {target:.2f}×)")
    for name, target in W4_WEIGHT_RATIO_TARGET.items():
        wr = derived.get(name, {}).get("weight_ratio")
        if wr is not None:
            lines.append(f"- {'PASS' if wr <= target else 'FAIL'}  `{name}` weight bytes "
                         f"{wr:.3f}× fp32 (target ≤ {target}×)")
    return lines


def describe_run(data: dict, rows: list[dict], json_path: str) -> list[str]:
    mi = data.get("machine_info") or {}
    cpu = mi.get("cpu") or {}
    vb = mi.get("viditq_bench") or {}
    ci = data.get("commit_info") or {}
    versions = dict(vb.get("versions") or {})
    if not versions:  # JSON from an older conftest: fall back to this interpreter
        for name in ("torch", "triton", "torchao"):
            try:
                versions[name] = str(__import__(name).__version__) + " (report env)"
            except Exception:
                versions[name] = None
    cfg = vb.get("config") or rows[0].get("config") or {}
    out = []
    if cfg:
        out.append(f"- Block: diffusers `BasicTransformerBlock` (PixArt-Σ, adaLN-single), "
                   f"hidden {cfg.get('dim')} = {cfg.get('heads')}×{cfg.get('head_dim')}, "
                   f"batch {cfg.get('batch')}, {cfg.get('tokens')} image tokens, "
                   f"{cfg.get('text_tokens')} text tokens; seeded heavy-tailed weights; "
                   f"`torch.no_grad()`")
    rounds = vb.get("rounds") or rows[0]["rounds"]
    out.append(f"- Timing: {rounds} rounds × 1 iteration after {vb.get('warmup_rounds', 2)} "
               f"warm-up rounds; compile happens before (column *compile s*: cold, Inductor "
               f"caches disabled; torchao includes `quantize_`, viditq quantizes inside its "
               f"backend). Speed-ups are ratios of medians.")
    brand = cpu.get("brand_raw") or mi.get("processor") or "unknown CPU"
    flags = set(cpu.get("flags") or [])
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
           if f in flags]
    out.append(f"- Machine: {brand}, {cpu.get('count', vb.get('cpu_count', '?'))} logical cores"
               f" ({cpu.get('hz_actual_friendly', '?')}), torch threads "
               f"{vb.get('torch_threads', rows[0].get('threads', '?'))}"
               + (f", ISA: {', '.join(isa)}" if isa else "")
               + f"; {mi.get('system', '')} {mi.get('release', '')}, Python "
               f"{mi.get('python_version', '?')}")
    out.append("- Versions: " + ", ".join(f"{k} {v or 'not installed'}"
                                          for k, v in versions.items()))
    if ci:
        commit = ci.get("id") or "?"
        out.append(f"- Commit: `{commit[:12]}` ({ci.get('branch', '?')}"
                   f"{', dirty tree' if ci.get('dirty') else ''}), {ci.get('time', '')}")
    out.append(f"- Date: {data.get('datetime', '?')} (pytest-benchmark {data.get('version', '?')})")
    cmd = vb.get("command")
    if cmd:
        env = vb.get("env") or {}
        env_s = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        out.append(f"- Command: `{(env_s + ' ') if env_s else ''}{shlex.join(cmd)}` "
                   f"(run in `{vb.get('cwd', '?')}`), then "
                   f"`python benchmarks/report.py {json_path}`")
    else:
        out.append(f"- Command: `pytest -q benchmarks --benchmark-only "
                   f"--benchmark-json={json_path}` then `python benchmarks/report.py {json_path}`")
    out.append("- Reproduce: `make bench`")
    loads = [r["loadavg_1m"] for r in rows if r.get("loadavg_1m") is not None]
    ncpu = cpu.get("count") or vb.get("cpu_count")
    if loads and ncpu and max(loads) > ncpu:
        out.append(f"- **Warning:** 1-min load average reached {max(loads):.1f} on {ncpu} cores "
                   f"during the run; other processes competed for the CPU and timings are noisy.")
    return out


def build_section(data: dict, json_path: str, charts: list[tuple[str, str]] | None = None
                  ) -> tuple[str, str, list[str], bool | None]:
    """The marked Markdown block, the tables alone, the target lines and the overall verdict.
    ``charts``: (alt text, link relative to the Markdown file) of each PNG to show."""
    rows = load_rows(data)
    lat, mem, derived = build_tables(rows)
    checks, overall = check_targets(rows, derived)
    cfg = (data.get("machine_info") or {}).get("viditq_bench", {}).get("config") \
        or rows[0].get("config") or {}
    parts = [START, "## PixArt-Σ transformer block: W8A8 vs floating point and torchao", ""]
    if cfg.get("small"):
        parts += ["> **SMOKE RUN (`VIDITQ_BENCH_SMALL=1`)** — a shrunken block; these numbers "
                  "say nothing about performance.", ""]
    parts += describe_run(data, rows, json_path) + ["", "### Latency and quality", "", lat, ""]
    notes = [r for r in rows if r.get("quantized_layers")]
    for r in notes:
        parts.append(f"- `{r['variant']}`: {r['quantized_layers']}")
    if notes:
        parts.append("")
    parts += ["SQNR: output vs fp32 eager.", "", "### Memory and compile time", "", mem, "",
              "Weight bytes: every parameter/buffer the variant holds (fp: its parameters; "
              "torchao: int8 data + scales + zero points + unquantized parameters; viditq: "
              "all tensors of the quantized program from `viditq_compile.quantize`, i.e. int8 "
              "weights + scales + biases + `scale_shift_table`)."
              + (" Peak RSS Δ: growth of the process's peak resident set (`ru_maxrss`) while the "
                 "variant was built (copy, cast, quantize, compile, first call); RSS Δ: resident "
                 "set after the build minus before. Both count the compiler's memory too, and "
                 "the process is shared with pytest, so they are rough."
                 if any(r.get("peak_rss_delta_mb") is not None for r in rows) else "")
              + " Compile s: as under *Timing* above.", ""]
    if charts:
        parts += ["### Charts", "",
                  "Drawn by `benchmarks/charts.py` from the same JSON; bars coloured by family "
                  "(fp blue, torchao orange, viditq green).", ""]
        for alt, link in charts:
            parts += [f"![{alt}]({link})", ""]
    parts += ["### Targets", ""] + checks + ["", END]
    return "\n".join(parts) + "\n", lat + "\n\n" + mem, checks, overall


VIDEO_BASELINES = [(BF16_COMPILED, "vs bf16 compiled"), (TORCHAO_BF16, "vs torchao int8 (bf16)")]


def build_video_section(data: dict) -> str | None:
    """The marked Markdown block of the video block (group ``stdit3-block``); None when the JSON
    has none."""
    video = _video_rows(data)
    if video is None:
        return None
    rows = [r for r, _ in video]
    cfg = rows[0].get("config") or {}
    head = (["variant", "median ms", "min ms", "max ms"] + [label for _, label in VIDEO_BASELINES]
            + ["SQNR dB", "weight bytes", "compile s"])
    table = [_row(head), _rule(len(head))]
    for r, ratios in video:
        sqnr = "—" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f}"
        table.append(_row([f"`{r['variant']}`", _fmt_ms(r["median_s"]), _fmt_ms(r["min_s"]),
                           _fmt_ms(r.get("max_s"))] + [_fmt_x(x) for x in ratios]
                          + [sqnr, _fmt_bytes(r["weight_bytes"]), _fmt_s(r["compile_s"])]))
    parts = [VIDEO_START, "## OpenSORA STDiT3 block pair at video length", ""]
    if cfg.get("small"):
        parts += ["> **SMOKE RUN (`VIDITQ_BENCH_SMALL=1`)** — a shrunken block; these numbers "
                  "say nothing about performance.", ""]
    parts += [f"- Block: one spatial + one temporal STDiT3 block (`tests/zoo.py`: self-attention "
              f"over each frame's tokens, then over the frames at each token; cross-attention to "
              f"the caption; MLP; adaLN-single), hidden {cfg.get('dim')} = {cfg.get('heads')} "
              f"heads, batch {cfg.get('batch')}, {cfg.get('frames')} frames × {cfg.get('tokens')} "
              f"tokens, {cfg.get('text_tokens')} caption tokens (`VIDITQ_BENCH_VIDEO=8x1024` for "
              f"OpenSORA at 512 px); seeded heavy-tailed weights",
              f"- Timing and machine: as the PixArt-Σ block above ({rows[0]['rounds']} rounds); "
              f"speed-ups are ratios of medians; SQNR: output vs the block's fp32 eager output", ""]
    loads = [r["loadavg_1m"] for r in rows if r.get("loadavg_1m") is not None]
    if loads:
        parts += [f"- 1-min load average before the timed rounds: {min(loads):.1f}–{max(loads):.1f}", ""]
    parts += ["\n".join(table), "", VIDEO_END]
    return "\n".join(parts) + "\n"


def splice(existing: str, section: str, start_marker: str = START, end_marker: str = END) -> str:
    """Replace the block between ``start_marker`` and ``end_marker`` in ``existing`` (or append
    one)."""
    start, end = existing.find(start_marker), existing.find(end_marker)
    if start != -1 and end != -1 and end > start:
        tail = existing[end + len(end_marker):]
        if tail.startswith("\n"):
            tail = tail[1:]
        return existing[:start] + section + tail
    if start != -1 or end != -1:
        raise ReportError(f"found only one of the markers {start_marker} / {end_marker}; fix the "
                          f"file by hand")
    if not existing.strip():
        return "# Benchmark results\n\n" + section
    return existing.rstrip("\n") + "\n\n" + section


CHART_ALT = {"block-latency.png": "median latency per variant, min-max whiskers",
             "block-speedup.png": "speed-up vs {baseline}",
             "block-weights.png": "weight bytes relative to fp32"}


def write_charts(rows: list[dict], charts_dir: Path, md_dir: Path, baseline: str) -> list[tuple[str, str]]:
    """Write the PNG charts into ``charts_dir``; (alt text, link relative to ``md_dir``) of each."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    from charts import render_charts

    pngs = render_charts(rows, baseline=baseline)
    charts_dir.mkdir(parents=True, exist_ok=True)
    links = []
    for name, png in pngs.items():
        path = charts_dir / name
        path.write_bytes(png)
        log.info("chart: %s", path)
        link = Path(os.path.relpath(path.resolve(), md_dir.resolve())).as_posix()
        links.append((CHART_ALT.get(name, name).format(baseline=baseline), link))
    return links


def merge_runs(paths: list[str]) -> dict:
    """One pytest-benchmark document from several: machine and commit info of the first run,
    the benchmarks of all of them, in the order given."""
    merged: dict | None = None
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        if merged is None:
            merged = data
        else:
            merged["benchmarks"] = merged.get("benchmarks", []) + data.get("benchmarks", [])
    assert merged is not None  # argparse guarantees at least one path
    return merged


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", nargs="+",
                   help="pytest-benchmark JSON file(s) (--benchmark-json=...); several files "
                        "(one process per variant, as `make bench` runs them) are merged")
    p.add_argument("--out", default=str(DEFAULT_OUT),
                   help=f"Markdown file to update (default: {DEFAULT_OUT.relative_to(HERE.parent)})")
    p.add_argument("--no-chart", action="store_true", help="do not draw the PNG charts")
    p.add_argument("--charts-dir", default=None,
                   help="where the PNG charts go (default: charts/ next to --out)")
    p.add_argument("--chart-baseline", default=BF16_COMPILED,
                   help=f"baseline of the speed-up chart (default: {BF16_COMPILED})")
    p.add_argument("--headline", action="store_true",
                   help="print only the compact headline table for the README (writes nothing)")
    p.add_argument("--allow-small", action="store_true",
                   help=f"allow writing a VIDITQ_BENCH_SMALL smoke run into {DEFAULT_OUT.name}")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    p.add_argument("--readme", default=None,
                   help=f"also rewrite the block between {README_START} and {README_END} of this "
                        f"file (the README's numbers) from the same run")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    data = merge_runs(args.json)
    out = Path(args.out)
    vb = (data.get("machine_info") or {}).get("viditq_bench") or {}
    small = bool((vb.get("config") or {}).get("small")) or any(
        ((b.get("extra_info") or {}).get("config") or {}).get("small")
        for b in data.get("benchmarks", []))
    video = build_video_section(data)
    try:
        rows = load_rows(data)
    except ReportError as exc:
        if video is None or args.headline:
            log.error("%s", exc)
            return 2
        rows = []  # the video block alone
    if args.headline:
        if small:
            print("> **SMOKE RUN (`VIDITQ_BENCH_SMALL=1`)**: these numbers say nothing about "
                  "performance.\n")
        print(headline_table(rows) + "\n\n" + headline_caption(data, rows))
        return 0
    if small and out.resolve() == DEFAULT_OUT and not args.allow_small:
        log.error("refusing to write a VIDITQ_BENCH_SMALL smoke run into %s; pass --out "
                  "elsewhere (or --allow-small)", out)
        return 2

    charts = None
    if rows and not args.no_chart:
        charts_dir = Path(args.charts_dir) if args.charts_dir else out.parent / "charts"
        try:
            charts = write_charts(rows, charts_dir, out.parent, args.chart_baseline)
        except ValueError as exc:
            log.error("charts: %s", exc)
            return 2
    table, checks, overall = "", [], None
    existing = out.read_text() if out.exists() else ""
    try:
        text = existing
        if rows:
            section, table, checks, overall = build_section(data, " ".join(args.json), charts)
            text = splice(existing, section)
        if video is not None:
            if VIDEO_START not in text and VIDEO_END not in text and END in text:
                at = text.index(END) + len(END)  # first time: right after the block's section
                text = text[:at] + "\n\n" + video.rstrip("\n") + text[at:]
            else:
                text = splice(text, video, VIDEO_START, VIDEO_END)
    except ReportError as exc:
        log.error("%s: %s", out, exc)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if args.readme:
        readme = Path(args.readme)
        current = readme.read_text() if readme.exists() else ""
        if README_START not in current or README_END not in current:
            log.error("%s: no %s ... %s block to rewrite", readme, README_START, README_END)
            return 2
        readme.write_text(splice(current, readme_section(data, rows), README_START, README_END))
        print(f"wrote the numbers of {readme}")

    print(table + "\n")
    if video is not None:
        print(video)
    print("\n".join(checks))
    print(f"\nwrote {out}")
    return 1 if (args.strict and rows and not overall) else 0


if __name__ == "__main__":
    sys.exit(main())
