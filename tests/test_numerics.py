"""The reference numerics: the specification every op and pass is tested against."""

import math

import pytest
import torch

from viditq_compile import numerics as N


@pytest.mark.parametrize("sym", [True, False])
def test_weight_quantization_error_is_at_most_half_a_step(sym):
    w = torch.randn(48, 80) * torch.rand(48, 1) * 3 + (0 if sym else 0.5)
    qw = N.quantize_weight(w, bits=8, sym=sym)
    assert qw.q.dtype == torch.int8 and qw.scale.shape == (48,)
    assert (qw.zero is None) == sym
    err = (qw.dequantize() - w).abs()
    assert torch.all(err <= qw.scale[:, None] / 2 + 1e-6)


def test_asymmetric_range_includes_zero_exactly():
    w = torch.rand(8, 32) + 1.0  # all positive: the range is forced to [0, max]
    w[:, 0] = 0.0
    qw = N.quantize_weight(w, sym=False)
    assert torch.all(qw.dequantize()[:, 0] == 0.0)


def test_weight_quantization_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        N.quantize_weight(torch.randn(4))
    with pytest.raises(ValueError, match="NaN or Inf"):
        N.quantize_weight(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="bits"):
        N.quantize_weight(torch.randn(4, 4), bits=9)


def test_per_token_scale_is_absmax_over_qmax_and_zero_rows_stay_finite():
    x = torch.randn(5, 33)
    x[2] = 0
    q, s = N.quantize_per_token(x)
    assert s.shape == (5, 1) and torch.isfinite(s).all()
    assert torch.all(q[2] == 0)
    assert torch.allclose(s[0], x[0].abs().max() / 127)
    assert q.abs().max() == 127


def test_non_finite_rows_stay_in_their_row():
    x = torch.randn(4, 16)
    x[1, 3] = float("nan")
    x[3, 0] = float("inf")
    qw = N.quantize_weight(torch.randn(8, 16))
    out = N.w8a8_linear(x, qw.q, qw.scale, None, None)
    fp = x @ qw.dequantize().t()
    for r in range(4):
        assert torch.isfinite(out[r]).all() == torch.isfinite(fp[r]).all(), r
    assert torch.isfinite(out[[0, 2]]).all()


def test_int_gemm_reference_refuses_int32_overflow():
    a = torch.full((1, 140000), 127, dtype=torch.int8)
    with pytest.raises(OverflowError):
        N.int_gemm_ref(a, a)


@pytest.mark.parametrize("sym", [True, False])
def test_w8a8_linear_tracks_float_linear(sym):
    x = torch.randn(3, 7, 96)
    w = torch.randn(40, 96) / math.sqrt(96)
    b = torch.randn(40)
    qw = N.quantize_weight(w, sym=sym)
    out = N.w8a8_linear(x, qw.q, qw.scale, qw.zero, b)
    assert out.shape == (3, 7, 40)
    assert N.sqnr_db(torch.nn.functional.linear(x, w, b), out) > 35


def test_zero_point_correction_equals_dequantized_weight_gemm():
    x = torch.randn(6, 64)
    qw = N.quantize_weight(torch.randn(24, 64) + 0.3, sym=False)
    xq, xs = N.quantize_per_token(x)
    expected = (xq.double() * xs.double()) @ qw.dequantize().double().t()
    out = N.w8a8_linear(x, qw.q, qw.scale, qw.zero, None)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_sqnr():
    a = torch.ones(100)
    assert N.sqnr_db(a, a) == float("inf")
    assert abs(N.sqnr_db(a, a * 1.1) - 20.0) < 1e-4  # fp32 1.1
