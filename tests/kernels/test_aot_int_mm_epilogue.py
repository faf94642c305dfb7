"""The epilogue kernel after ``torch._int_mm`` (``kernels.int_mm_epilogue``) compiled ahead of time for
Hopper (sm_90) and Ampere (sm_80) without a GPU (``kernels.aot``): every autotune config of the plain
W8A8 tail, and the fused variants on one config, build, use at most 255 registers, no local memory
and the target's shared memory, and run no tensor-core instruction (the GEMM is cuBLAS')."""

import pytest
import torch

from viditq_compile.kernels import aot

pytestmark = pytest.mark.skipif(aot.unavailable_reason() is not None,
                                reason=f"cannot compile for CUDA targets here: {aot.unavailable_reason()}")

V = aot.QlinearVariant


def _configs():
    from viditq_compile.kernels import int_mm_epilogue

    return int_mm_epilogue.autotune_configs()


def check(b: aot.Binary) -> None:
    where = f"{b.kernel} {b.variant} {b.config} sm_{b.arch}"
    assert b.regs <= aot.MAX_REGS, f"{where}: {b.regs} registers"
    assert b.stack == 0 and b.spills == 0, f"{where}: {b.spills} local loads/stores (stack {b.stack} B)"
    assert b.shared <= aot.SHARED_LIMIT[b.arch], f"{where}: {b.shared} B shared memory"
    assert b.mma is None, f"{where}: a pointwise tail lowered to {b.mma}"


@pytest.mark.parametrize("arch", [90, 80])
def test_every_config_of_the_w8a8_tail_compiles_without_spills(arch):
    binaries = [aot.compile_int_mm_epilogue(V(), cfg, arch) for cfg in _configs()]
    assert len(binaries) == len(_configs()) >= 2
    for b in binaries:
        check(b)


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("variant", [V(zero=True, activation="gelu_tanh", gate=True, residual=True),
                                     V(zero=True, activation="silu"), V(bias=False, out_dtype=torch.float32)],
                         ids=lambda v: v.name)
def test_fused_variants_compile_without_spills(variant, arch):
    check(aot.compile_int_mm_epilogue(variant, _configs()[0], arch))
