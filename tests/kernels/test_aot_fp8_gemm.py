"""The e4m3 Triton GEMM (``kernels.fp8_gemm``) compiled ahead of time for Hopper (sm_90) and Ada
(sm_89), without a GPU (``kernels.aot``), and refused on Ampere (sm_80).

Every variant x kept config must compile, run its dot on e4m3 tensor cores (``QGMMA`` wgmma on
sm_90, ``QMMA`` mma.sync on sm_89), hold no local-memory spill in the K loop, use at most 255
registers and the target's shared memory; on sm_90 the wgmma is asynchronous (a
``wgmma.wait_group 1`` leaves one K step's MMA in flight: Triton software-pipelines it, which it does
not for the int8 dot). The full sweep (about 56 binaries, about a minute on 2 cores) is slow; a
representative subset (a few seconds) runs in ``make test``.
"""

import os
import subprocess
import tempfile

import pytest

from viditq_compile.kernels import aot

pytestmark = pytest.mark.skipif(aot.unavailable_reason() is not None,
                                reason=f"cannot compile for CUDA targets here: {aot.unavailable_reason()}")

V = aot.Fp8Variant


def check(b: aot.Binary) -> None:
    where = f"{b.kernel} {b.variant} {b.config} sm_{b.arch}"
    want = "wgmma" if b.arch >= 90 else "mma"
    assert b.mma == want, f"{where}: dot lowered to {b.mma}, expected {want}"
    assert b.regs <= aot.MAX_REGS, f"{where}: {b.regs} registers"
    assert b.shared <= aot.SHARED_LIMIT[b.arch], f"{where}: {b.shared} B shared memory"
    assert b.loop_spills == 0, f"{where}: {b.loop_spills} local loads/stores inside the MMA loop (stack {b.stack} B)"


def _sass(compiled) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        return subprocess.run([aot._tool("nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout


def _inspect(v, cfg, arch):
    c = aot.build_fp8(v, cfg, arch)
    return c, aot.inspect(c, "_fp8_qlinear_kernel", v.name, aot.config_name(cfg), arch)


@pytest.mark.parametrize("variant", [V(), V(activation="gelu_tanh", gate=True, residual=True)], ids=lambda v: v.name)
def test_representative_sm90_binary_is_a_pipelined_qgmma(variant):
    compiled, b = _inspect(variant, aot.fp8_configs(90)[0], 90)
    check(b)
    assert "QGMMA" in _sass(compiled) and "E4M3.E4M3" in _sass(compiled)  # e4m3 operands, not upcast
    assert aot.wgmma_pending(compiled) >= 1, "the e4m3 wgmma is waited for at once (not pipelined)"


def test_representative_sm89_binary_is_a_qmma():
    check(_inspect(V(), aot.fp8_configs(89)[0], 89)[1])


def test_sm80_is_refused_and_does_not_compile():
    from viditq_compile.config.capabilities import fp8_unsupported_reason

    assert "no e4m3 tensor cores" in fp8_unsupported_reason(*aot.DIT_SHAPE, 80)
    with pytest.raises(aot.CompileError, match="fp8e4nv not supported"):
        aot.build_fp8(V(), aot.fp8_configs(89)[-1], 80)


def test_the_int8_wgmma_is_not_pipelined():
    """The comparison the fp8 route rests on: the int8 dot's wgmma is waited for at once."""
    cfg = aot.qlinear_configs(0, 90)[0]
    assert aot.wgmma_pending(aot.build_qlinear(aot.QlinearVariant(), cfg, 90)) == 0


@pytest.mark.slow
def test_k_not_a_multiple_of_16_spills_which_is_why_it_is_refused():
    """K = 72: the rows lose 16-byte alignment, the loads are not pipelined (32 KiB shared instead of
    128 KiB) and the K loop spills; ``fp8_unsupported_reason`` refuses such K."""
    b = aot.compile_fp8(V(), aot.fp8_configs(90)[0], 90, shape=(8192, 4608, 72))
    assert b.loop_spills > 0


@pytest.mark.slow
@pytest.mark.parametrize("arch", aot.FP8_ARCHS)
@pytest.mark.parametrize("variant", aot.FP8_VARIANTS, ids=lambda v: v.name)
def test_every_fp8_binary(variant, arch):
    for cfg in aot.fp8_configs(arch):
        compiled, b = _inspect(variant, cfg, arch)
        check(b)
        if arch >= 90:
            assert aot.wgmma_pending(compiled) >= 1, b.config
