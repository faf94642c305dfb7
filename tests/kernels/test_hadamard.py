"""Tests for viditq_compile.kernels.hadamard (randomized Hadamard channel balancing)."""

import numpy as np
import pytest
import torch

from viditq_compile.kernels.hadamard import (
    apply_randomized_hadamard,
    fast_hadamard_transform,
    hadamard,
    hadamard_order_split,
    hadamard_small,
    random_signs,
    randomized_hadamard,
    supported_small_orders,
)

SMALL_ORDERS = supported_small_orders(256)
DENSE_WIDTHS = [64, 72, 128, 1152, 3072, 4608]
LARGE_WIDTHS = [12288, 15360]


def test_supported_orders_cover_dit_factors():
    # Factors needed by DiT widths, plus the GF(p^k) orders 28 (GF(27)) and 52 (GF(25)).
    for m in [1, 2, 12, 20, 24, 28, 36, 40, 44, 52, 60, 72, 108, 140]:
        assert m in SMALL_ORDERS
    for m in [3, 6, 10, 92, 156, 172]:
        assert m not in SMALL_ORDERS


@pytest.mark.parametrize("m", SMALL_ORDERS)
def test_hadamard_small_exact(m):
    h = hadamard_small(m)
    assert h.shape == (m, m) and h.dtype == torch.float64
    hi = h.numpy().astype(np.int64)  # exact integer check
    assert np.array_equal(hi, h.numpy())
    assert (np.abs(hi) == 1).all()
    assert np.array_equal(hi @ hi.T, m * np.eye(m, dtype=np.int64))


@pytest.mark.parametrize(
    "n, split",
    [
        (64, (1, 64)),
        (72, (36, 2)),
        (1152, (36, 32)),
        (3072, (12, 256)),
        (4608, (36, 128)),
        (12288, (12, 1024)),
        (15360, (60, 256)),
        (1000, (500, 2)),
    ],
)
def test_order_split(n, split):
    assert hadamard_order_split(n) == split


@pytest.mark.parametrize("n", [156, 172, 6, 3, 1001])
def test_no_construction_raises(n):
    with pytest.raises(ValueError, match=f"width {n}"):
        hadamard_order_split(n)
    with pytest.raises(ValueError, match=f"width {n}"):
        hadamard(n)
    with pytest.raises(ValueError, match=f"width {n}"):
        fast_hadamard_transform(torch.zeros(2, n))


@pytest.mark.parametrize("bad", [0, -4, 2.0, True, "64"])
def test_invalid_n(bad):
    with pytest.raises(ValueError, match="n must be a positive int"):
        hadamard_order_split(bad)


def test_hadamard_small_unknown_order():
    with pytest.raises(ValueError, match="order 156"):
        hadamard_small(156)


@pytest.mark.parametrize("n", DENSE_WIDTHS)
def test_dense_orthogonal_and_fast_matches(n):
    h = hadamard(n)
    assert h.shape == (n, n) and h.dtype == torch.float32
    torch.manual_seed(0)
    x = torch.randn(2, 3, n)
    # fast == dense, both orientations
    torch.testing.assert_close(fast_hadamard_transform(x), x @ h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_hadamard_transform(x, transpose=True), x @ h.T, rtol=1e-5, atol=1e-5)
    # Orthogonality H H^T = I, computed as rows of H pushed through the fast H^T
    # (O(n^2 log n) instead of an O(n^3) dense matmul for the larger widths).
    hht = fast_hadamard_transform(h, transpose=True)
    assert (hht - torch.eye(n)).abs().max() < 1e-5


def test_dense_orthogonal_matmul_small():
    for n in [72, 1152]:
        h = hadamard(n, torch.float64)
        assert (h @ h.T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-12


@pytest.mark.parametrize("n", LARGE_WIDTHS)
def test_fast_transform_large_orthogonal(n):
    torch.manual_seed(1)
    x = torch.randn(4, n)
    y = fast_hadamard_transform(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fast_hadamard_transform(y, transpose=True), x, rtol=1e-5, atol=1e-5)
    # A few dense columns, built blockwise as kron(H_small[:, c], H_2^k[:, d]) / sqrt(n).
    m, p2 = hadamard_order_split(n)
    hs = hadamard_small(m).float()
    h2 = hadamard(p2) * p2**0.5
    for col in [0, 1, p2 + 3, n - 1]:
        c, d = divmod(col, p2)
        dense_col = torch.kron(hs[:, c], h2[:, d]) / n**0.5
        torch.testing.assert_close(y[:, col], x @ dense_col, rtol=1e-4, atol=1e-4)


def test_n_small_override():
    x = torch.randn(3, 96)
    # 96 = 12·8 (default) but also 24·4; each override matches its own Kronecker matrix.
    assert hadamard_order_split(96) == (12, 8)
    h24 = torch.kron(hadamard_small(24).float(), hadamard(4) * 2) / 96**0.5
    torch.testing.assert_close(fast_hadamard_transform(x, n_small=24), x @ h24, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="n_small=36"):
        fast_hadamard_transform(x, n_small=36)


def test_bf16_roundtrip_dtype():
    x = torch.randn(2, 1152).to(torch.bfloat16)
    y = fast_hadamard_transform(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    ref = x.float() @ hadamard(1152)
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)
    assert apply_randomized_hadamard(x, seed=3).dtype == torch.bfloat16


def test_rejects_non_float():
    with pytest.raises(ValueError, match="floating-point"):
        fast_hadamard_transform(torch.ones(4, 64, dtype=torch.int64))


def test_random_signs_deterministic():
    a, b, c = random_signs(1152, 7), random_signs(1152, 7), random_signs(1152, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(a.unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("n", [72, 1152])
def test_randomized_rotation(n):
    seed = 1234
    r = randomized_hadamard(n, seed)
    assert torch.equal(r, randomized_hadamard(n, seed))
    assert (r @ r.T - torch.eye(n)).abs().max() < 1e-5
    torch.manual_seed(2)
    x = torch.randn(5, n)
    xr = apply_randomized_hadamard(x, seed)
    torch.testing.assert_close(xr, x @ r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(apply_randomized_hadamard(xr, seed, transpose=True), x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xr @ r.T, x, rtol=1e-5, atol=1e-5)
    # Rotation is free for a linear layer: (x R)(R^T W) = x W.
    w = torch.randn(n, 8)
    torch.testing.assert_close(xr @ (r.T @ w), x @ w, rtol=1e-4, atol=1e-4)
