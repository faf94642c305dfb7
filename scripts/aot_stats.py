"""Print the compiled-code figures of the int8 / int4 GEMM (``kernels.int_gemm._qlinear_kernel``) as a
Markdown table: per variant, the best kept autotune config on ``sm_<arch>`` (fewest SASS instructions
per multiply-accumulate in the K loop, among binaries without loop spills), its loop instructions,
registers, stack, local loads/stores in the loop, shared-memory stores / loads in the loop and shared
memory per block. Compiles ahead of time (``kernels.aot``; no GPU needed, triton's CUDA backend and
ptxas are).

    .venv/bin/python scripts/aot_stats.py             # sm_90, best config per variant
    .venv/bin/python scripts/aot_stats.py --arch 80 --all
"""

from __future__ import annotations

import argparse
import sys

from viditq_compile.kernels import aot

V = aot.QlinearVariant
VARIANTS = {
    "W8A8": V(),
    "W8A8+zero": V(zero=True),
    "W4A8 per channel": V(weight_bits=4, zero=True),
    "W4A8 g128": V(weight_bits=4, group=128, zero=True),
    "W4A4": V(weight_bits=4, packed_act=True, zero=True),
}
"""The table's rows (zero points where the method's int4 weights have them; bias, bf16 out)."""


def macs_per_instruction(b: aot.Binary, cfg) -> float:
    """Multiply-accumulates one K step of the tile does per SASS instruction a warp issues in it."""
    kw = cfg.kwargs
    return kw["BLOCK_M"] * kw["BLOCK_N"] * kw["BLOCK_K"] / max(b.loop_instructions * cfg.num_warps, 1)


def rows(arch: int, every: bool) -> list[tuple[str, aot.Binary, float]]:
    out = []
    for label, v in VARIANTS.items():
        built = []
        for cfg in v.configs(arch):
            b = aot.compile_qlinear(v, cfg, arch)
            built.append((label, b, macs_per_instruction(b, cfg)))
        if every:
            out += built
        else:
            clean = [r for r in built if r[1].loop_spills == 0] or built
            out.append(max(clean, key=lambda r: r[2]))
    return out


def table(arch: int, every: bool = False) -> str:
    lines = [f"| variant (sm_{arch}) | config | loop instructions | MAC / instruction | registers | stack B | "
             "loop spills | STS / LDS in loop | shared KiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, b, per in rows(arch, every):
        lines.append(f"| {label} | {b.config} | {b.loop_instructions} | {per:.0f} | {b.regs} | {b.stack} | "
                     f"{b.loop_spills} | {b.loop_sts} / {b.loop_lds} | {b.shared / 1024:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(aot.SHARED_LIMIT))
    parser.add_argument("--all", action="store_true", help="every kept config, not only the best")
    args = parser.parse_args(argv)
    reason = aot.unavailable_reason()
    if reason is not None:
        sys.stderr.write(f"aot_stats: cannot compile for CUDA targets here: {reason}\n")
        return 2
    sys.stdout.write(table(args.arch, args.all) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
