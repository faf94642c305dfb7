"""``kernels.int_mm_epilogue`` (the epilogue after ``torch._int_mm``, and the whole route) against the
numerics reference: ``numerics.qlinear`` (int64 GEMM, ``dequantize_epilogue``) then
``numerics.epilogue`` and the cast.

Without CUDA the kernel runs under TRITON_INTERPRET=1 (a child pytest: ``tests/triton_interpreter.py``)
and ``torch._int_mm`` on the CPU; there the float part is bit-exact (no FMA contraction), the
activations within 2e-6 (fp32) as for the Triton GEMM."""

import pytest
import torch

from tests.triton_interpreter import skip_module_if_off

pytestmark = pytest.mark.triton_interpreter
skip_module_if_off()
pytest.importorskip("triton", reason="triton is not importable: the epilogue kernel cannot run")

from viditq_compile.kernels import gemm_choice, int_mm_epilogue  # noqa: E402
from viditq_compile.kernels.int_mm_epilogue import int_mm_epilogue_triton, int_mm_qlinear  # noqa: E402
from viditq_compile.numerics import quant as numerics  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def operands(lead, n, k, asym, bias=True, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    xq = torch.randint(-128, 128, (*lead, k), generator=g, dtype=torch.int8)
    wq = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    xs = torch.rand(*lead, 1, generator=g) * 0.02 + 1e-3
    ws = torch.rand(n, generator=g) * 0.01 + 1e-4
    wz = torch.randint(-64, 64, (n,), generator=g, dtype=torch.int32) if asym else None
    b = torch.randn(n, generator=g) if bias else None
    return tuple(t.to(device) if t is not None else None for t in (xq, xs, wq, ws, wz, b))


def reference(xq, xs, wq, ws, wz, b, out_dtype, activation="none", gate=None, residual=None):
    y = numerics.qlinear(xq.cpu(), xs.cpu(), wq.cpu(), ws.cpu(), None if wz is None else wz.cpu(),
                         None if b is None else b.cpu(), None, torch.float32)
    return numerics.epilogue(y, activation, None if gate is None else gate.cpu(),
                             None if residual is None else residual.cpu()).to(out_dtype)


def exact_or_fma(got, want):
    """Bit-exact under the interpreter; on a GPU ptxas may contract ``acc * xs * ws + bias`` into an
    FMA (1 ulp of the larger of the terms)."""
    if int_mm_epilogue.INTERPRET:
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    else:
        torch.testing.assert_close(got, want, rtol=2 ** -22, atol=1e-6)


@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("m,n,k", [(17, 8, 8), (40, 72, 48), (33, 24, 136)])
def test_route_matches_the_reference_per_channel(m, n, k, asym):
    ops = operands((m,), n, k, asym)
    out = int_mm_qlinear(*ops, torch.float32)
    exact_or_fma(out.cpu(), reference(*ops, torch.float32))


def test_integer_part_is_exact_with_unit_scales():
    xq, _, wq, _, wz, _ = operands((37,), 24, 64, True)
    xs, ws = torch.ones(37, 1, device=DEVICE), torch.ones(24, device=DEVICE)
    out = int_mm_qlinear(xq, xs, wq, ws, wz, None, torch.float64)
    exact = (xq.cpu().long() @ (wq.cpu().long() - wz.cpu().long()[:, None]).t()).double()
    assert torch.equal(out.cpu(), exact)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_16_bit_output_is_the_cast_of_the_fp32_value(out_dtype):
    ops = operands((2, 11), 40, 32, False)
    out = int_mm_qlinear(*ops, out_dtype)
    assert out.shape == (2, 11, 40) and out.dtype == out_dtype
    want32 = reference(*ops, torch.float32)
    eps = torch.finfo(out_dtype).eps  # one rounding (the interpreter's cast truncates: up to one ulp)
    assert ((out.cpu().float() - want32).abs() <= eps * want32.abs() + 1e-6).all()


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("asym,activation,fused", [(False, "none", False), (True, "gelu_tanh", True),
                                                   (True, "silu", False)])
def test_route_equals_the_triton_gemm(out_dtype, asym, activation, fused):
    """Both routes end in the same ``store_epilogue`` after the same fp32 operations: bit-exact
    under the interpreter (a GPU may contract differently: one rounding of the output)."""
    from viditq_compile.kernels.int_gemm import qlinear_triton

    ops = operands((2, 10), 40, 64, asym, seed=4)
    g = torch.Generator().manual_seed(8)
    gate = torch.randn(2, 1, 40, generator=g).to(DEVICE) if fused else None
    residual = torch.randn(2, 10, 40, generator=g).to(DEVICE) if fused else None
    got = int_mm_qlinear(*ops, out_dtype, activation, gate, residual)
    want = qlinear_triton(*ops, 8, 0, out_dtype, activation, gate, residual)
    if int_mm_epilogue.INTERPRET:
        assert torch.equal(got, want)
    else:
        eps = torch.finfo(out_dtype).eps
        assert ((got.float() - want.float()).abs() <= 2 * eps * want.float().abs() + 1e-5).all()


@pytest.mark.parametrize("activation", ["gelu_tanh", "silu"])
def test_activations_within_tolerance(activation):
    ops = operands((45,), 32, 32, True)
    out = int_mm_qlinear(*ops, torch.float32, activation)
    torch.testing.assert_close(out.cpu(), reference(*ops, torch.float32, activation), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("gate_shape", [(2, 1, 48), (48,), (2, 9, 48)])
def test_gate_and_residual_broadcast_as_the_reference(gate_shape):
    ops = operands((2, 9), 48, 64, False)
    g = torch.Generator().manual_seed(7)
    gate = torch.randn(gate_shape, generator=g).to(DEVICE)
    residual = torch.randn(2, 9, 48, generator=g).to(DEVICE)
    out = int_mm_qlinear(*ops, torch.float32, "none", gate, residual)
    exact_or_fma(out.cpu(), reference(*ops, torch.float32, "none", gate, residual))
    out16 = int_mm_qlinear(*ops, torch.bfloat16, "gelu_tanh", gate.bfloat16(), residual.bfloat16())
    want16 = reference(*ops, torch.bfloat16, "gelu_tanh", gate.bfloat16(), residual.bfloat16())
    torch.testing.assert_close(out16.cpu().float(), want16.float(), rtol=8e-3, atol=1e-5)


def test_epilogue_alone_on_a_given_accumulator_and_row_sums():
    g = torch.Generator().manual_seed(3)
    acc = torch.randint(-2 ** 20, 2 ** 20, (19, 40), generator=g, dtype=torch.int32)
    rowsum = torch.randint(-4000, 4000, (19,), generator=g, dtype=torch.int32)
    xs, ws = torch.rand(19, 1, generator=g), torch.rand(40, generator=g)
    wz = torch.randint(-9, 9, (40,), generator=g, dtype=torch.int32)
    bias = torch.randn(40, generator=g).bfloat16()
    want = numerics.dequantize_epilogue(acc, xs, ws, wz, rowsum[:, None], bias)
    dev = [t.to(DEVICE) for t in (acc, xs, ws, wz, rowsum, bias)]
    got = int_mm_epilogue_triton(dev[0], dev[1], dev[2], dev[3], dev[4], dev[5], torch.float32)
    exact_or_fma(got.cpu(), want)


def test_wrapper_refuses_bad_operands_by_name():
    acc = torch.zeros(17, 8, dtype=torch.int32)
    xs, ws = torch.ones(17, 1), torch.ones(8)
    with pytest.raises(ValueError, match="acc must be int32"):
        int_mm_epilogue_triton(acc.float(), xs, ws, None, None, None, torch.float32)
    with pytest.raises(ValueError, match="w_zero and x_rowsum come together"):
        int_mm_epilogue_triton(acc, xs, ws, torch.zeros(8, dtype=torch.int32), None, None, torch.float32)
    with pytest.raises(ValueError, match=r"w_scale must be fp32 \[N=8\]"):
        int_mm_epilogue_triton(acc, xs, torch.ones(9), None, None, None, torch.float32)
    with pytest.raises(ValueError, match="out_dtype=torch.int32"):
        int_mm_epilogue_triton(acc, xs, ws, None, None, None, torch.int32)
    with pytest.raises(ValueError, match=r"lead=\(3, 5\) has 15 rows"):
        int_mm_epilogue_triton(acc, xs, ws, None, None, None, torch.float32, lead=(3, 5))
    with pytest.raises(ValueError, match="residual must be a float tensor of shape"):
        int_mm_epilogue_triton(acc, xs, ws, None, None, None, torch.float32, residual=torch.zeros(17, 9))
    with pytest.raises(ValueError, match="does not broadcast"):
        int_mm_epilogue_triton(acc, xs, ws, None, None, None, torch.float32, gate=torch.zeros(3, 8))


@pytest.mark.parametrize("m,n,k,bits,needle", [(16, 8, 16, 8, "M=16"), (32, 12, 16, 8, "N=12"),
                                               (32, 16, 32, 4, "int8")])
def test_route_refuses_what_int_mm_cannot_take(m, n, k, bits, needle):
    from viditq_compile.numerics.packing import pack_int4

    xq, xs, wq, ws, _, _ = operands((m,), n, k, False, bias=False, device="cpu")
    if bits == 4:
        wq = pack_int4(wq.clamp(-8, 7))
        needle = "qlinear_fused"  # the op contract refuses W4 for this W8 route first
    with pytest.raises(ValueError, match=needle):
        int_mm_qlinear(xq, xs, wq, ws, None, None, torch.float32)


def test_forced_int_mm_through_the_cuda_op_implementation():
    """``ops/cuda.qlinear_cuda`` with the route forced: ``torch._int_mm`` + this kernel ran (its
    route is listed), the reference's numbers; a shape ``_int_mm`` refuses runs the Triton GEMM
    and says why."""
    from viditq_compile.ops import cuda

    gemm_choice.clear()
    ops = operands((2, 12), 48, 64, True)
    with gemm_choice.forced("int_mm"):
        out = cuda.qlinear_cuda(*ops, 8, 0, torch.float32, "silu")
        small = cuda.qlinear_cuda(*operands((12,), 48, 64, False), 8, 0, torch.float32)
    torch.testing.assert_close(out.cpu(), reference(*ops, torch.float32, "silu"), rtol=2e-6, atol=2e-6)
    assert small.shape == (12, 48)
    cap = gemm_choice.device_capability(torch.device(DEVICE))
    got = cuda.routes()
    assert got[(32, 64, 48, "w8a8-asym+bias+silu->float32", cap)] == "int_mm: forced"
    assert got[(16, 64, 48, "w8a8-sym+bias->float32", cap)] == \
        "triton: VIDITQ_GEMM_ROUTE=int_mm forced, but M=12: torch._int_mm needs M > 16"


@needs_cuda
@pytest.mark.parametrize("asym", [False, True])
def test_cuda_dit_shape_route_matches_the_reference(asym):
    ops = operands((2, 1024), 1152, 1152, asym)
    out = int_mm_qlinear(*ops, torch.float32)
    exact_or_fma(out.cpu(), reference(*ops, torch.float32))


@needs_cuda
def test_cuda_auto_choice_times_both_routes_once_per_bucket():
    from viditq_compile.ops import cuda

    gemm_choice.clear()
    ops = operands((2048,), 1152, 1152, False)
    first = cuda.qlinear_cuda(*ops, 8, 0, torch.bfloat16)
    choice, = gemm_choice.routes().values()
    assert "timed" in choice.reason and {r for r, _ in choice.times} == set(gemm_choice.ROUTES)
    again = cuda.qlinear_cuda(*ops, 8, 0, torch.bfloat16)
    assert torch.equal(first, again)
    torch.testing.assert_close(first.cpu().float(), reference(*ops, torch.bfloat16).float(), rtol=8e-3, atol=1e-3)
