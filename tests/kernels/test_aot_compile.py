"""The Triton kernels compiled ahead of time for Hopper (sm_90) and Ampere (sm_80), without a GPU
(``viditq_compile.kernels.aot``): what a GPU would build, checked in CI.

For every kernel x variant the library launches x autotune config (after the library's pruning) x
target, each binary must: compile (TTIR to cubin through ptxas); run its dots on tensor cores, as
warpgroup ``wgmma`` on sm_90 and ``mma.sync`` on sm_80; hold no local-memory spill inside the
loop around the MMA (the K loop, or the group loop around it); use at most 255 registers per
thread and at most the target's shared memory per block (227 KiB on sm_90, 163 KiB on sm_80).
Spills outside the loop (the epilogue's) are allowed and recorded in the kernel table. And
``supports()`` agrees with the table: what it accepts compiles, the group sizes it refuses do not.

The full sweep (about 330 binaries: about 4 minutes on 2 cores, 1.5 minutes once Triton's cache
holds them) is marked slow; a representative subset (about 10 s) runs in ``make test``. Skips
when triton has no CUDA backend or ptxas (``aot.unavailable_reason``).
"""

import re

import pytest
import torch

from viditq_compile.kernels import aot

pytestmark = pytest.mark.skipif(aot.unavailable_reason() is not None,
                                reason=f"cannot compile for CUDA targets here: {aot.unavailable_reason()}")

ARCHS = (90, 80)
V = aot.QlinearVariant


def check(b: aot.Binary, tensor_cores: bool = True) -> None:
    """The properties every binary must have (see the module docstring)."""
    where = f"{b.kernel} {b.variant} {b.config} sm_{b.arch}"
    if tensor_cores:
        want = "wgmma" if b.arch >= 90 else "mma"
        assert b.mma == want, f"{where}: dot lowered to {b.mma}, expected {want}"
    assert b.regs <= aot.MAX_REGS, f"{where}: {b.regs} registers"
    assert b.shared <= aot.SHARED_LIMIT[b.arch], f"{where}: {b.shared} B shared memory"
    assert b.loop_spills == 0, f"{where}: {b.loop_spills} local loads/stores inside the MMA loop (stack {b.stack} B)"


def _params(variants):
    """``(variant, config, arch)`` for every pruned autotune config of each variant on each target."""
    if aot.unavailable_reason() is not None:
        return []
    return [(v, cfg, arch) for v in variants for arch in ARCHS for cfg in v.configs(arch)]


def _ids(params):
    return [f"{v.name}-{aot.config_name(cfg)}-sm{arch}" for v, cfg, arch in params]


# ---- fast: a representative subset (make test) ------------------------------------------------

FAST = [  # the heaviest register users of the sweep, each with its largest kept tile
    V(),                                                                             # W8A8
    V(weight_bits=4, group=128, zero=True),                                          # W4A8 g128: two accumulators
    V(weight_bits=4, packed_act=True, zero=True, activation="gelu_tanh", gate=True, residual=True),  # W4A4 + tail
]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", FAST, ids=lambda v: v.name)
def test_representative_qlinear_binaries(variant, arch):
    check(aot.compile_qlinear(variant, variant.configs(arch)[0], arch))


@pytest.mark.parametrize("variant", [aot.QuantizeVariant(k=4608, rotate=True, smooth=True, rowsum=True),
                                     aot.QuantizeVariant(k=1152, act_bits=4, pack=True)],
                         ids=lambda v: v.name)
def test_representative_quantize_binaries(variant):
    b = aot.compile_quantize(variant, 90)
    check(b, tensor_cores=variant.rotate)
    if not variant.rotate:
        assert b.mma is None


def test_the_refused_group_sizes_do_not_compile_and_supports_refuses_them():
    """Group 48: the pruner's BLOCK_K = gcd(64, 48) = 16, below the int8 dot's K = 32."""
    from viditq_compile.kernels.int_gemm import supports

    v = V(weight_bits=4, group=48, zero=True)
    assert not supports(8192, 4608, 1152, 4, 48)
    cfg = aot.qlinear_configs(48, 90, True)[0]
    assert cfg.kwargs["BLOCK_K"] == 16
    with pytest.raises(aot.CompileError, match="K >= 32"):
        aot.compile_qlinear(v, cfg, 90)


def test_row_offsets_are_int64():
    """``m * stride_xm`` (and N·K, M·N) pass 2^31 at DiT sizes (65536 tokens x 15360): each row
    stride enters the offset arithmetic only widened to i64, never splatted as an i32 tensor."""
    v = V(gate=True, residual=True)
    ttir = aot.build_qlinear(v, aot.qlinear_configs(0, 90)[0], 90).asm["ttir"]
    lines = ttir.splitlines()
    start = next(i for i, line in enumerate(lines) if "tt.func" in line) + 1  # after the signature
    for stride in ("stride_xm", "stride_wn", "stride_gm", "stride_rm", "stride_om"):
        uses = [line.strip() for line in lines[start:] if re.search(rf"%{stride}\b", line)]
        assert uses, f"{stride} unused"
        for use in uses:
            assert re.search(rf"arith\.extsi %{stride} : i32 to i64", use), f"{stride} used as i32: {use}"


def test_sass_stats_find_spills_inside_the_loop():
    """The SASS reader on a hand-made listing: a loop from .L_x_1 back to its branch, an MMA, a
    spill, a shared store and two shared loads inside it; a spill, a store and a load outside
    (``LDGSTS``, an asynchronous copy, is neither)."""
    sass = """
        /*0000*/                   STL [R1], R2 ;
        /*0008*/                   STS [R4], R5 ;
.L_x_1:
        /*0010*/                   IGMMA.64x128x32.S8.S8 R88, gdesc[UR8], R88 ;
        /*0020*/                   LDL R3, [R1+0x4] ;
        /*0028*/                   STS.128 [R6], R8 ;
        /*0030*/                   LDS R9, [R6] ;
        /*0038*/                   LDSM.16.M88.4 R12, [R6] ;
        /*0040*/                   LDGSTS.E.128 [R7], desc[UR4][R10.64] ;
        /*0048*/              @P0 BRA `(.L_x_1) ;
        /*0050*/                   LDS R9, [R6] ;
        /*0058*/                   EXIT ;
"""
    stats = aot.sass_stats(sass)
    assert stats == {"mma": "wgmma", "spills": 2, "loop_spills": 1, "loop_instructions": 7, "loop_sts": 1,
                     "loop_lds": 2}
    assert aot.sass_stats(sass.replace("IGMMA.64x128x32.S8.S8", "IMMA.16816.S8.S8"))["mma"] == "mma"


def test_every_variant_in_the_sweep_is_supported():
    """The sweep covers what ``supports`` accepts at DiT shapes, and nothing it refuses."""
    from viditq_compile.kernels.int_gemm import supports

    m, n, k = aot.DIT_SHAPE
    for v in aot.QLINEAR_VARIANTS:
        assert supports(m, n, k, v.weight_bits, v.group), v.name
    for g in aot.REFUSED_GROUPS:
        assert not supports(m, n, 2 * 3 * 5 * g, 4, g), g  # refused even where g divides K


# ---- slow: the full sweep ----------------------------------------------------------------------

QLINEAR_PARAMS = _params(aot.QLINEAR_VARIANTS)
REFUSED_PARAMS = _params([V(weight_bits=4, group=g, zero=True) for g in aot.REFUSED_GROUPS])


@pytest.mark.slow
@pytest.mark.parametrize("variant,cfg,arch", QLINEAR_PARAMS, ids=_ids(QLINEAR_PARAMS))
def test_every_qlinear_binary(variant, cfg, arch):
    check(aot.compile_qlinear(variant, cfg, arch))


@pytest.mark.slow
@pytest.mark.parametrize("variant,cfg,arch", REFUSED_PARAMS, ids=_ids(REFUSED_PARAMS))
def test_every_refused_group_fails_to_compile(variant, cfg, arch):
    """Every config of a group that is an odd multiple of 16 gets BLOCK_K = 16, and fails."""
    assert cfg.kwargs["BLOCK_K"] == 16
    with pytest.raises(aot.CompileError, match="K >= 32"):
        aot.compile_qlinear(variant, cfg, arch)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", aot.QUANTIZE_VARIANTS, ids=lambda v: v.name)
def test_every_quantize_binary(variant, arch):
    """The rotating kernel (16-bit x, dynamic scale, not packed: every DiT width) dots on tensor
    cores; the row kernel has no dot."""
    b = aot.compile_quantize(variant, arch)
    rotating = variant.rotate and variant.dtype != torch.float32 and not variant.pack and not variant.static
    assert (b.kernel == "_quantize_rotated_row_kernel") == rotating
    check(b, tensor_cores=rotating)
    if not rotating:
        assert b.mma is None


def test_zero_points_add_nothing_to_the_k_loop():
    """The activation row sums come from ``int_gemm.activation_rowsums`` (once per call), so with zero
    points the K loop is the symmetric one: measured (triton 3.9, sm_90, 128x256x128) 151 SASS
    instructions both, where summing the rows in the loop took 320. The row-sum kernel compiles."""
    cfg = aot.qlinear_configs(0, 90, True)[0]
    assert cfg.kwargs["BLOCK_K"] == 128
    sym, asym = (aot.compile_qlinear(V(zero=z), cfg, 90) for z in (False, True))
    for b in (sym, asym):
        check(b)
    assert asym.loop_instructions <= 1.05 * sym.loop_instructions, (asym.loop_instructions, sym.loop_instructions)
    for packed, seg in ((False, 0), (True, 0), (False, 128)):
        rs = aot.compile_rowsum(packed, 90, seg=seg)
        assert rs.regs <= aot.MAX_REGS and rs.spills == 0, rs


@pytest.mark.parametrize("arch", ARCHS)
def test_split_int4_weights_unpack_cheaply(arch):
    """int4 weights in the split layout (``int_gemm.split_int4``): every kept config steps K by the
    128-wide chunk, and the first compiles to tensor cores without loop spills. On sm_90 a K step of
    W4A8 per channel then costs little more than W8A8's at the same tile: measured (triton 3.9,
    256x128x128) 177 SASS instructions against 151, where the interleaved layout's shifts and
    shuffles took 535."""
    v = V(weight_bits=4, zero=True)
    assert v.split and v.configs(arch) and {c.kwargs["BLOCK_K"] for c in v.configs(arch)} == {128}
    cfg = v.configs(arch)[0]
    w4 = aot.compile_qlinear(v, cfg, arch)
    check(w4)
    if arch >= 90:
        cfg = next(c for c in v.configs(arch) if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) == (256, 128))
        w4, w8 = (aot.compile_qlinear(u, cfg, arch) for u in (v, V(zero=True)))
        assert w4.loop_instructions <= 1.3 * w8.loop_instructions, (w4.loop_instructions, w8.loop_instructions)
