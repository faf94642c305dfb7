"""The CUDA implementations of the viditq ops (``ops/cuda.py``): the Triton kernels behind
the same ops, and the reference path for shapes they cannot take.

Without a GPU the Triton kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (in a child
pytest: ``tests/triton_interpreter.py``), and the CUDA dispatch tests skip."""

from __future__ import annotations

import pytest
import torch

from tests.triton_interpreter import skip_module_if_off

pytestmark = pytest.mark.triton_interpreter
skip_module_if_off()
pytest.importorskip("triton", reason="triton is not installed")

from viditq_compile.numerics import quant as numerics  # noqa: E402
from viditq_compile.numerics.packing import pack_int4  # noqa: E402
from viditq_compile.ops import cuda  # noqa: E402

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _operands(m, k, n, bits, sym, group, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g)
    qw = numerics.quantize_weight(w, bits=bits, sym=sym, group=group)
    wq = pack_int4(qw.q) if bits == 4 else qw.q
    bias = torch.randn(n, generator=g)
    xq, xs = numerics.quantize_act(x, None, [], None, 8)
    return [t.to(device) if t is not None else None for t in (xq, xs, wq, qw.scale, qw.zero, bias)], qw


@pytest.mark.parametrize("bits,sym,group", [(8, True, None), (4, False, None), (4, False, 32)])
def test_qlinear_kernel_matches_the_cpu_op(bits, sym, group):
    (xq, xs, wq, ws, wz, bias), _ = _operands(33, 64, 48, bits, sym, group)
    ref = torch.ops.viditq.qlinear(xq, xs, wq, ws, wz, bias, bits, group or 0, torch.float32)
    out = cuda.qlinear_cuda(xq, xs, wq, ws, wz, bias, bits, group or 0, torch.float32)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-5)


def test_a_shape_the_kernel_cannot_take_runs_the_reference_and_is_listed():
    (xq, xs, wq, ws, wz, bias), _ = _operands(5, 24, 16, 8, True, None)  # K=24: not a multiple of 16
    ref = torch.ops.viditq.qlinear(xq, xs, wq, ws, wz, bias, 8, 0, torch.float32)
    out = cuda.qlinear_cuda(xq, xs, wq, ws, wz, bias, 8, 0, torch.float32)
    assert torch.equal(out, ref)  # the float64 GEMM of int8 values is exact
    assert ("qlinear", 5, 16, 24, 8, 0) in cuda.fallbacks()


def test_a_group_of_48_runs_the_reference_and_is_listed():
    """Groups that are odd multiples of 16 do not compile (int8 dots need K >= 32; see
    tests/kernels/test_aot_compile.py): supports() refuses them and the op takes the reference path."""
    from viditq_compile.config.capabilities import unsupported_reason

    (xq, xs, wq, ws, wz, bias), _ = _operands(5, 96, 16, 4, False, 48)
    ref = torch.ops.viditq.qlinear(xq, xs, wq, ws, wz, bias, 4, 48, torch.float32)
    out = cuda.qlinear_cuda(xq, xs, wq, ws, wz, bias, 4, 48, torch.float32)
    assert torch.equal(out, ref)
    assert ("qlinear", 5, 16, 96, 4, 48) in cuda.fallbacks()
    assert "multiple of 32" in unsupported_reason(5, 16, 96, 4, 48)


@pytest.mark.parametrize("route", ["int_mm", "triton"])
def test_w8a8_gemm_route_forced_by_the_environment_is_taken_and_listed(monkeypatch, route):
    """``VIDITQ_GEMM_ROUTE`` forces the W8A8 GEMM route (``kernels.gemm_choice``); either gives the CPU
    op's numbers and ``routes()`` names it. The composed ``w8a8_linear`` (quantization kernel first)
    takes the same route."""
    from viditq_compile.kernels import gemm_choice

    gemm_choice.clear()
    monkeypatch.setenv(gemm_choice.ENV, route)
    (xq, xs, wq, ws, wz, bias), qw = _operands(33, 64, 48, 8, False, None)
    args = (xq.reshape(3, 11, 64), xs.reshape(3, 11, 1), wq, ws, wz, bias, 8, 0, torch.bfloat16, "gelu_tanh",
            torch.randn(3, 1, 48), torch.randn(3, 11, 48), False)
    ref = torch.ops.viditq.qlinear_fused(*args)
    out = cuda.qlinear_cuda(*args)
    torch.testing.assert_close(out.float(), ref.float(), rtol=8e-3, atol=1e-5)
    key = (64, 64, 48, "w8a8-asym+bias+gelu_tanh+gate+res->bfloat16", 0)
    assert cuda.routes() == {key: f"{route}: forced by {gemm_choice.ENV}"}
    x = torch.randn(2, 20, 64, generator=torch.Generator().manual_seed(4))
    xq8, xs8 = cuda._quantize_for_gemm(x, None, [], None, 8)
    got = cuda._linear_for(xq8, xs8, qw.q, qw.scale, qw.zero, None, 8, 0, x.dtype)
    torch.testing.assert_close(got, torch.ops.viditq.w8a8_linear(x, qw.q, qw.scale, qw.zero, None, 8),
                               rtol=1e-6, atol=1e-6)
    assert cuda.routes()[(64, 64, 48, "w8a8-asym->float32", 0)] == f"{route}: forced by {gemm_choice.ENV}"


def test_quantize_act_kernel_matches_the_reference():
    x = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(3))
    q, s = cuda.quantize_act_cuda(x, None, [], None, 8)
    rq, rs = numerics.quantize_act(x, None, [], None, 8)
    assert torch.equal(q, rq) and torch.equal(s, rs)


@pytest.mark.parametrize("packed", [False, True])
def test_qlinear_fused_kernel_matches_the_cpu_op(packed):
    (xq, xs, wq, ws, wz, bias), _ = _operands(2 * 9, 64, 48, 4, False, 32)
    xq = xq.clamp(-8, 7).reshape(2, 9, 64)
    xs = xs.reshape(2, 9, 1)
    x_in = pack_int4(xq) if packed else xq
    gate, residual = torch.randn(2, 1, 48), torch.randn(2, 9, 48)
    args = (x_in, xs, wq, ws, wz, bias, 4, 32, torch.bfloat16, "gelu_tanh", gate, residual, packed)
    ref = torch.ops.viditq.qlinear_fused(*args)
    out = cuda.qlinear_cuda(*args)
    torch.testing.assert_close(out.float(), ref.float(), rtol=8e-3, atol=1e-5)


def test_composed_w4a4_ops_pack_the_activations_between_the_kernels():
    """``w8a8_linear`` with 4-bit activations: quantize (packed) then the GEMM reading packed values,
    the same numbers as the CPU op."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, 64, generator=g)
    qw = numerics.quantize_weight(torch.randn(32, 64, generator=g), bits=8, sym=True)
    ref = torch.ops.viditq.w8a8_linear(x, qw.q, qw.scale, None, None, 4)
    xq, xs = cuda._quantize_for_gemm(x, None, [], None, 4)
    assert xq.dtype == torch.uint8 and xq.shape == (3, 7, 32)
    out = cuda._linear_for(xq, xs, qw.q, qw.scale, None, None, 8, 0, x.dtype)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_timestep_layer_runs_each_range_on_the_kernels(dtype):
    """A timestep-aware mixed plan's op on the CUDA composition (quantization kernel, packed 4-bit
    activations, GEMM kernel), rows of a CFG batch in three ranges: the CPU op's numbers."""
    from viditq_compile.numerics.hadamard import kron_factors
    from viditq_compile.ops import library as ops_module

    g = torch.Generator().manual_seed(9)
    k, n, versions = 256, 32, [(8, 8, True), (4, 8, False), (4, 4, True)]
    w = torch.randn(n, k, generator=g)
    qws = [numerics.quantize_weight(w, bits=b, sym=sym) for b, _, sym in versions]
    args = (torch.randn(3, 5, k, generator=g).to(dtype), torch.rand(k, generator=g) + 0.5, kron_factors(k),
            torch.tensor([900.0, 10.0, 500.0]), [300.0, 700.0],
            [pack_int4(q.q) if q.bits == 4 else q.q for q in qws], [q.scale for q in qws],
            [q.zero for q in qws], torch.randn(n, generator=g), [v[0] for v in versions],
            [v[1] for v in versions], 0, dtype)
    ref = torch.ops.viditq.qlinear_timestep(*args)
    out = ops_module.qlinear_timestep_impl(*args, quantize=cuda._quantize_for_gemm, linear=cuda._linear_for)
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-6,
                               atol=1e-2 if dtype == torch.bfloat16 else 1e-5)


@CUDA
def test_cuda_fused_epilogue_through_the_op():
    (xq, xs, wq, ws, wz, bias), _ = _operands(2 * 4096, 1152, 1152, 8, True, None)
    xq, xs = xq.reshape(2, 4096, 1152), xs.reshape(2, 4096, 1)
    gate, residual = torch.randn(2, 1, 1152), torch.randn(2, 4096, 1152)
    args = [xq, xs, wq, ws, wz, bias, 8, 0, torch.bfloat16, "none", gate.bfloat16(), residual.bfloat16(), False]
    ref = torch.ops.viditq.qlinear_fused(*args)
    dev = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
    out = torch.ops.viditq.qlinear_fused(*dev)
    torch.testing.assert_close(out.cpu().float(), ref.float(), rtol=8e-3, atol=1e-3)


@CUDA
def test_cuda_compiled_pixart_fuses_epilogues_and_agrees_with_cpu():
    """The backend on CUDA: epilogues folded into ``qlinear_fused`` (Triton), quantization fused by
    Inductor; the output agrees with the CPU-compiled program (rounding-boundary flips of single
    quantized values allowed for: Inductor's fused division is not the reference's)."""
    from torch._inductor.utils import run_and_get_code

    from tests.zoo import build_pixart

    model, kwargs = build_pixart()
    model.eval()
    with torch.no_grad():
        ref = torch.compile(model, backend="viditq")(**kwargs)[0]
        torch._dynamo.reset()
        model_cuda = model.to("cuda")
        kw_cuda = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        out, codes = run_and_get_code(torch.compile(model_cuda, backend="viditq"), **kw_cuda)
    code = "\n".join(codes)
    assert "torch.ops.viditq.qlinear_fused.default(" in code
    assert "torch.ops.viditq.qlinear.default(" not in code and "w8a8_linear" not in code
    assert numerics.sqnr_db(ref, out[0].cpu()) > 35


@CUDA
@pytest.mark.parametrize("bits,sym,group", [(8, True, None), (4, False, None), (4, False, 128)])
def test_cuda_dispatch_runs_the_kernels_and_agrees_with_cpu(bits, sym, group):
    (xq, xs, wq, ws, wz, bias), _ = _operands(1024, 1152, 4608, bits, sym, group)
    ref = torch.ops.viditq.qlinear(xq, xs, wq, ws, wz, bias, bits, group or 0, torch.float32)
    dev = [t.cuda() if t is not None else None for t in (xq, xs, wq, ws, wz, bias)]
    out = torch.ops.viditq.qlinear(*dev, bits, group or 0, torch.float32)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-3)


@CUDA
def test_cuda_quantized_pixart_agrees_with_the_cpu_program():
    import viditq_compile as vq
    from tests.zoo import build_pixart

    model, kwargs = build_pixart()
    stats = vq.calibrate(model, [((), kwargs)], progress=False)
    qm = vq.quantize(model, (), kwargs, recipe="w4a8", calibration=stats)
    ref = qm(**kwargs)[0]
    qm_cuda = qm.to("cuda")
    out = qm_cuda(**{k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})[0]
    assert numerics.sqnr_db(ref, out.cpu()) > 40
