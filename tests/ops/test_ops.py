"""``torch.ops.viditq.*``: checked wrappers, fake impls, CPU impls vs the reference numerics."""

import io
import operator

import pytest
import torch

import viditq_compile  # noqa: F401
from viditq_compile.numerics import quant as N
from viditq_compile.numerics.hadamard import kron_factors
from viditq_compile.numerics.packing import pack_int4

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
        OP(x, qw.q, qw.scale, None, b, 3)


# --- viditq.balance / viditq.quantize_act / viditq.qlinear ----------------------------------

BALANCE = torch.ops.viditq.balance.default
QACT = torch.ops.viditq.quantize_act.default
QLINEAR = torch.ops.viditq.qlinear.default


def _qweight(n, k, bits, sym, group):
    """(w_q as the op takes it, QuantizedWeight) for a random [n, k] weight."""
    qw = N.quantize_weight(torch.randn(n, k) + (0 if sym else 0.3), bits=bits, sym=sym, group=group)
    return (pack_int4(qw.q) if bits == 4 else qw.q), qw


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("smooth,rotate", [(False, False), (True, False), (False, True), (True, True)])
def test_balance_equals_reference(dtype, smooth, rotate):
    x = torch.randn(3, 5, 96).to(dtype)
    s = torch.rand(96) + 0.5 if smooth else None
    rot = kron_factors(96) if rotate else []
    out = BALANCE(x, s, rot)
    assert out.dtype == dtype and out.shape == x.shape and out.data_ptr() != x.data_ptr()
    assert torch.equal(out, N.balance_activation(x, s, rot).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("static", [False, True])
def test_quantize_act_equals_reference(dtype, static):
    x = torch.randn(2, 7, 64).to(dtype)
    s, rot = torch.rand(64) + 0.5, kron_factors(64)
    static_scale = torch.tensor(0.03) if static else None
    q, sc = QACT(x, s, rot, static_scale, 8)
    qr, sr = N.quantize_act(x, s, rot, static_scale, 8)
    assert q.dtype == torch.int8 and sc.dtype == torch.float32 and sc.shape == (2, 7, 1)
    assert torch.equal(q, qr) and torch.equal(sc, sr)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits,group", [(8, None), (8, 32), (4, None), (4, 32), (4, 64)])
def test_qlinear_equals_reference(bits, group, sym, out_dtype):
    k, n = 128, 24
    xq, xs = N.quantize_per_token(torch.randn(2, 5, k))
    w_q, qw = _qweight(n, k, bits, sym, group)
    b = torch.randn(n)
    out = QLINEAR(xq, xs, w_q, qw.scale, qw.zero, b, bits, group or 0, out_dtype)
    ref = N.qlinear(xq, xs, qw.q, qw.scale, qw.zero, b, group, out_dtype, gemm=N.int_gemm_ref)
    assert out.dtype == out_dtype and out.shape == (2, 5, n)
    assert torch.equal(out, ref)  # same integers, same fp32 epilogue order: identical bits


@pytest.mark.parametrize("bits,k,group", [(8, 13, None), (8, 15, 5), (4, 20, None), (4, 12, 6),
                                          (4, 18, 3)])
def test_asymmetric_zero_point_with_k_not_a_multiple_of_8(bits, k, group):
    x = torch.randn(6, k)
    w_q, qw = _qweight(10, k, bits, False, group)
    xq, xs = QACT(x, None, [], None, 8)
    out = QLINEAR(xq, xs, w_q, qw.scale, qw.zero, None, bits, group or 0, torch.float32)
    expected = (xq.double() * xs.double()) @ qw.dequantize().double().t()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dit_width_int4_group128_pipeline(dtype):
    # K=1152 (PixArt/DiT-XL hidden), smooth + Kronecker rotation, int4 asymmetric, group 128
    k, n, group = 1152, 64, 128
    x = (torch.randn(2, 8, k) * (1 + 10 * (torch.rand(k) > 0.98))).to(dtype)  # a few outlier channels
    w = torch.randn(n, k) / k ** 0.5
    b = torch.randn(n).to(dtype)
    smooth = N.smoothing_vector(w.abs().amax(0), x.float().abs().amax((0, 1)), 0.5)
    signs = torch.randint(0, 2, (k,)).float() * 2 - 1
    rot = kron_factors(k)
    qw = N.quantize_weight(N.balance_weight(w, smooth, signs, rot), bits=4, sym=False, group=group)
    xq, xs = QACT(x, smooth * signs, rot, None, 8)
    out = QLINEAR(xq, xs, pack_int4(qw.q), qw.scale, qw.zero, b, 4, group, dtype)
    assert out.dtype == dtype and out.shape == (2, 8, n)
    ref = N.qlinear(xq, xs, qw.q, qw.scale, qw.zero, b, group, dtype)
    assert torch.equal(out, ref)
    assert N.sqnr_db(torch.nn.functional.linear(x.float(), w, b.float()), out) > 15


def test_new_ops_opcheck():
    x = torch.randn(4, 64)
    s, rot = torch.rand(64) + 0.5, kron_factors(64)
    torch.library.opcheck(BALANCE, (x, s, rot))
    torch.library.opcheck(BALANCE, (x, None, []))  # identity: must still return a fresh tensor
    torch.library.opcheck(QACT, (x.bfloat16(), s, rot, None, 8))
    torch.library.opcheck(QACT, (x, None, [], torch.tensor(0.02), 8))
    xq, xs = N.quantize_per_token(x)
    for bits, group, sym in [(4, 32, False), (4, 0, True), (8, 0, False), (8, 16, True)]:
        w_q, qw = _qweight(16, 64, bits, sym, group or None)
        torch.library.opcheck(QLINEAR, (xq, xs, w_q, qw.scale, qw.zero, torch.randn(16), bits, group,
                                        torch.bfloat16))


def test_new_ops_reject_bad_operands():
    x = torch.randn(4, 64)
    s, rot = torch.rand(64), kron_factors(64)
    cases = [
        (BALANCE, (x.int(), None, []), "x must"),
        (BALANCE, (x, s.double(), []), "smooth"),
        (BALANCE, (x, torch.rand(32), []), "smooth"),
        (BALANCE, (x, None, [rot[0].double(), rot[1]]), r"rotation\[0\]"),
        (BALANCE, (x, None, [torch.randn(8, 4)]), r"rotation\[0\]"),
        (BALANCE, (x, None, rot[:1]), "multiply to 8"),
        (QACT, (x, None, [], torch.tensor([0.1]), 8), "static_scale"),
        (QACT, (x, None, [], None, 3), "act_bits"),
        (QACT, (x, torch.rand(3), [], None, 8), "smooth"),
    ]
    xq, xs = N.quantize_per_token(x)
    w4, q4 = _qweight(16, 64, 4, False, 32)
    w8, q8 = _qweight(16, 64, 8, True, None)
    cases += [
        (QLINEAR, (xq.int(), xs, w8, q8.scale, None, None, 8, 0, torch.float32), "xq"),
        (QLINEAR, (xq, xs.squeeze(-1), w8, q8.scale, None, None, 8, 0, torch.float32), "x_scale"),
        (QLINEAR, (xq, xs, w8, q8.scale, None, None, 3, 0, torch.float32), "weight_bits=3"),
        (QLINEAR, (xq, xs, w8, q8.scale, None, None, 4, 0, torch.float32), "w_q for 4-bit"),
        (QLINEAR, (xq, xs, w4, q4.scale, q4.zero, None, 8, 32, torch.float32), "w_q for 8-bit"),
        (QLINEAR, (xq[:, :62], xs, w8, q8.scale, None, None, 8, 0, torch.float32), r"w_q .*K=62"),
        (QLINEAR, (xq, xs, w4, q4.scale, q4.zero, None, 4, 48, torch.float32), "group_size=48"),
        (QLINEAR, (xq, xs, w4, q4.scale, q4.zero, None, 4, 16, torch.float32), "w_scale"),
        (QLINEAR, (xq, xs, w4, q4.scale, q4.zero.long(), None, 4, 32, torch.float32), "w_zero"),
        (QLINEAR, (xq, xs, w8, q8.scale, None, torch.randn(3), 8, 0, torch.float32), "bias"),
        (QLINEAR, (xq, xs, w8, q8.scale, None, None, 8, 0, torch.int32), "out_dtype"),
    ]
    for op, args, match in cases:
        with pytest.raises(ValueError, match=match):
            op(*args)
            pytest.fail(f"{op} accepted operands that should fail with {match!r}")


class _BalancedQLinear(torch.nn.Module):
    def __init__(self, k=64, n=16, group=32):
        super().__init__()
        w_q, qw = _qweight(n, k, 4, False, group)
        self.register_buffer("smooth", torch.rand(k) + 0.5)
        self.register_buffer("r0", kron_factors(k)[0])
        self.register_buffer("r1", kron_factors(k)[1])
        for name, t in [("w_q", w_q), ("w_scale", qw.scale), ("w_zero", qw.zero), ("bias", torch.randn(n))]:
            self.register_buffer(name, t)
        self.group = group

    def forward(self, x):
        h = torch.ops.viditq.balance(x, None, [self.r0, self.r1])
        q, s = torch.ops.viditq.quantize_act(h, self.smooth, [self.r0, self.r1], None, 8)
        return torch.ops.viditq.qlinear(q, s, self.w_q, self.w_scale, self.w_zero, self.bias, 4,
                                        self.group, torch.bfloat16)


def test_tensor_list_and_scalar_type_survive_export_save_load():
    m = _BalancedQLinear().eval()
    x = torch.randn(2, 5, 64)
    ep = torch.export.export(m, (x,))
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf)
    targets = [n.target for n in loaded.graph.nodes if n.op == "call_function"]
    assert targets == [BALANCE, QACT, operator.getitem, operator.getitem, QLINEAR]
    out = loaded.module()(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, m(x))
