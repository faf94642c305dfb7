"""The row-parallel numerics reference (``viditq_compile.numerics.parallel``), in one process.

Specification: the block-diagonal rotation is orthonormal and rotates each shard's slice of K by
``kron_factors(K/n)`` alone; with policy ``"global"`` a row-parallel qlinear summing int32
partials is bit-exact with the unsharded ``quant.qlinear`` on the same codes (rotated or not,
symmetric or asymmetric weights), fp32 partials are within fp32 rounding of it; ``"per_shard"`` is
a different quantization of similar quality; a split whose shards hold a K that is not a multiple
of 16 or of the weight group is refused with the layer and the sizes named."""

from __future__ import annotations

import pytest
import torch

from viditq_compile.numerics import parallel as pnum
from viditq_compile.numerics import quant
from viditq_compile.numerics.hadamard import kron_apply, kron_factors, random_signs


def _layer(k=256, n=48, seed=0, outliers=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 7, k, generator=g)
    if outliers:
        x[..., 5] *= 40
        x[..., k - 3] *= 25
    w = torch.randn(n, k, generator=g) * 0.05
    return x, w, torch.randn(n, generator=g)


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_block_diagonal_rotation_rotates_each_shard_slice_alone(shards):
    k = 384
    f = pnum.block_diagonal_factors(k, shards)
    dense = torch.eye(1)
    for a in f:
        dense = torch.kron(dense, a)
    assert torch.allclose(dense @ dense.T, torch.eye(k), atol=1e-5)
    x = torch.randn(5, k)
    per = [kron_apply(c, kron_factors(k // shards)) for c in x.chunk(shards, dim=-1)]
    assert torch.equal(kron_apply(x, f), torch.cat(per, dim=-1))
    if shards == 1:
        assert all(torch.equal(a, b) for a, b in zip(f, kron_factors(k)))


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("rotate", [False, True])
def test_global_policy_with_int32_partials_is_bit_exact_with_the_unsharded_op(sym, rotate):
    x, w, bias = _layer()
    k = x.shape[-1]
    shards = 2
    signs = random_signs(k, 3) if rotate else None
    rot = pnum.block_diagonal_factors(k, shards) if rotate else []
    qw = quant.quantize_weight(quant.balance_weight(w, None, signs, rot), 8, sym=sym)
    xq, xs = quant.quantize_act(x, signs, rot, None, 8)
    ref = quant.qlinear(xq, xs, qw.q, qw.scale, qw.zero, bias)
    y = pnum.row_parallel_qlinear(x, shards, qw.q, qw.scale, qw.zero, bias, smooth=signs, rotate=rotate,
                                  policy="global", partials="int32")
    assert torch.equal(y, ref)
    y32 = pnum.row_parallel_qlinear(x, shards, qw.q, qw.scale, qw.zero, bias, smooth=signs, rotate=rotate,
                                    policy="global", partials="fp32")
    assert (y32 - ref).abs().max() <= 4 * 2 ** -24 * (ref.abs().max() + bias.abs().max())


def test_grouped_int4_weights_split_along_k_within_fp32_rounding():
    x, w, bias = _layer()
    qw = quant.quantize_weight(w, 4, sym=False, group=32)
    xq, xs = quant.quantize_act(x, None, [], None, 8)
    ref = quant.qlinear(xq, xs, qw.q, qw.scale, qw.zero, bias, group=32)
    y = pnum.row_parallel_qlinear(x, 4, qw.q, qw.scale, qw.zero, bias, group=32, policy="global")
    assert (y - ref).abs().max() <= 16 * 2 ** -24 * ref.abs().max()
    with pytest.raises(ValueError, match="per-channel weights"):
        pnum.row_parallel_qlinear(x, 4, qw.q, qw.scale, qw.zero, bias, group=32, partials="int32")


def test_per_shard_policy_is_another_quantization_of_similar_quality():
    """Outliers in channel 5 (shard 0) only at 40x: shard 1 quantizes on its own finer grid."""
    x, w, bias = _layer()
    qw = quant.quantize_weight(w, 8)
    fp = x @ qw.dequantize().T + bias
    g = pnum.row_parallel_qlinear(x, 2, qw.q, qw.scale, None, bias, policy="global")
    p = pnum.row_parallel_qlinear(x, 2, qw.q, qw.scale, None, bias, policy="per_shard")
    assert not torch.allclose(g, p)
    assert quant.sqnr_db(fp, p) >= quant.sqnr_db(fp, g) - 0.5
    with pytest.raises(ValueError, match="needs policy='global'"):
        pnum.row_parallel_qlinear(x, 2, qw.q, qw.scale, None, bias, policy="per_shard", partials="int32")


def test_block_diagonal_rotation_keeps_most_of_the_full_rotation_gain():
    """Scattered outlier channels, W8A8: rotating in 4 blocks of K/4 loses under 1 dB against the
    full-width rotation and keeps almost all of its gain over no rotation."""
    k = 1152
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, k, generator=g)
    x[:, torch.randperm(k, generator=g)[:8]] *= 30
    w = torch.distributions.StudentT(4.0).sample((256, k)) * 0.02
    signs = random_signs(k, 1)

    def sqnr(rot, s):
        qw = quant.quantize_weight(quant.balance_weight(w, None, s, rot), 8, sym=False)
        xq, xs = quant.quantize_act(x, s, rot, None, 8)
        return quant.sqnr_db(x @ w.T, quant.qlinear(xq, xs, qw.q, qw.scale, qw.zero, None))

    none, full, block = sqnr([], None), sqnr(kron_factors(k), signs), sqnr(pnum.block_diagonal_factors(k, 4), signs)
    assert full - block < 1.0 and block - none > 10.0, (none, full, block)


@pytest.mark.parametrize("k, shards, group, match", [
    (64, 8, None, "K=8, not a multiple of 16"),
    (96, 2, 32, "multiple of the weight group 32"),
    (100, 3, None, "does not split"),
    (64, 0, None, "positive int"),
])
def test_a_split_the_kernels_cannot_take_is_refused_naming_the_layer(k, shards, group, match):
    with pytest.raises(ValueError, match=match):
        pnum.check_row_split(k, shards, group, layer="blocks.0.ff.net.2")
    assert pnum.check_row_split(1152, 4, 32) == 288


def test_unknown_policy_and_partials_are_refused():
    x, w, bias = _layer(outliers=False)
    qw = quant.quantize_weight(w, 8)
    with pytest.raises(ValueError, match="policy='mean'"):
        pnum.row_parallel_qlinear(x, 2, qw.q, qw.scale, None, bias, policy="mean")
    with pytest.raises(ValueError, match="partials='int64'"):
        pnum.row_parallel_qlinear(x, 2, qw.q, qw.scale, None, bias, partials="int64")
