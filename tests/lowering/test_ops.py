"""``torch.ops.viditq.w8a8_linear``: checked wrapper, fake impl, CPU impl vs the reference."""

import pytest
import torch

import viditq_compile  # noqa: F401
from viditq_compile import numerics as N

OP = torch.ops.viditq.w8a8_linear.default


def _operands(m, k, n, sym=True, dtype=torch.float32, bias=True):
    x = torch.randn(m, k).to(dtype)
    qw = N.quantize_weight(torch.randn(n, k), sym=sym)
    b = torch.randn(n).to(dtype) if bias else None
    return x, qw, b


@pytest.mark.parametrize("m,k,n", [(1, 8, 8), (7, 5, 3), (17, 16, 16), (33, 17, 9),
                                   (64, 1152, 48)])
def test_int_mm_is_bit_exact_with_the_int32_reference(m, k, n):
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    assert torch.equal(N.int_gemm_fast(a, w), N.int_gemm_ref(a, w))


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("shape", [(2, 9, 40), (1, 64), (5, 3, 2, 24)])
def test_op_equals_reference(sym, shape):
    k = shape[-1]
    x = torch.randn(*shape)
    qw = N.quantize_weight(torch.randn(32, k), sym=sym)
    b = torch.randn(32)
    out = OP(x, qw.q, qw.scale, qw.zero, b, 8)
    ref = N.w8a8_linear(x, qw.q, qw.scale, qw.zero, b, gemm=N.int_gemm_ref)
    # same integer result, same fp32 epilogue: identical bits
    assert torch.equal(out, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_op_keeps_activation_dtype(dtype):
    x, qw, b = _operands(10, 32, 16, dtype=dtype)
    out = OP(x, qw.q, qw.scale, None, b, 8)
    assert out.dtype == dtype
    ref = N.w8a8_linear(x.float(), qw.q, qw.scale, None, b.float())
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("sym", [True, False])
def test_opcheck(sym):
    x, qw, b = _operands(6, 32, 16, sym=sym)
    torch.library.opcheck(OP, (x, qw.q, qw.scale, qw.zero, b, 8))
    torch.library.opcheck(OP, (x, qw.q, qw.scale, qw.zero, None, 8))


def test_op_rejects_bad_operands():
    x, qw, b = _operands(4, 32, 16)
    with pytest.raises(ValueError, match="K=32"):
        OP(torch.randn(4, 31), qw.q, qw.scale, None, b, 8)
    with pytest.raises(ValueError, match="int8"):
        OP(x, qw.q.int(), qw.scale, None, b, 8)
    with pytest.raises(ValueError, match="w_scale"):
        OP(x, qw.q, qw.scale.double(), None, b, 8)
    with pytest.raises(ValueError, match="bias"):
        OP(x, qw.q, qw.scale, None, torch.randn(3), 8)
    with pytest.raises(ValueError, match="act_bits"):
        OP(x, qw.q, qw.scale, None, b, 4)
