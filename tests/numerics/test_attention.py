"""``numerics/attention.py``: SageAttention-style quantized attention against fp32 SDPA."""

import math

import pytest
import torch
import torch.nn.functional as F

from viditq_compile.numerics import attention as A
from viditq_compile.numerics.quant import sqnr_db


def _qkv(shape=(2, 4, 300, 64), dist="normal", k_bias=0.0, seed=0):
    """q, k, v in fp32; ``dist="t"``: Student-t (4 dof) heavy tails; ``k_bias``: one channel of K
    offset by a constant shared by every token (what a DiT's key projection bias looks like)."""
    g = torch.Generator().manual_seed(seed)
    if dist == "t":
        z = [torch.randn(shape, generator=g) for _ in range(3)]
        chi = [torch.randn(shape[:-1] + (1, 4), generator=g).pow(2).sum(-1) for _ in range(3)]  # chi2(4)
        q, k, v = (zi / (ci / 4.0).sqrt() for zi, ci in zip(z, chi))
    else:
        q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
    k = k.clone()
    k[..., 5] += k_bias
    return q * 1.5, k * 1.5, v


DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])


@DTYPES
@pytest.mark.parametrize("dist,floor", [("normal", 30.0), ("t", 20.0)])
def test_sqnr_floor_against_fp32_sdpa(dtype, dist, floor):
    q, k, v = _qkv(dist=dist)
    ref = F.scaled_dot_product_attention(q, k, v)
    out = A.attention_ref(q.to(dtype), k.to(dtype), v.to(dtype))
    assert out.dtype == dtype and out.shape == ref.shape
    assert sqnr_db(ref, out) > floor


@DTYPES
def test_k_smoothing_rescues_an_outlier_channel(dtype):
    """K's per-channel token mean is free to remove (softmax ignores a per-row constant); without
    removing it an offset channel takes the int8 range and the output loses > 8 dB."""
    q, k, v = (t.to(dtype) for t in _qkv(k_bias=20.0))
    ref = F.scaled_dot_product_attention(*(t.float() for t in (q, k, v)))
    smoothed = sqnr_db(ref, A.attention_ref(q, k, v, smooth=True))
    raw = sqnr_db(ref, A.attention_ref(q, k, v, smooth=False))
    assert smoothed > 30.0 and smoothed > raw + 8.0, (smoothed, raw)


def test_smoothing_changes_nothing_in_exact_arithmetic():
    q, k, _ = _qkv(k_bias=20.0)
    s = (q @ k.transpose(-1, -2)).softmax(-1)
    s_smoothed = (q @ A.smooth_k(k).transpose(-1, -2)).softmax(-1)
    torch.testing.assert_close(s, s_smoothed, rtol=1e-4, atol=1e-5)


def test_per_token_scales_beat_per_block():
    q, k, v = _qkv(dist="t")
    ref = F.scaled_dot_product_attention(q, k, v)
    per_block = sqnr_db(ref, A.attention_ref(q, k, v, block_q=128, block_k=128))
    per_token = sqnr_db(ref, A.attention_ref(q, k, v, block_q=1, block_k=1))
    assert per_token > per_block


def test_block_quantization_round_trip_and_scales():
    x = torch.randn(2, 3, 300, 16)
    x[0, 0, 7] *= 50  # one loud token: only its block's scale grows
    q, s = A.quantize_token_blocks(x, 128)
    assert q.dtype == torch.int8 and s.shape == (2, 3, 3) and s.dtype == torch.float32
    assert int(q.abs().max()) == A.QMAX
    rows = A.expand_block_scales(s, 128, 300)
    err = (q.float() * rows.unsqueeze(-1) - x).abs()
    assert (err <= rows.unsqueeze(-1) / 2 + 1e-6).all()  # round to nearest
    assert s[0, 0, 0] > 10 * s[0, 0, 1]
    # the last block (44 tokens) has its own scale
    torch.testing.assert_close(s[..., 2], x[..., 256:, :].abs().amax(dim=(-1, -2)) / A.QMAX)


def test_int_scores_are_exact_and_fp32_gemm_is_exact_below_its_bound():
    g = torch.Generator().manual_seed(1)
    d = A.exact_fp32_max_d()
    assert d * A.QMAX ** 2 <= 2 ** 24 < (d + 1) * A.QMAX ** 2
    qq = torch.randint(-127, 128, (2, 40, d), generator=g, dtype=torch.int8)
    qq[0, 0] = 127  # the worst case: every product 127 * 127
    kq = torch.randint(-127, 128, (2, 24, d), generator=g, dtype=torch.int8)
    kq[0, 0] = 127
    exact = A.int_scores(qq, kq)
    assert exact[0, 0, 0] == d * 127 * 127
    assert torch.equal((qq.float() @ kq.float().transpose(-1, -2)).to(torch.int32), exact)


def test_default_scale_is_sdpa_s():
    q, k, v = _qkv(shape=(1, 2, 40, 32))
    d = q.shape[-1]
    torch.testing.assert_close(A.attention_ref(q, k, v), A.attention_ref(q, k, v, 1 / math.sqrt(d)),
                               rtol=0, atol=0)
    custom = A.attention_ref(q, k, v, 0.05)
    assert sqnr_db(F.scaled_dot_product_attention(q, k, v, scale=0.05), custom) > 30


def test_pv_dtype():
    assert A.pv_dtype(torch.float32) == torch.bfloat16
    assert A.pv_dtype(torch.float16) == torch.float16 and A.pv_dtype(torch.bfloat16) == torch.bfloat16
    with pytest.raises(ValueError, match="float64"):
        A.pv_dtype(torch.float64)


def test_cross_attention_lengths_and_value_width():
    q, _, _ = _qkv(shape=(2, 3, 50, 32))
    k, v = torch.randn(2, 3, 77, 32), torch.randn(2, 3, 77, 48)
    out = A.attention_ref(q, k, v)
    assert out.shape == (2, 3, 50, 48)
    assert sqnr_db(F.scaled_dot_product_attention(q, k, v), out) > 30


@pytest.mark.parametrize("make,match", [
    (lambda q, k, v: (q.double(), k.double(), v.double()), "must be one of"),
    (lambda q, k, v: (q, k.half(), v), "share a dtype"),
    (lambda q, k, v: (q[0, 0], k[0, 0], v[0, 0]), "at least one batch/head"),
    (lambda q, k, v: (q, k[:, :2], v[:, :2]), "leading"),
    (lambda q, k, v: (q, k[..., :16], v), "head dim"),
    (lambda q, k, v: (q, k, v[..., :10, :]), "tokens"),
    (lambda q, k, v: (q[..., :0, :], k, v), "empty"),
])
def test_refuses_bad_shapes(make, match):
    q, k, v = _qkv(shape=(1, 4, 20, 32))
    with pytest.raises(ValueError, match=match):
        A.attention_ref(*make(q, k, v))


@pytest.mark.parametrize("kw,match", [(dict(scale=0.0), "scale"), (dict(scale=float("nan")), "scale"),
                                      (dict(block_q=0), "block_q"), (dict(block_k=True), "block_k")])
def test_refuses_bad_arguments(kw, match):
    q, k, v = _qkv(shape=(1, 1, 20, 32))
    with pytest.raises(ValueError, match=match):
        A.attention_ref(q, k, v, **kw)
