"""Tests for viditq_compile.kernels.int_gemm (Triton qlinear) against numerics.qlinear.

Without CUDA the kernel runs under TRITON_INTERPRET=1 (in a child pytest: ``tests/triton_interpreter.py``),
on tiny shapes; the CUDA tests use DiT-sized shapes.
"""

import pytest
import torch

from tests.triton_interpreter import skip_module_if_off

pytestmark = pytest.mark.triton_interpreter
skip_module_if_off()
triton = pytest.importorskip("triton", reason="triton is not importable: the Triton qlinear kernel cannot run")

from viditq_compile.kernels import int_gemm  # noqa: E402
from viditq_compile.kernels.int_gemm import qlinear_triton, supports  # noqa: E402
from viditq_compile.numerics import quant as numerics  # noqa: E402
from viditq_compile.numerics.packing import pack_int4, unpack_int4  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def make_operands(m, n, k, weight_bits, group, asym, has_bias, lead=None, unit=False, seed=0,
                  device=DEVICE):
    """Random quantized operands in qlinear's layout; unit=True: scales 1, no bias."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-8, 8) if weight_bits == 4 else (-128, 128)
    xq = torch.randint(-128, 128, (*(lead or (m,)), k), generator=g, dtype=torch.int8)
    wq = torch.randint(lo, hi, (n, k), generator=g, dtype=torch.int8)
    sshape = (n, k // group) if group else (n,)
    if unit:
        x_scale = torch.ones(*xq.shape[:-1], 1)
        w_scale = torch.ones(sshape)
    else:
        x_scale = torch.rand(*xq.shape[:-1], 1, generator=g) * 0.02 + 1e-3
        w_scale = torch.rand(sshape, generator=g) * 0.01 + 1e-4
    w_zero = torch.randint(lo // 2, hi // 2, sshape, generator=g, dtype=torch.int32) if asym else None
    bias = torch.randn(n, generator=g) if has_bias and not unit else None
    w_stored = pack_int4(wq) if weight_bits == 4 else wq
    ops = (xq, x_scale, w_stored, w_scale, w_zero, bias)
    return tuple(t.to(device) if t is not None else None for t in ops)


def reference(xq, x_scale, w_stored, w_scale, w_zero, bias, weight_bits, group, out_dtype):
    wq = unpack_int4(w_stored) if weight_bits == 4 else w_stored
    return numerics.qlinear(xq, x_scale, wq, w_scale, w_zero, bias, group or None, out_dtype)


def assert_epilogue_close(got, want, pre_bias=None, groups=0):
    """The float epilogue's tolerance. Under the interpreter (numpy, no FMA contraction): bit-exact.
    On GPU ptxas contracts ``acc * xs * ws + bias`` into one FMA (one rounding instead of two), so
    per-channel outputs are within 1 ulp (``eps * |v|``) of the larger of ``|acc * xs * ws|``
    (``pre_bias``) and ``|out|``; grouped weights contract ``out + acc_j * ws_j`` once per group,
    so ``groups + 1`` ulps of the output's largest magnitude (the partial sums may cancel). The
    integer part is exact everywhere (``test_integer_accumulation_exact``, ``test_cuda_integer_exact``)."""
    if int_gemm.INTERPRET:
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        return
    assert got.shape == want.shape and got.dtype == want.dtype
    got64, want64 = got.double(), want.double()
    mag = want64.abs() if pre_bias is None else torch.maximum(want64.abs(), pre_bias.double().abs())
    if groups:
        mag = torch.maximum(mag, want64.abs().max().expand_as(mag))
    eps = torch.finfo(torch.float32).eps
    tol = (groups + 1) * eps * mag
    bad = (got64 - want64).abs() > tol
    assert not bad.any(), (f"{int(bad.sum())} elements beyond {groups + 1} ulp; max |diff| "
                           f"{(got64 - want64).abs().max().item():.3g}")


CASES = [  # (weight_bits, group, asym)
    (8, 0, False), (8, 0, True), (4, 0, False), (4, 0, True),
    (8, 32, False), (8, 32, True), (4, 32, False), (4, 32, True),
]


@pytest.mark.parametrize("weight_bits,group,asym", CASES)
@pytest.mark.parametrize("m,n,k", [(1, 16, 32), (7, 48, 64), (33, 48, 96)])
def test_integer_accumulation_exact(m, n, k, weight_bits, group, asym):
    """Unit scales, no bias, fp32 out: the fp32 image of exact int32 sums (< 2^24) must match exactly."""
    ops = make_operands(m, n, k, weight_bits, group, asym, False, unit=True)
    got = qlinear_triton(*ops, weight_bits, group, torch.float32)
    want = reference(*ops, weight_bits, group, torch.float32)
    assert want.abs().max() < 2 ** 24
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("weight_bits,group,asym", CASES)
@pytest.mark.parametrize("has_bias", [False, True])
def test_fp32_epilogue_matches_reference(weight_bits, group, asym, has_bias):
    """Same fp32 operations in the same order: bit-exact under the interpreter; on GPU within the
    FMA contraction's ulps (``assert_epilogue_close``)."""
    m, n, k = 33, 48, 96
    ops = make_operands(m, n, k, weight_bits, group, asym, has_bias, seed=1)
    got = qlinear_triton(*ops, weight_bits, group, torch.float32)
    want = reference(*ops, weight_bits, group, torch.float32)
    pre_bias = want - ops[5] if has_bias else want
    assert_epilogue_close(got, want, pre_bias, groups=96 // group if group else 0)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight_bits,group,asym", [(8, 0, True), (4, 32, True)])
def test_half_outputs_within_one_rounding(out_dtype, weight_bits, group, asym):
    ops = make_operands(7, 48, 64, weight_bits, group, asym, True, seed=2)
    got = qlinear_triton(*ops, weight_bits, group, out_dtype)
    want32 = reference(*ops, weight_bits, group, torch.float32)
    assert got.dtype == out_dtype
    eps = torch.finfo(out_dtype).eps
    assert ((got.float() - want32).abs() <= eps * want32.abs() + 1e-6).all()  # one rounding: eps/2 rel


@pytest.mark.parametrize("activation", ["gelu_tanh", "silu"])
@pytest.mark.parametrize("weight_bits,group", [(8, 0), (4, 32)])
def test_activation_epilogue(activation, weight_bits, group):
    ops = make_operands(33, 16, 64, weight_bits, group, True, True, seed=3)
    got = qlinear_triton(*ops, weight_bits, group, torch.float32, activation=activation)
    pre = reference(*ops, weight_bits, group, torch.float32)
    f = torch.nn.functional
    want = f.gelu(pre, approximate="tanh") if activation == "gelu_tanh" else f.silu(pre)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
    got_bf16 = qlinear_triton(*ops, weight_bits, group, torch.bfloat16, activation=activation)
    torch.testing.assert_close(got_bf16, want.to(torch.bfloat16), rtol=8e-3, atol=1e-5)


@pytest.mark.parametrize("weight_bits,group", [(8, 0), (4, 32)])
def test_leading_dims(weight_bits, group):
    ops = make_operands(0, 48, 64, weight_bits, group, True, True, lead=(2, 3), seed=4)
    got = qlinear_triton(*ops, weight_bits, group, torch.float32)
    assert got.shape == (2, 3, 48)
    want = reference(*ops, weight_bits, group, torch.float32)
    assert_epilogue_close(got, want, want - ops[5], groups=64 // group if group else 0)


@pytest.mark.parametrize("weight_bits,asym", [(8, True), (4, True), (4, False)])
def test_k_tail_per_channel(weight_bits, asym):
    """K=48 with BLOCK_K=32: the second K block is half masked (packed: 24 of 16+16 bytes)."""
    ops = make_operands(5, 16, 48, weight_bits, 0, asym, True, seed=9)
    got = qlinear_triton(*ops, weight_bits, 0, torch.float32)
    want = reference(*ops, weight_bits, 0, torch.float32)
    assert_epilogue_close(got, want, want - ops[5])


def test_non_contiguous_activation():
    xq, xs, w, ws, wz, bias = make_operands(8, 16, 64, 8, 32, True, True, seed=10)
    xq_t = xq.t().contiguous().t()  # same values, column-major strides
    got = qlinear_triton(xq_t, xs, w, ws, wz, bias, 8, 32, torch.float32)
    want = reference(xq, xs, w, ws, wz, bias, 8, 32, torch.float32)
    assert_epilogue_close(got, want, want - bias, groups=2)


def test_extreme_activation_inputs_do_not_overflow():
    """Big pre-activations: gelu_tanh -> x or 0 and silu -> x or 0, with no inf/nan."""
    xq, xs, w, ws, wz, bias = make_operands(4, 16, 32, 8, 0, False, True, seed=11)
    bias = torch.linspace(-1e4, 1e4, 16, device=DEVICE)
    xs = xs * 0
    for act in ("gelu_tanh", "silu"):
        got = qlinear_triton(xq, xs, w, ws, wz, bias, 8, 0, torch.float32, activation=act)
        want = bias.clamp(min=0).expand(4, 16)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_prune_makes_block_k_divide_group():
    cfgs = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": bk}, num_warps=4, num_stages=3)
            for bk in (64, 128)]
    assert [c.kwargs["BLOCK_K"] for c in int_gemm._prune_configs(cfgs, {}, GROUP=0)] == [64, 128]
    assert [c.kwargs["BLOCK_K"] for c in int_gemm._prune_configs(cfgs, {}, GROUP=128)] == [64, 128]
    assert [c.kwargs["BLOCK_K"] for c in int_gemm._prune_configs(cfgs, {}, GROUP=96)] == [32]  # deduplicated


def test_prune_drops_tiles_that_spill_in_the_k_loop():
    """What the AOT sweep found: a 128-register accumulator fits beside Hopper's wgmma loop but
    spills on sm_80, grouped weights (two accumulators) spill above BLOCK_M = 64, zero points
    (row sums outside the loop) prune nothing, and W4A4 grouped with zero points keeps 8 warps on
    sm_80."""
    cfgs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in int_gemm.QLINEAR_CONFIGS]

    def tiles(group, arch, zero=False):
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps)
                for c in int_gemm.prune_configs(cfgs, group, arch, zero)]

    assert len(tiles(0, 90)) == len(tiles(0, 90, zero=True)) == len(cfgs)
    assert (128, 256, 8) not in tiles(0, 80) and (128, 128, 8) in tiles(0, 80)
    assert (128, 64, 4) in tiles(0, 80) and tiles(0, 80, zero=True) == tiles(0, 80)
    assert tiles(128, 90) == tiles(128, 80) == [(64, 256, 8), (64, 128, 4), (64, 64, 4)]
    assert tiles(128, 90, zero=True) == tiles(128, 90)
    w4a4 = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps)
            for c in int_gemm.prune_configs(cfgs, 128, 80, True, split=True, packed_act=True)]
    assert w4a4 == [(64, 256, 8)]
    pruned = int_gemm._prune_configs(cfgs, {"x_ptr": torch.empty(1)}, GROUP=128, HAS_ZERO=True)
    assert [(c.kwargs, c.num_warps) for c in pruned] == [(c.kwargs, c.num_warps)
                                                         for c in int_gemm.prune_configs(cfgs, 128, 90, True)]


def test_empty_m():
    ops = make_operands(0, 16, 32, 8, 0, False, False)
    assert qlinear_triton(*ops, 8, 0, torch.float32).shape == (0, 16)


def test_bf16_bias():
    xq, xs, w, ws, wz, bias = make_operands(7, 16, 32, 8, 0, True, True, seed=5)
    bias = bias.to(torch.bfloat16)
    got = qlinear_triton(xq, xs, w, ws, wz, bias, 8, 0, torch.float32)
    want = reference(xq, xs, w, ws, wz, bias, 8, 0, torch.float32)
    assert_epilogue_close(got, want, want - bias.float())


def test_supports():
    assert supports(1024, 4608, 1152, 4, 128)
    assert supports(1, 16, 32, 8, 0)
    assert not supports(8, 16, 40, 8, 0)      # K % 16
    assert not supports(8, 16, 64, 8, 24)     # group % 16
    assert not supports(8, 16, 96, 4, 48)     # odd multiple of 16: the K step would be 16 (int8 dot: K >= 32)
    assert not supports(8, 16, 64, 4, 16)
    assert supports(8, 16, 96, 4, 32) and supports(8, 16, 192, 4, 96)
    assert not supports(8, 16, 96, 4, 64)     # group does not divide K
    assert not supports(8, 16, 64, 2, 0)      # weight bits


def test_wrapper_errors():
    xq, xs, w, ws, wz, bias = make_operands(4, 16, 40, 8, 0, False, False)
    with pytest.raises(ValueError, match="K=40 is not a multiple of 16"):
        qlinear_triton(xq, xs, w, ws, wz, bias, 8, 0, torch.float32)
    xq, xs, w, ws, wz, bias = make_operands(4, 16, 48, 8, 24, False, False)
    with pytest.raises(ValueError, match="group_size=24 must be a multiple of 32"):
        qlinear_triton(xq, xs, w, ws, wz, bias, 8, 24, torch.float32)
    xq, xs, w, ws, wz, bias = make_operands(4, 16, 96, 8, 48, False, False)
    with pytest.raises(ValueError, match="group_size=48 must be a multiple of 32"):  # odd multiple of 16
        qlinear_triton(xq, xs, w, ws, wz, bias, 8, 48, torch.float32)
    xq, xs, w, ws, wz, bias = make_operands(4, 16, 32, 8, 0, False, False)
    with pytest.raises(ValueError, match="xq must be an int8"):  # the op's own checks are reused
        qlinear_triton(xq.float(), xs, w, ws, wz, bias, 8, 0, torch.float32)
    with pytest.raises(ValueError, match="w_scale must be fp32"):
        qlinear_triton(xq, xs, w, ws[:8], wz, bias, 8, 0, torch.float32)
    with pytest.raises(ValueError, match="packed uint8"):
        qlinear_triton(xq, xs, w, ws, wz, bias, 4, 0, torch.float32)
    with pytest.raises(ValueError, match="activation='relu'"):
        qlinear_triton(xq, xs, w, ws, wz, bias, 8, 0, torch.float32, activation="relu")
    with pytest.raises(ValueError, match="out_dtype"):
        qlinear_triton(xq, xs, w, ws, wz, bias, 8, 0, torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="out_dtype must be a float"):
        qlinear_triton(xq, xs, w, ws, wz, bias, 8, 0, torch.int32)


def test_non_contiguous_bias():
    """A bias view with stride 2 (every other element of a buffer): the kernel reads bias[n], not
    the buffer's n-th element."""
    xq, xs, w, ws, wz, _ = make_operands(9, 16, 32, 8, 0, True, False, seed=18)
    buffer = torch.randn(32, generator=torch.Generator().manual_seed(18)).to(DEVICE)
    bias = buffer[::2]
    assert bias.stride(0) == 2
    got = qlinear_triton(xq, xs, w, ws, wz, bias, 8, 0, torch.float32)
    want = reference(xq, xs, w, ws, wz, bias.contiguous(), 8, 0, torch.float32)
    assert_epilogue_close(got, want, want - bias.contiguous())


def test_launch_runs_under_the_operands_device_guard(monkeypatch):
    """The launch is inside ``device_guard(xq.device)`` (Triton launches on the current device;
    ``tests/kernels/test_launch.py`` checks the guard makes the tensors' device current)."""
    entered = []
    real = int_gemm.device_guard

    def recording(device):
        entered.append(device)
        return real(device)

    monkeypatch.setattr(int_gemm, "device_guard", recording)
    ops = make_operands(3, 16, 32, 8, 0, False, True, seed=19)
    qlinear_triton(*ops, 8, 0, torch.float32)
    assert entered == [ops[0].device]


def test_fp64_output_is_widened_fp32():
    ops = make_operands(7, 16, 32, 8, 0, True, True, seed=12)
    got = qlinear_triton(*ops, 8, 0, torch.float64)
    assert got.dtype == torch.float64
    want = reference(*ops, 8, 0, torch.float64)
    assert want.dtype == torch.float64
    assert_epilogue_close(got.float(), want.float(), want.float() - ops[5])
    assert torch.equal(got, got.float().double())  # the fp32 result widened, no more bits


# ---- fused tail: gate, residual; packed 4-bit activations --------------------------------------

@pytest.mark.parametrize("gate_shape", [None, (48,), (3, 1, 48), (3, 11, 48)])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("activation", ["none", "silu"])
def test_gate_and_residual_epilogue(gate_shape, with_residual, activation):
    """``act(y) * gate + residual`` in fp32 after the dequantization, as ``numerics.epilogue``:
    bit-exact without an activation under the interpreter (same fp32 ops, same order)."""
    g = torch.Generator().manual_seed(13)
    ops = make_operands(None, 48, 64, 4, 32, True, True, lead=(3, 11), seed=13)
    gate = torch.randn(gate_shape, generator=g).to(DEVICE) if gate_shape else None
    residual = torch.randn(3, 11, 48, generator=g).to(DEVICE) if with_residual else None
    got = qlinear_triton(*ops, 4, 32, torch.float32, activation, gate, residual)
    want = numerics.epilogue(reference(*ops, 4, 32, torch.float32), activation, gate, residual)
    exact = activation == "none" and int_gemm.INTERPRET
    tol = 0 if exact else 2e-6 if int_gemm.INTERPRET else 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_bf16_gate_residual_and_output_round_once():
    g = torch.Generator().manual_seed(14)
    ops = make_operands(None, 32, 64, 8, 0, False, True, lead=(2, 9), seed=14)
    gate = torch.randn(2, 1, 32, generator=g).to(DEVICE, torch.bfloat16)
    residual = torch.randn(2, 9, 32, generator=g).to(DEVICE, torch.bfloat16)
    got = qlinear_triton(*ops, 8, 0, torch.bfloat16, "gelu_tanh", gate, residual)
    want = numerics.epilogue(reference(*ops, 8, 0, torch.float32), "gelu_tanh", gate, residual)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=8e-3, atol=1e-5)  # one bf16 rounding


@pytest.mark.parametrize("weight_bits,group,asym", [(4, 0, True), (4, 32, False), (8, 0, True), (8, 32, True)])
@pytest.mark.parametrize("k", [64, 48])
def test_packed_4bit_activations(weight_bits, group, asym, k):
    """W4A4: activations packed two per byte are unpacked in registers; the integer part stays exact."""
    if group and k % group:
        pytest.skip("group must divide K")
    g = torch.Generator().manual_seed(15)
    xq, xs, w, ws, wz, bias = make_operands(19, 40, k, weight_bits, group, asym, True, seed=15)
    xq4 = torch.randint(-8, 8, xq.shape, generator=g, dtype=torch.int8).to(DEVICE)
    got = qlinear_triton(pack_int4(xq4), xs, w, ws, wz, bias, weight_bits, group, torch.float32,
                         packed_act=True)
    want = reference(xq4, xs, w, ws, wz, bias, weight_bits, group, torch.float32)
    assert_epilogue_close(got, want, want - bias, groups=k // group if group else 0)


def test_epilogue_operand_errors():
    xq, xs, w, ws, wz, bias = make_operands(None, 16, 32, 8, 0, False, False, lead=(2, 5))
    with pytest.raises(ValueError, match="gate of shape"):
        qlinear_triton(xq, xs, w, ws, wz, bias, 8, 0, torch.float32, gate=torch.ones(2, 5, 1, device=DEVICE))
    with pytest.raises(ValueError, match="gate of shape"):
        qlinear_triton(xq, xs, w, ws, wz, bias, 8, 0, torch.float32, gate=torch.ones(5, 16, device=DEVICE))
    with pytest.raises(ValueError, match="residual must be a float tensor of the output's shape"):
        qlinear_triton(xq, xs, w, ws, wz, bias, 8, 0, torch.float32, residual=torch.ones(2, 16, device=DEVICE))
    with pytest.raises(ValueError, match="packed_act=True needs xq as packed int4"):
        qlinear_triton(xq, xs, w, ws, wz, bias, 8, 0, torch.float32, packed_act=True)


# ---- CUDA: DiT-sized shapes -------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("weight_bits,group,asym", [(8, 0, False), (8, 0, True), (4, 128, True),
                                                    (4, 128, False), (4, 0, True), (8, 128, True)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_cuda_dit_shapes(weight_bits, group, asym, out_dtype):
    m, n, k = 1024, 4608, 1152
    ops = make_operands(m, n, k, weight_bits, group, asym, True, seed=6, device="cuda")
    got = qlinear_triton(*ops, weight_bits, group, out_dtype)
    want32 = reference(*ops, weight_bits, group, torch.float32)
    assert got.dtype == out_dtype
    if out_dtype == torch.float32:
        assert_epilogue_close(got, want32, want32 - ops[5], groups=k // group if group else 0)
    else:
        torch.testing.assert_close(got.float(), want32, rtol=8e-3, atol=1e-3)


@needs_cuda
@pytest.mark.parametrize("weight_bits,group", [(8, 0), (4, 128)])
def test_cuda_integer_exact(weight_bits, group):
    ops = make_operands(1000, 1152, 4608, weight_bits, group, True, False, unit=True, seed=7, device="cuda")
    got = qlinear_triton(*ops, weight_bits, group, torch.float32)
    torch.testing.assert_close(got, reference(*ops, weight_bits, group, torch.float32), rtol=0, atol=0)


@needs_cuda
def test_cuda_ragged_and_activation():
    ops = make_operands(77, 1152 + 16, 1152, 4, 128, True, True, seed=8, device="cuda")
    got = qlinear_triton(*ops, 4, 128, torch.bfloat16, activation="gelu_tanh")
    pre = reference(*ops, 4, 128, torch.float32)
    torch.testing.assert_close(got.float(), torch.nn.functional.gelu(pre, approximate="tanh"),
                               rtol=8e-3, atol=1e-3)


@needs_cuda
def test_cuda_fused_tail_dit_block_shape():
    """PixArt-Σ MLP fc2: 2 x 4096 tokens, K=4608 -> N=1152, adaLN gate [B, 1, N] and residual, bf16."""
    g = torch.Generator().manual_seed(16)
    ops = make_operands(None, 1152, 4608, 8, 0, False, True, lead=(2, 4096), seed=16, device="cuda")
    gate = torch.randn(2, 1, 1152, generator=g).to("cuda", torch.bfloat16)
    residual = torch.randn(2, 4096, 1152, generator=g).to("cuda", torch.bfloat16)
    got = qlinear_triton(*ops, 8, 0, torch.bfloat16, "none", gate, residual)
    want = numerics.epilogue(reference(*ops, 8, 0, torch.float32), "none", gate, residual)
    torch.testing.assert_close(got.float(), want, rtol=8e-3, atol=1e-3)


@needs_cuda
@pytest.mark.parametrize("weight_bits,group", [(4, 0), (4, 128)])
def test_cuda_w4a4_packed_activations(weight_bits, group):
    g = torch.Generator().manual_seed(17)
    xq, xs, w, ws, wz, bias = make_operands(2048, 1152, 1152, weight_bits, group, True, True, seed=17,
                                            device="cuda")
    xq4 = torch.randint(-8, 8, xq.shape, generator=g, dtype=torch.int8).cuda()
    got = qlinear_triton(pack_int4(xq4), xs, w, ws, wz, bias, weight_bits, group, torch.float32, packed_act=True)
    want = reference(xq4, xs, w, ws, wz, bias, weight_bits, group, torch.float32)
    assert_epilogue_close(got, want, want - bias, groups=1152 // group if group else 0)


# ---- the speed-ups' numerics (interpreter: other block configs than the default; on CUDA the --
# ---- autotuned ones, INTERPRET_CONFIG unused) ---------------------------------------------------

INT_CASES = [  # (weight_bits, group, asym, packed_act)
    (8, 0, False, False), (8, 0, True, False), (4, 0, True, False), (4, 128, True, False),
    (8, 128, True, False), (4, 0, True, True), (4, 128, False, True),
]


def _integer_exact(m, n, k, weight_bits, group, asym, packed_act, seed):
    """Unit scales, no bias, fp32 out: ``qlinear_triton`` equals the reference exactly."""
    g = torch.Generator().manual_seed(seed)
    xq, xs, w, ws, wz, _ = make_operands(m, n, k, weight_bits, group, asym, False, unit=True, seed=seed)
    if packed_act:
        xq = torch.randint(-8, 8, xq.shape, generator=g, dtype=torch.int8).to(DEVICE)
    got = qlinear_triton(pack_int4(xq) if packed_act else xq, xs, w, ws, wz, None, weight_bits, group,
                         torch.float32, packed_act=packed_act)
    want = reference(xq, xs, w, ws, wz, None, weight_bits, group, torch.float32)
    assert want.abs().max() < 2 ** 24 and want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("weight_bits,group,asym,packed_act", INT_CASES)
def test_block_k_128_integer_exact(monkeypatch, weight_bits, group, asym, packed_act):
    """BLOCK_K = 128 (the new autotune configs): per channel with a masked K tail (K = 320 is two
    full steps and a half one) and g128 (one step per group), exact."""
    monkeypatch.setattr(int_gemm, "INTERPRET_CONFIG", (16, 32, 128))
    k = 256 if group else 320
    _integer_exact(21, 40, k, weight_bits, group, asym, packed_act, seed=21)


@pytest.mark.parametrize("group_m", [1, 2, 3])
def test_grouped_program_order_covers_every_tile(monkeypatch, group_m):
    """The 1-D grid in grouped order (``_tile``): 5 M-tiles x 3 N-tiles in bands of ``group_m``
    (the last band narrower for 2 and 3): every output tile is computed once and exactly."""
    monkeypatch.setattr(int_gemm, "INTERPRET_CONFIG", (16, 16, 32))
    monkeypatch.setattr(int_gemm, "GROUP_M", group_m)
    for weight_bits, group, asym, packed_act in [(8, 0, True, False), (4, 32, True, False)]:
        _integer_exact(77, 40, 64, weight_bits, group, asym, packed_act, seed=group_m)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("k,seg", [(48, 48), (256, 128), (96, 32), (2304, 2304)])
def test_activation_rowsums_match_the_reference(packed, k, seg):
    """The zero-point row sums, computed once per call: exact int32 sums of each row's ``seg``-wide
    K segments (packed int4: both nibbles signed), against the unpacked tensor summed in torch. K =
    2304 takes three 1024-wide blocks (the last masked)."""
    g = torch.Generator().manual_seed(k + seg)
    lo, hi = (-8, 8) if packed else (-128, 128)
    xq = torch.randint(lo, hi, (13, k), generator=g, dtype=torch.int8)
    x2 = (pack_int4(xq) if packed else xq).to(DEVICE)
    got = int_gemm.activation_rowsums(x2, seg, packed)
    want = xq.to(torch.int64).reshape(13, k // seg, seg).sum(-1).to(torch.int32)
    assert got.dtype == torch.int32 and got.shape == (13, k // seg)
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)


def test_activation_rowsums_errors():
    x = torch.zeros(4, 64, dtype=torch.int8, device=DEVICE)
    with pytest.raises(ValueError, match="seg=48"):
        int_gemm.activation_rowsums(x, 48)
    with pytest.raises(ValueError, match="must be 2-D uint8"):
        int_gemm.activation_rowsums(x, 64, packed=True)
    with pytest.raises(ValueError, match="rowsum"):
        ops = make_operands(4, 16, 64, 8, 0, True, False)
        int_gemm.kernel_args(ops[0], ops[1], ops[2], ops[3], ops[4], None, None, None,
                             torch.empty(4, 16, device=DEVICE), 8, 0, "none", False, (4,))


# ---- the split int4 weight layout (int_gemm.split_int4) ------------------------------------------

@pytest.mark.parametrize("k", [128, 256, 48, 320, 1152])
def test_split_int4_round_trip_and_layout(k):
    """``split_int4`` of ``numerics.packing``'s layout: K padded with zeros to whole 128-wide chunks,
    byte c*64 + j holding K index c*128 + j (low nibble) and c*128 + 64 + j (high); ``unsplit_int4``
    gives the packed weights back bit-exact."""
    g = torch.Generator().manual_seed(k)
    q = torch.randint(-8, 8, (7, k), generator=g, dtype=torch.int8)
    packed = pack_int4(q)
    split = int_gemm.split_int4(packed)
    kpad = -(-k // 128) * 128
    assert split.dtype == torch.uint8 and split.shape == (7, kpad // 2)
    assert torch.equal(int_gemm.unsplit_int4(split, k), packed)
    qp = torch.nn.functional.pad(q, (0, kpad - k)).view(7, kpad // 128, 2, 64)
    # the same bytes as numerics.packing's layout of the chunks' halves interleaved (j, 64 + j)
    interleaved = qp.permute(0, 1, 3, 2).reshape(7, kpad)
    assert torch.equal(split, pack_int4(interleaved))
    v = split.view(torch.int8).view(7, kpad // 128, 64)
    assert torch.equal((v << 4) >> 4, qp[:, :, 0]) and torch.equal(v >> 4, qp[:, :, 1])


def test_split_int4_errors():
    with pytest.raises(ValueError, match="2-D uint8"):
        int_gemm.split_int4(torch.zeros(4, 8, dtype=torch.int8))
    with pytest.raises(ValueError, match="k=300"):
        int_gemm.unsplit_int4(torch.zeros(4, 64, dtype=torch.uint8), 300)
    with pytest.raises(ValueError, match="split_int4 layout"):
        ops = make_operands(4, 16, 64, 4, 0, False, False)
        int_gemm.kernel_args(ops[0], ops[1], ops[2], ops[3], None, None, None, None,
                             torch.empty(4, 16, device=DEVICE), 4, 0, "none", False, (4,))


def test_split_int4_cached_once_per_weight():
    """The transform runs once per weight tensor; an in-place change of the weight (its version
    counter) or another tensor object transforms again, and the entry goes with the weight."""
    w = pack_int4(torch.randint(-8, 8, (8, 256), generator=torch.Generator().manual_seed(3), dtype=torch.int8))
    first = int_gemm.split_int4_cached(w)
    assert int_gemm.split_int4_cached(w) is first
    w.copy_(pack_int4(torch.zeros(8, 256, dtype=torch.int8)))
    again = int_gemm.split_int4_cached(w)
    assert again is not first and torch.equal(again, int_gemm.split_int4(w))
    other = w.clone()
    assert int_gemm.split_int4_cached(other) is not again
    key = id(other)
    del other
    assert key not in int_gemm._SPLIT_CACHE


def test_split_int4_k_limit_and_configs():
    """The split layout's 16x-scaled int32 sums bound K (``INT4_SPLIT_MAX_K``) for int4 weights it
    serves (per channel, groups of 128), and its configs all step K by the 128-wide chunk."""
    from viditq_compile.config import capabilities as caps

    big = caps.INT4_SPLIT_MAX_K + 16
    assert supports(16, 16, caps.INT4_SPLIT_MAX_K, 4, 0)
    assert not supports(16, 16, big, 4, 0) and not supports(16, 16, big * 2, 4, 128)
    assert supports(16, 16, big, 8, 0) and supports(16, 16, big * 2, 4, 32)  # int8 / old layout
    cfgs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in int_gemm.QLINEAR_CONFIGS]
    split = int_gemm.prune_configs(cfgs, 0, 90, True, split=True)
    assert split and {c.kwargs["BLOCK_K"] for c in split} == {128}
    assert len(split) < len(int_gemm.prune_configs(cfgs, 0, 90, True))
