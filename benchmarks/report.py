#!/usr/bin/env python3
"""Turn the pytest-benchmark JSON of ``benchmarks/test_bench_block.py`` into ``RESULTS.md``.

Usage: ``python benchmarks/report.py benchmarks/results.json [--out benchmarks/RESULTS.md]``

Only the block between ``<!-- block-benchmark:start -->`` and ``<!-- block-benchmark:end -->``
is (re)written; the rest of the file is kept. A bar chart (PNG, next to the output) is drawn when
matplotlib is importable. The issue's targets are checked and written as PASS/FAIL lines (the
exit status is 0 either way unless ``--strict``).

Speed-ups are ratios of medians. Needs only the standard library (+ optional matplotlib).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Optional

log = logging.getLogger("viditq.bench.report")

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "RESULTS.md"
GROUP = "pixart-block"
START = "<!-- block-benchmark:start -->"
END = "<!-- block-benchmark:end -->"

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


def load_rows(data: dict) -> list[dict]:
    rows = []
    for b in data.get("benchmarks", []):
        if b.get("group") != GROUP:
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
            "mean_s": stats["mean"],
            "stddev_s": stats["stddev"],
            "rounds": stats["rounds"],
            "weight_bytes": info.get("weight_bytes"),
            "compile_s": info.get("compile_s"),
            "quantize_s": info.get("quantize_s"),
            "sqnr_db": info.get("sqnr_db"),
            "rss_delta_mb": info.get("rss_delta_mb"),
            "loadavg_1m": info.get("loadavg_1m"),
            "quantized_layers": info.get("quantized_layers"),
            "batch": info.get("batch"),
            "config": info.get("config"),
            "threads": info.get("threads"),
        })
    if not rows:
        raise ReportError(f"no benchmarks in group {GROUP!r} in the JSON (was "
                          f"benchmarks/test_bench_block.py run with --benchmark-json?)")
    rank = {v: i for i, v in enumerate(ORDER)}
    rows.sort(key=lambda r: rank.get(r["variant"], len(ORDER)))
    return rows


# ----------------------------------------------------------------------------- formatting


def _fmt_ms(seconds: Optional[float]) -> str:
    if seconds is None:
        return "—"
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}" if ms < 1000 else f"{ms:,.0f}"


def _fmt_x(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "—"
    if n >= 2**20:
        return f"{n / 2**20:.2f} MiB"
    return f"{n / 2**10:.1f} KiB"


def _fmt_s(s: Optional[float]) -> str:
    return "—" if s is None else f"{s:.1f}"


def _fmt_sqnr(row: dict) -> str:
    if row["variant"] == FP32_EAGER:
        return "ref"
    v = row["sqnr_db"]
    if v is None:
        return "∞ (exact)" if row["kind"] is not None else "—"
    return f"{v:.1f}"


def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    if num is None or den is None or den == 0:
        return None
    return num / den


# ----------------------------------------------------------------------------- sections


def build_table(rows: list[dict]) -> tuple[str, dict]:
    by = {r["variant"]: r for r in rows}

    def med(name):
        return by[name]["median_s"] if name in by else None

    fp32_bytes = by[FP32_EAGER]["weight_bytes"] if FP32_EAGER in by else None
    head = ("| variant | median ms | min ms | vs fp32 eager | vs bf16 compiled | "
            "vs torchao int8 (bf16) | weight bytes | × fp32 bytes | compile s | SQNR dB |")
    lines = [head, "|" + "|".join(["---"] + ["---:"] * 9) + "|"]
    derived = {}
    for r in rows:
        m = r["median_s"]
        sp = {base: _ratio(med(base), m) for base in (FP32_EAGER, BF16_COMPILED, TORCHAO_BF16)}
        wr = _ratio(r["weight_bytes"], fp32_bytes)
        derived[r["variant"]] = {"speedup": sp, "weight_ratio": wr}
        lines.append("| " + " | ".join([
            f"`{r['variant']}`", _fmt_ms(m), _fmt_ms(r["min_s"]), _fmt_x(sp[FP32_EAGER]),
            _fmt_x(sp[BF16_COMPILED]), _fmt_x(sp[TORCHAO_BF16]), _fmt_bytes(r["weight_bytes"]),
            "—" if wr is None else f"{wr:.3f}", _fmt_s(r["compile_s"]), _fmt_sqnr(r),
        ]) + " |")
    return "\n".join(lines), derived


def check_targets(rows: list[dict], derived: dict) -> tuple[list[str], Optional[bool]]:
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


def build_section(data: dict, json_path: str, chart: Optional[str]) -> tuple[str, str, list[str],
                                                                            Optional[bool]]:
    """The marked Markdown block, the table alone, the target lines and the overall verdict."""
    rows = load_rows(data)
    table, derived = build_table(rows)
    checks, overall = check_targets(rows, derived)
    cfg = (data.get("machine_info") or {}).get("viditq_bench", {}).get("config") \
        or rows[0].get("config") or {}
    parts = [START, "## PixArt-Σ transformer block: W8A8 vs floating point and torchao", ""]
    if cfg.get("small"):
        parts += ["> **SMOKE RUN (`VIDITQ_BENCH_SMALL=1`)** — a shrunken block; these numbers "
                  "say nothing about performance.", ""]
    parts += describe_run(data, rows, json_path) + ["", table, ""]
    notes = [r for r in rows if r.get("quantized_layers")]
    for r in notes:
        parts.append(f"- `{r['variant']}`: {r['quantized_layers']}")
    if notes:
        parts.append("")
    parts += ["Weight bytes: every parameter/buffer the variant holds (fp: its parameters; "
              "torchao: int8 data + scales + zero points + unquantized parameters; viditq: "
              "all tensors of the quantized program from `viditq_compile.quantize`, i.e. int8 "
              "weights + scales + biases + `scale_shift_table`). SQNR: output vs fp32 eager.", ""]
    if chart:
        parts += [f"![block benchmark]({chart})", ""]
    parts += ["### Targets", ""] + checks + ["", END]
    return "\n".join(parts) + "\n", table, checks, overall


def splice(existing: str, section: str) -> str:
    """Replace the marked block in ``existing`` (or append one)."""
    start, end = existing.find(START), existing.find(END)
    if start != -1 and end != -1 and end > start:
        tail = existing[end + len(END):]
        if tail.startswith("\n"):
            tail = tail[1:]
        return existing[:start] + section + tail
    if start != -1 or end != -1:
        raise ReportError(f"found only one of the markers {START} / {END}; fix the file by hand")
    if not existing.strip():
        return "# Benchmark results\n\n" + section
    return existing.rstrip("\n") + "\n\n" + section


def draw_chart(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        log.warning("matplotlib not importable (%s); no chart drawn", exc)
        return False
    names = [r["variant"] for r in rows]
    med = [r["median_s"] * 1e3 for r in rows]
    colors = ["tab:green" if n.startswith(VIDITQ_PREFIX) else
              "tab:orange" if n.startswith("torchao") else "tab:blue" for n in names]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    ax.barh(names[::-1], med[::-1], color=colors[::-1])
    for y, v in enumerate(med[::-1]):
        ax.text(v, y, f" {v:.1f}", va="center", fontsize=8)
    ax.set_xlabel("median latency per block call (ms), lower is better")
    ax.set_title("PixArt-Σ block")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def merge_runs(paths: list[str]) -> dict:
    """One pytest-benchmark document from several: machine and commit info of the first run,
    the benchmarks of all of them, in the order given."""
    merged: Optional[dict] = None
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        if merged is None:
            merged = data
        else:
            merged["benchmarks"] = merged.get("benchmarks", []) + data.get("benchmarks", [])
    assert merged is not None  # argparse guarantees at least one path
    return merged


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", nargs="+",
                   help="pytest-benchmark JSON file(s) (--benchmark-json=...); several files "
                        "(one process per variant, as `make bench` runs them) are merged")
    p.add_argument("--out", default=str(DEFAULT_OUT),
                   help=f"Markdown file to update (default: {DEFAULT_OUT.relative_to(HERE.parent)})")
    p.add_argument("--no-chart", action="store_true", help="do not draw the PNG chart")
    p.add_argument("--allow-small", action="store_true",
                   help=f"allow writing a VIDITQ_BENCH_SMALL smoke run into {DEFAULT_OUT.name}")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    data = merge_runs(args.json)
    out = Path(args.out)
    vb = (data.get("machine_info") or {}).get("viditq_bench") or {}
    small = bool((vb.get("config") or {}).get("small")) or any(
        ((b.get("extra_info") or {}).get("config") or {}).get("small")
        for b in data.get("benchmarks", []))
    if small and out.resolve() == DEFAULT_OUT and not args.allow_small:
        log.error("refusing to write a VIDITQ_BENCH_SMALL smoke run into %s; pass --out "
                  "elsewhere (or --allow-small)", out)
        return 2

    try:
        rows = load_rows(data)
    except ReportError as exc:
        log.error("%s", exc)
        return 2
    chart_rel = None
    if not args.no_chart:
        chart_path = out.with_name(out.stem + "-block.png")
        if draw_chart(rows, chart_path):
            chart_rel = chart_path.name
            log.info("chart: %s", chart_path)
    section, table, checks, overall = build_section(data, " ".join(args.json), chart_rel)
    existing = out.read_text() if out.exists() else ""
    try:
        text = splice(existing, section)
    except ReportError as exc:
        log.error("%s: %s", out, exc)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)

    print(table + "\n")
    print("\n".join(checks))
    print(f"\nwrote {out}")
    return 1 if (args.strict and not overall) else 0


if __name__ == "__main__":
    sys.exit(main())
