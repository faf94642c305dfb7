"""Tests for viditq_compile.kernels.fp8_gemm (the e4m3 Triton qlinear) against numerics.fp8 /
numerics.quant.qlinear.

Without CUDA the kernel runs under TRITON_INTERPRET=1 (in a child pytest: ``tests/triton_interpreter.py``).
numpy has no fp8: the interpreter keeps e4m3 tensors as their bytes, decodes them exactly to fp16
for ``tl.dot`` and multiplies with ``np.matmul(..., dtype=float32)`` (an fp32 sum of exact products,
as a tensor core's fp32 accumulation), so the kernel is checked against the exact GEMM
(``fp8.fp8_gemm_ref``) within ``fp8.gemm_bound``, and bit-exact where every partial sum is exact.

The bound of one output (``bound``): the GEMM's ``gemm_bound`` scaled by ``|x_scale * w_scale|``,
plus one fp32 rounding for each of the two scale multiplies and the bias add (eps32 of the
magnitudes); a 16-bit output adds its one rounding (``eps`` of the output dtype).
"""

import pytest
import torch

from tests.triton_interpreter import skip_module_if_off

pytestmark = pytest.mark.triton_interpreter
skip_module_if_off()
triton = pytest.importorskip("triton", reason="triton is not importable: the e4m3 Triton GEMM cannot run")

from viditq_compile.config.capabilities import fp8_unsupported_reason  # noqa: E402
from viditq_compile.kernels import fp8_gemm  # noqa: E402
from viditq_compile.kernels.fp8_gemm import fp8_qlinear_triton, supports  # noqa: E402
from viditq_compile.numerics import fp8  # noqa: E402
from viditq_compile.numerics import quant as numerics  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
EPS32 = torch.finfo(torch.float32).eps
F = torch.nn.functional


def make_operands(m, n, k, lead=None, seed=0, has_bias=True, device=DEVICE, outliers=True):
    """e4m3 operands as the fp8 route makes them: per-token activations (a few outlier channels,
    as DiT activations have) and per-channel weights (``numerics.fp8`` quantizers)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*(lead or (m,)), k, generator=g)
    if outliers:
        x[..., :: max(k // 8, 1)] *= 20
    w = torch.randn(n, k, generator=g) * k ** -0.5
    xq, xs = fp8.quantize_per_token_fp8(x)
    qw = fp8.quantize_weight_fp8(w)
    bias = torch.randn(n, generator=g) if has_bias else None
    ops = (xq, xs, qw.q, qw.scale, bias)
    return tuple(t.to(device) if t is not None else None for t in ops)


def exact(xq, xs, wq, ws, bias):
    """``numerics.qlinear`` with the exact e4m3 GEMM (fp32 output)."""
    return numerics.qlinear(xq, xs, wq, ws, None, bias, None, torch.float32, gemm=fp8.fp8_gemm_ref)


def bound(xq, xs, wq, ws, bias):
    """Per-output tolerance against ``exact`` (module docstring), float64, of the output's shape."""
    k = xq.shape[-1]
    scale = (xs.reshape(-1, 1).double() * ws.double()).abs()
    pre = (fp8.fp8_gemm_ref(xq.reshape(-1, k), wq).double() * scale)
    tol = fp8.gemm_bound(xq.reshape(-1, k), wq) * scale * (1 + 4 * EPS32) + 3 * EPS32 * pre.abs()
    if bias is not None:
        tol = tol + 2 * EPS32 * (pre + bias.double()).abs()
    return tol.reshape(*xq.shape[:-1], wq.shape[0])


def assert_within(got, want, tol, what=""):
    assert got.shape == want.shape, (got.shape, want.shape)
    diff = (got.double() - want.double()).abs()
    bad = diff > tol
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} outputs beyond the bound; max |diff| "
                           f"{diff.max().item():.3g}, max diff/bound {(diff / tol.clamp_min(1e-300)).max().item():.3g}")


# ---- the GEMM --------------------------------------------------------------------------------

SHAPES = [(1, 16, 32), (7, 48, 64), (33, 80, 96), (65, 70, 48), (40, 64, 1152), (256, 1152, 1152)]
"""M below / not a multiple of the 32-row block, N tails of the 64-wide block (48, 80, 70), a K
tail (48 with BLOCK_K = 32), and DiT widths (K = 1152, 36 K steps; PixArt-Σ's attention projection 1152 x 1152
over 256 tokens). Measured under the interpreter: max |diff| / bound 0.032 (M=65, K=48), 1e-3 at K = 1152."""


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_within_the_gemm_bound_of_the_exact_result(m, n, k):
    ops = make_operands(m, n, k, seed=m + n + k)
    got = fp8_qlinear_triton(*ops, torch.float32)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert_within(got, exact(*ops), bound(*ops), f"M={m} N={n} K={k}")


def test_exact_partial_sums_are_bit_exact():
    """Small integers on the e4m3 grid with unit scales and no bias: every partial sum is an integer
    below 2^24, so any fp32 summation order is exact and the kernel must equal the exact GEMM
    (this checks the masking of the M, N and K tails without any tolerance)."""
    g = torch.Generator().manual_seed(3)
    m, n, k = 37, 70, 80
    xq = torch.randint(-8, 9, (m, k), generator=g).float().to(fp8.E4M3).to(DEVICE)
    wq = torch.randint(-8, 9, (n, k), generator=g).float().to(fp8.E4M3).to(DEVICE)
    got = fp8_qlinear_triton(xq, torch.ones(m, 1, device=DEVICE), wq, torch.ones(n, device=DEVICE), None,
                             torch.float32)
    want = fp8.fp8_gemm_ref(xq, wq)
    assert want.abs().max() < 2 ** 24
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_matches_the_fp32_reference_route():
    """Against what ``ops/cuda.py`` runs when it falls back (``fp8_gemm_fast``, an fp32 sum in
    another order): both within the bound of the exact result, so within twice it of each other."""
    ops = make_operands(33, 48, 256, seed=21)
    got = fp8_qlinear_triton(*ops, torch.float32)
    fast = numerics.qlinear(*ops[:4], None, ops[4], None, torch.float32, gemm=fp8.fp8_gemm_fast)
    assert_within(got, fast, 2 * bound(*ops), "vs fp8_gemm_fast")


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_output_dtypes_round_once(out_dtype):
    ops = make_operands(19, 48, 64, seed=4)
    got = fp8_qlinear_triton(*ops, out_dtype)
    assert got.dtype == out_dtype
    want = exact(*ops)
    if out_dtype == torch.float64:
        assert torch.equal(got, got.float().double())  # the fp32 result widened, no more bits
        assert_within(got, want, bound(*ops), "fp64")
        return
    eps = torch.finfo(out_dtype).eps
    assert_within(got, want, bound(*ops) + eps * want.double().abs(), str(out_dtype))  # one rounding: eps/2


def test_leading_dims_and_bf16_bias():
    xq, xs, wq, ws, bias = make_operands(None, 48, 64, lead=(2, 3), seed=5)
    bias = bias.to(torch.bfloat16)
    got = fp8_qlinear_triton(xq, xs, wq, ws, bias, torch.float32)
    assert got.shape == (2, 3, 48)
    assert_within(got, exact(xq, xs, wq, ws, bias), bound(xq, xs, wq, ws, bias.float()), "lead dims")


def test_empty_m():
    ops = make_operands(0, 16, 32, seed=6)
    assert fp8_qlinear_triton(*ops, torch.float32).shape == (0, 16)


def test_non_contiguous_activation_and_bias():
    xq, xs, wq, ws, _ = make_operands(8, 16, 64, seed=7)
    buffer = torch.randn(32, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    bias = buffer[::2]
    xq_t = xq.t().contiguous().t()  # same values, column-major strides
    got = fp8_qlinear_triton(xq_t, xs, wq, ws, bias, torch.float32)
    ops = (xq, xs, wq, ws, bias.contiguous())
    assert_within(got, exact(*ops), bound(*ops), "strided")


# ---- the fused tail --------------------------------------------------------------------------

@pytest.mark.parametrize("activation", ["gelu_tanh", "silu"])
def test_activation_epilogue(activation):
    ops = make_operands(33, 16, 64, seed=8)
    pre = exact(*ops)
    want = F.gelu(pre, approximate="tanh") if activation == "gelu_tanh" else F.silu(pre)
    got = fp8_qlinear_triton(*ops, torch.float32, activation=activation)
    # |d act / dx| <= 1.13: the GEMM bound carries through; 2e-6 for the activation formula itself
    assert_within(got, want, 1.13 * bound(*ops) + 2e-6 * (1 + want.double().abs()), activation)
    got_bf16 = fp8_qlinear_triton(*ops, torch.bfloat16, activation=activation)
    torch.testing.assert_close(got_bf16, want.to(torch.bfloat16), rtol=8e-3, atol=1e-5)


@pytest.mark.parametrize("gate_shape", [None, (48,), (3, 1, 48), (3, 11, 48)])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("activation", ["none", "silu"])
def test_gate_and_residual_epilogue(gate_shape, with_residual, activation):
    """``act(y) * gate + residual`` in fp32 after the dequantization, as ``numerics.epilogue``."""
    g = torch.Generator().manual_seed(9)
    ops = make_operands(None, 48, 64, lead=(3, 11), seed=9)
    gate = torch.randn(gate_shape, generator=g).to(DEVICE) if gate_shape else None
    residual = torch.randn(3, 11, 48, generator=g).to(DEVICE) if with_residual else None
    got = fp8_qlinear_triton(*ops, torch.float32, activation, gate, residual)
    want = numerics.epilogue(exact(*ops), activation, gate, residual)
    gmag = gate.abs().double().expand(3, 11, 48) if gate is not None else 1.0
    tol = (1.13 * bound(*ops) + 2e-6) * gmag + 2 * EPS32 * want.double().abs()
    assert_within(got, want, tol, f"gate {gate_shape} residual {with_residual} {activation}")


def test_bf16_gate_residual_and_output_round_once():
    g = torch.Generator().manual_seed(10)
    ops = make_operands(None, 32, 64, lead=(2, 9), seed=10)
    gate = torch.randn(2, 1, 32, generator=g).to(DEVICE, torch.bfloat16)
    residual = torch.randn(2, 9, 32, generator=g).to(DEVICE, torch.bfloat16)
    got = fp8_qlinear_triton(*ops, torch.bfloat16, "gelu_tanh", gate, residual)
    want = numerics.epilogue(exact(*ops), "gelu_tanh", gate, residual)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=8e-3, atol=1e-5)  # one bf16 rounding


# ---- arguments, the rule, the routing --------------------------------------------------------

def test_argument_errors():
    xq, xs, wq, ws, bias = make_operands(4, 16, 32, seed=11)
    with pytest.raises(ValueError, match="xq must be an int8"):  # int8 weights with e4m3 activations
        fp8_qlinear_triton(xq, xs, torch.zeros(16, 32, dtype=torch.int8, device=DEVICE), ws, bias, torch.float32)
    with pytest.raises(ValueError, match="w_q must be float8_e4m3fn"):  # both integer: the int8 kernel's
        fp8_qlinear_triton(torch.zeros(4, 32, dtype=torch.int8, device=DEVICE), xs,
                           torch.zeros(16, 32, dtype=torch.int8, device=DEVICE), ws, bias, torch.float32)
    with pytest.raises(ValueError, match="xq must be an e4m3 tensor"):
        fp8_qlinear_triton(xq.float(), xs, wq, ws, bias, torch.float32)
    with pytest.raises(ValueError, match="w_scale must be fp32"):
        fp8_qlinear_triton(xq, xs, wq, ws[:8], bias, torch.float32)
    with pytest.raises(ValueError, match="x_scale must be fp32"):
        fp8_qlinear_triton(xq, xs.double(), wq, ws, bias, torch.float32)
    with pytest.raises(ValueError, match="bias must be a float"):
        fp8_qlinear_triton(xq, xs, wq, ws, bias[:3], torch.float32)
    with pytest.raises(ValueError, match="activation='relu'"):
        fp8_qlinear_triton(xq, xs, wq, ws, bias, torch.float32, activation="relu")
    with pytest.raises(ValueError, match="out_dtype"):
        fp8_qlinear_triton(xq, xs, wq, ws, bias, torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="out_dtype must be a float"):
        fp8_qlinear_triton(xq, xs, wq, ws, bias, torch.int32)
    with pytest.raises(ValueError, match="residual must be a float tensor of the output's shape"):
        fp8_qlinear_triton(xq, xs, wq, ws, bias, torch.float32, residual=torch.ones(2, 16, device=DEVICE))
    with pytest.raises(ValueError, match="gate of shape"):
        fp8_qlinear_triton(xq, xs, wq, ws, bias, torch.float32, gate=torch.ones(4, 1, device=DEVICE))
    xq, xs, wq, ws, bias = make_operands(4, 16, 40, seed=12)
    with pytest.raises(ValueError, match="K=40 is not a multiple of 16"):
        fp8_qlinear_triton(xq, xs, wq, ws, bias, torch.float32)


def test_the_capability_rule():
    assert fp8_unsupported_reason(8192, 4608, 1152, 90) is None
    assert fp8_unsupported_reason(8192, 4608, 1152, 89) is None
    assert fp8_unsupported_reason(8192, 4608, 1152) is None
    assert "compute capability 8.0 has no e4m3 tensor cores (needs sm_89+)" == fp8_unsupported_reason(8, 16, 32, 80)
    assert fp8_unsupported_reason(8, 16, 40, 90) == "K=40 is not a multiple of 16"
    assert fp8_unsupported_reason(8, 0, 32, 90) is not None
    assert supports(1, 16, 32, DEVICE) and not supports(8, 16, 40, DEVICE)


def test_prune_keeps_the_tiles_that_fit_each_target():
    """What the AOT sweep measured (``tile_fits``): promoting every 128 K on sm_90 holds two
    accumulators, so the 128-register tiles go; sm_89 has less shared memory and ``mma.sync``."""
    cfgs = fp8_gemm.autotune_configs()

    def tiles(arch, promote=fp8_gemm.PROMOTE_EVERY):
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in cfgs
                if fp8_gemm.tile_fits(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps,
                                      c.num_stages, arch, promote)]

    assert tiles(90) == [(128, 128, 8, 4), (128, 64, 4, 4), (64, 128, 4, 4), (64, 64, 4, 4)]
    assert tiles(89) == [(128, 64, 4, 4), (64, 128, 4, 4), (64, 64, 4, 4)]
    assert len(tiles(90, None)) == len(cfgs)  # Triton's fast accumulation: one accumulator
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
            for c in fp8_gemm.prune_configs(cfgs, 90)] == tiles(90)
    assert len(fp8_gemm._prune_configs(cfgs, {"x_ptr": torch.empty(1)})) in (1, len(tiles(90)))


def test_launch_runs_under_the_operands_device_guard(monkeypatch):
    entered = []
    real = fp8_gemm.device_guard

    def recording(device):
        entered.append(device)
        return real(device)

    monkeypatch.setattr(fp8_gemm, "device_guard", recording)
    ops = make_operands(3, 16, 32, seed=13)
    fp8_qlinear_triton(*ops, torch.float32)
    assert entered == [ops[0].device]


@pytest.mark.parametrize("arch", [80, 90])
def test_the_cuda_route_refuses_sm80_and_logs_it(monkeypatch, arch, caplog):
    """``ops/cuda.py``'s e4m3 branch on a device of compute capability ``arch`` (faked): sm_90 runs
    the kernel; sm_80 runs the reference, logged once and listed by ``fallbacks()`` with the reason."""
    from viditq_compile.ops import cuda

    calls = []
    real = fp8_gemm.fp8_qlinear_triton
    monkeypatch.setattr(fp8_gemm, "device_arch", lambda device: arch)
    monkeypatch.setattr(fp8_gemm, "fp8_qlinear_triton", lambda *a: calls.append(a) or real(*a))
    m, n, k = 5, 16 + arch // 10, 64  # a shape of its own: fallbacks() is per process
    ops = make_operands(m, n, k, seed=14)
    with caplog.at_level("WARNING", logger="viditq_compile.ops.cuda"):
        got = cuda.qlinear_cuda(*ops[:4], None, ops[4], 8, 0, torch.float32)
    assert_within(got, exact(*ops), bound(*ops), f"sm_{arch}")
    key = (cuda.QLINEAR.name, m, n, k, "fp8_e4m3", 0)
    if arch == 90:
        assert len(calls) == 1 and key not in cuda.fallbacks()
    else:
        assert calls == []
        assert cuda.fallbacks()[key] == "e4m3 operands: compute capability 8.0 has no e4m3 tensor cores (needs sm_89+)"
        assert "runs the reference path (compute capability 8.0" in caplog.text


# ---- CUDA: DiT-sized shapes -------------------------------------------------------------------

GPU_SLACK = 2.0 ** 11
"""On the GPU (sm_90) the wgmma partial sums of ``PROMOTE_EVERY`` products are accumulated in the
tensor core at below fp32 precision (about 14 bits, DeepSeek-V3 §3.3.2): the bound of an accumulator
with 2^-13 relative error instead of 2^-24. Not measured yet (no GPU was lent)."""


@needs_cuda
@pytest.mark.parametrize("m,n,k", [(1024, 4608, 1152), (77, 1152 + 16, 4608), (8192, 1152, 4608)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_cuda_dit_shapes(m, n, k, out_dtype):
    if not supports(m, n, k, "cuda"):
        pytest.skip(f"the device has no e4m3 tensor cores: {fp8_unsupported_reason(m, n, k, 80)}")
    ops = make_operands(m, n, k, seed=15, device="cuda")
    got = fp8_qlinear_triton(*ops, out_dtype)
    want = exact(*ops)
    tol = GPU_SLACK * bound(*ops)
    if out_dtype != torch.float32:
        tol = tol + torch.finfo(out_dtype).eps * want.double().abs()
    assert_within(got, want, tol, f"cuda M={m} N={n} K={k}")
