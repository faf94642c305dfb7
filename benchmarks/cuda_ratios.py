#!/usr/bin/env python3
"""Speed-up tables of ``benchmarks/test_bench_cuda.py``, from its pytest-benchmark JSON, as Markdown.

Usage: ``python benchmarks/cuda_ratios.py benchmarks/runs/cuda.json [more.json ...]`` (``make
bench-cuda`` runs it). The Markdown goes to stdout, for pasting into ``benchmarks/RESULTS.md``.

One table per group (a GEMM shape, a block, a model): each variant's median and its speed-up
``baseline median / variant median`` (above 1: the variant is faster) over three baselines: bf16
(``bf16-cublas`` for a GEMM, ``bf16-eager`` for a block or model), ``bf16-compiled`` and
``torchao-int8-dyn``. Then one matrix of every GEMM shape's speed-ups over cuBLAS bf16.
A later file's result replaces an earlier one of the same group and variant. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# (column title, the variant that is the baseline: first one present in the group)
BASELINES = (("vs bf16", ("bf16-cublas", "bf16-eager")), ("vs bf16 compiled", ("bf16-compiled",)),
             ("vs torchao int8", ("torchao-int8-dyn",)))
ORDER = ("bf16-cublas", "bf16-eager", "bf16-compiled", "torchao-int8-dyn", "torchao-fp8-rowwise", "int-mm",
         "viditq-w8a8", "viditq-w8a8-dyn", "viditq-w4a8", "viditq-w4a8-g128", "viditq-w4a4")
GEMM_BASELINE = "bf16-cublas"
MIB = 2 ** 20


def load(paths: list[Path]) -> tuple[dict[str, dict[str, dict]], dict]:
    """``{group: {variant: benchmark}}`` in first-seen order, and the first file's run metadata."""
    groups: dict[str, dict[str, dict]] = {}
    meta: dict = {}
    for path in paths:
        data = json.loads(path.read_text())
        meta = meta or {k: data.get(k) for k in ("datetime", "commit_info", "machine_info")}
        for bench in data.get("benchmarks", []):
            variant = (bench.get("extra_info", {}).get("variant") or (bench.get("params") or {}).get("variant")
                       or bench.get("param") or bench["name"])
            groups.setdefault(bench.get("group") or "(no group)", {})[variant] = bench
    return groups, meta


def ordered(variants) -> list[str]:
    rank = {v: i for i, v in enumerate(ORDER)}
    return sorted(variants, key=lambda v: rank.get(v, len(ORDER)))  # stable: unknown ones keep JSON order


def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.3f} s"


def fmt(value, spec: str, scale: float = 1.0) -> str:
    return "–" if value is None else format(value / scale, spec)


def speedup(group: dict[str, dict], variant: str, candidates: tuple[str, ...]) -> float | None:
    base = next((group[c] for c in candidates if c in group), None)
    if base is None:
        return None
    return base["stats"]["median"] / group[variant]["stats"]["median"]


def ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def gemm_key(group: dict[str, dict]) -> tuple[int, int, int] | None:
    info = next(iter(group.values())).get("extra_info", {})
    return (info["M"], info["K"], info["N"]) if all(k in info for k in "MKN") else None


def group_table(name: str, group: dict[str, dict]) -> list[str]:
    gemm = gemm_key(group) is not None
    head = ["variant", "median"] + (["TFLOP/s"] if gemm else []) + [t for t, _ in BASELINES] + \
        ["SQNR dB", "weight MiB", "peak MiB"]
    lines = [f"### {name}", "", "| " + " | ".join(head) + " |",
             "|---|" + "---:|" * (len(head) - 1)]
    for variant in ordered(group):
        bench = group[variant]
        info = bench.get("extra_info", {})
        row = [f"`{variant}`", fmt_time(bench["stats"]["median"])]
        if gemm:
            row.append(fmt(info.get("tflops"), ".1f"))
        row += [ratio(speedup(group, variant, c)) for _, c in BASELINES]
        row += [fmt(info.get("sqnr_db"), ".1f"), fmt(info.get("weight_bytes"), ".2f", MIB),
                fmt(info.get("peak_mem_bytes"), ".0f", MIB)]
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def gemm_matrix(groups: dict[str, dict[str, dict]]) -> list[str]:
    shapes = sorted((gemm_key(g), g) for g in groups.values() if gemm_key(g) and GEMM_BASELINE in g)
    if not shapes:
        return []
    variants = ordered({v for _, g in shapes for v in g if v != GEMM_BASELINE})
    lines = [f"### GEMM speed-up over `{GEMM_BASELINE}` (median / median)", "",
             "| M × K × N | " + " | ".join(f"`{v}`" for v in variants) + " |",
             "|---|" + "---:|" * len(variants)]
    for (m, k, n), g in shapes:
        cells = [ratio(speedup(g, v, (GEMM_BASELINE,))) if v in g else "–" for v in variants]
        lines.append(f"| {m} × {k} × {n} | " + " | ".join(cells) + " |")
    return lines + [""]


def header(groups: dict[str, dict[str, dict]], meta: dict, paths: list[Path]) -> list[str]:
    first = next(iter(next(iter(groups.values())).values())).get("extra_info", {})
    versions = ", ".join(f"{k} {v}" for k, v in (first.get("versions") or {}).items() if v)
    commit = meta.get("commit_info") or {}
    lines = ["## CUDA benchmarks (`benchmarks/test_bench_cuda.py`)", "",
             f"- Device: {first.get('device', '?')} (capability {first.get('capability', '?')}), "
             f"torch {first.get('torch', '?')}, CUDA {first.get('cuda', '?')}" + (f"; {versions}" if versions else ""),
             f"- Run: {meta.get('datetime', '?')}, commit `{str(commit.get('id', '?'))[:12]}`"
             + (" (dirty tree)" if commit.get("dirty") else "") + "; from " + ", ".join(f"`{p}`" for p in paths),
             "- Medians per call; speed-up = baseline median / variant median; peak = steady-state "
             "`torch.cuda.max_memory_allocated()` (shared operands included); SQNR against float64 (GEMM) or "
             "fp32 eager (blocks, models)", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", type=Path, help="pytest-benchmark JSON file(s)")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.json if not p.is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    groups, meta = load(args.json)
    if not groups:
        print(f"no benchmark results in {', '.join(map(str, args.json))} (every test skipped?)", file=sys.stderr)
        return 0
    lines = header(groups, meta, args.json)
    gemm = sorted((n for n, g in groups.items() if gemm_key(g)), key=lambda n: gemm_key(groups[n]))
    for name in [n for n in groups if n not in gemm] + gemm:  # blocks and models first: the headline
        lines += group_table(name, groups[name])
    lines += gemm_matrix(groups)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
