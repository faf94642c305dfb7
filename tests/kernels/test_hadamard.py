"""Tests for viditq_compile.numerics.hadamard (randomized Hadamard channel balancing)."""

import numpy as np
import pytest
import torch

from viditq_compile.numerics import hadamard as hadamard_mod
from viditq_compile.numerics.hadamard import (
    MAX_POW2_FACTOR,
    apply_randomized_hadamard,
    fast_hadamard_transform,
    hadamard,
    hadamard_order_split,
    hadamard_small,
    kron_apply,
    kron_factors,
    random_signs,
    randomized_hadamard,
    supported_small_orders,
)

SMALL_ORDERS = supported_small_orders(256)
DENSE_WIDTHS = [64, 72, 128, 1152, 3072, 4608]
LARGE_WIDTHS = [12288, 15360]
# DiT hidden/MLP widths and head dims, plus the Williamson orders 156 and 172 times 8.
DIT_WIDTHS = [64, 72, 96, 128, 1152, 3072, 4608, 156 * 8, 172 * 8]
ALL_WIDTHS = DIT_WIDTHS + LARGE_WIDTHS


def test_supported_orders_cover_dit_factors():
    # Factors needed by DiT widths, the GF(p^k) orders 28 (GF(27)) and 52 (GF(25)), the
    # Williamson orders 92/116/156/172 and their doublings 184/232.
    for m in [1, 2, 12, 20, 24, 28, 36, 40, 44, 52, 60, 72, 92, 108, 116, 140, 144, 156, 172, 184, 232]:
        assert m in SMALL_ORDERS
    # Not constructible here: not a multiple of 4, or 4·47 / 4·59 (no Williamson data shipped).
    for m in [3, 6, 10, 188, 236]:
        assert m not in SMALL_ORDERS
    assert [m for m in range(4, 257, 4) if m not in SMALL_ORDERS] == [188, 236]
    assert hadamard_mod._construction(184) == hadamard_mod._construction(232) == "double"


@pytest.mark.parametrize("m", [92, 116, 156, 172])
def test_williamson_orders(m):
    assert hadamard_mod._construction(m) == "williamson"
    assert hadamard_mod._construction(2 * m) is not None  # 184, 232 by doubling; 312, 344 are Paley I
    hi = hadamard_small(m).numpy().astype(np.int64)
    assert np.array_equal(hi @ hi.T, m * np.eye(m, dtype=np.int64))
    assert np.array_equal(hi.T @ hi, m * np.eye(m, dtype=np.int64))


def test_williamson_corrupt_data_raises():
    n = 43
    rows = hadamard_mod._WILLIAMSON_HALF_ROWS[n]
    assert hadamard_mod._williamson_from_half_rows(n, rows).shape == (4 * n, 4 * n)
    for i in range(4):
        for j in [0, 5, len(rows[i]) - 1]:  # flip one sign in each sequence
            bad = list(rows)
            bad[i] = bad[i][:j] + ("-" if bad[i][j] == "+" else "+") + bad[i][j + 1 :]
            with pytest.raises(RuntimeError, match="corrupt Williamson data for order 172"):
                hadamard_mod._williamson_from_half_rows(n, bad)
    with pytest.raises(RuntimeError, match="corrupt Williamson half row"):
        hadamard_mod._williamson_from_half_rows(n, (rows[0][:-1], *rows[1:]))
    with pytest.raises(RuntimeError, match="corrupt Williamson half row"):
        hadamard_mod._williamson_from_half_rows(n, (rows[0].replace("+", "1"), *rows[1:]))
    with pytest.raises(RuntimeError, match="need 4 rows"):
        hadamard_mod._williamson_from_half_rows(n, rows[:3])


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
        (96, (12, 8)),
        (368, (92, 4)),
        (928, (116, 8)),
        (1248, (156, 8)),
        (1376, (172, 8)),
        (2752, (172, 16)),
    ],
)
def test_order_split(n, split):
    assert hadamard_order_split(n) == split


@pytest.mark.parametrize("n", [3, 6, 10, 188, 236, 376, 1001])
def test_no_construction_raises(n):
    with pytest.raises(ValueError, match=f"width {n}"):
        hadamard_order_split(n)
    with pytest.raises(ValueError, match=f"width {n}"):
        hadamard(n)
    with pytest.raises(ValueError, match=f"width {n}"):
        fast_hadamard_transform(torch.zeros(2, n))
    with pytest.raises(ValueError, match=f"width {n}"):
        kron_factors(n)


@pytest.mark.parametrize("bad", [0, -4, 2.0, True, "64"])
def test_invalid_n(bad):
    with pytest.raises(ValueError, match="n must be a positive int"):
        hadamard_order_split(bad)


def test_hadamard_small_unknown_order():
    with pytest.raises(ValueError, match="order 188"):
        hadamard_small(188)


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


# ------------------------------------------------------------------ Kronecker factor form


def _dense_from_factors(factors):
    out = factors[0]
    for f in factors[1:]:
        out = torch.kron(out, f)
    return out


@pytest.mark.parametrize("n", ALL_WIDTHS)
def test_kron_factors_structure(n):
    m, _ = hadamard_order_split(n)
    factors = kron_factors(n, torch.float64)
    sizes = [int(f.shape[0]) for f in factors]
    assert int(np.prod(sizes)) == n
    assert len(factors) <= 2  # each factor is one pass over the activation
    if m > 1:
        assert sizes[0] % m == 0  # the small (non-Sylvester) order is inside the outer factor
    for i, f in enumerate(factors):
        a = sizes[i]
        assert f.shape == (a, a) and f.dtype == torch.float64
        if not (i == 0 and m > 1):
            assert a <= MAX_POW2_FACTOR and a & (a - 1) == 0
        assert (f @ f.T - torch.eye(a, dtype=torch.float64)).abs().max() < 1e-12
    assert all(f.dtype == torch.float32 for f in kron_factors(n))


def test_kron_factors_balance_the_two_factor_sizes():
    sizes = {n: [int(f.shape[0]) for f in kron_factors(n)] for n in (64, 1152, 3072, 4608, 12288)}
    assert sizes == {64: [8, 8], 1152: [36, 32], 3072: [48, 64], 4608: [72, 64], 12288: [96, 128]}


def test_kron_factors_trivial():
    assert kron_factors(1) == []
    x = torch.randn(3, 1)
    assert kron_apply(x, []) is x


@pytest.mark.parametrize("n", DIT_WIDTHS)
def test_fast_and_kron_match_dense_fp64(n):
    h = hadamard(n, torch.float64)
    factors = kron_factors(n, torch.float64)
    if factors:
        torch.testing.assert_close(_dense_from_factors(factors), h, rtol=0, atol=1e-12)
    torch.manual_seed(n)
    x = torch.randn(2, 3, n, dtype=torch.float64)
    ref = x @ h
    torch.testing.assert_close(fast_hadamard_transform(x), ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(fast_hadamard_transform(x, transpose=True), x @ h.T, rtol=0, atol=1e-10)
    torch.testing.assert_close(kron_apply(x, factors), ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(kron_apply(x, [f.T for f in factors]), x @ h.T, rtol=0, atol=1e-10)
    # fp32 path of the same factors (what the compiled graph uses).
    torch.testing.assert_close(kron_apply(x.float(), kron_factors(n)), ref.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", LARGE_WIDTHS)
def test_fast_and_kron_large_fp64(n):
    # Dense H would be 1-2 GB in fp64: compare the two structured paths and check that
    # they are orthogonal (norm preserved, transpose inverts).
    torch.manual_seed(n)
    x = torch.randn(4, n, dtype=torch.float64)
    factors = kron_factors(n, torch.float64)
    y = kron_apply(x, factors)
    torch.testing.assert_close(y, fast_hadamard_transform(x), rtol=0, atol=1e-10)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)
    torch.testing.assert_close(kron_apply(y, [f.T for f in factors]), x, rtol=0, atol=1e-10)
    torch.testing.assert_close(fast_hadamard_transform(y, transpose=True), x, rtol=0, atol=1e-10)


class _KronModule(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        factors = kron_factors(n)
        for i, f in enumerate(factors):
            self.register_buffer(f"had{i}", f)
        self.num_factors = len(factors)

    def forward(self, x):
        return kron_apply(x, [getattr(self, f"had{i}") for i in range(self.num_factors)])


@pytest.mark.parametrize("n", [172 * 8, 1152])
def test_kron_apply_torch_export(n):
    mod = _KronModule(n)
    torch.manual_seed(0)
    x = torch.randn(2, 5, n)
    ep = torch.export.export(mod, (x,))
    assert len(ep.graph_signature.buffers) == mod.num_factors
    out = ep.module()(x)
    torch.testing.assert_close(out, mod(x), rtol=0, atol=0)
    torch.testing.assert_close(out, fast_hadamard_transform(x), rtol=1e-5, atol=1e-5)
    x2 = torch.randn(2, 5, n)
    torch.testing.assert_close(ep.module()(x2), fast_hadamard_transform(x2), rtol=1e-5, atol=1e-5)


def test_kron_apply_with_three_factors_equals_the_dense_kronecker_product():
    factors = [hadamard_small(m).double() / m**0.5 for m in (12, 4, 8)]
    x = torch.randn(3, 384, dtype=torch.float64)
    dense = torch.kron(torch.kron(factors[0], factors[1]), factors[2])
    torch.testing.assert_close(kron_apply(x, factors), x @ dense, rtol=0, atol=1e-10)
