"""The numerics of a tensor-parallel quantized linear layer: the reference every sharded path
(the DTensor rules of ``parallel/sharding.py``, the row-parallel layer of ``parallel/tensor.py``)
is tested against.

Column (output channels N split) and token (rows of x split) parallelism change nothing: each
output element is computed from the same codes and scales by the same operations. Row
parallelism (the input channels K split over ``n`` shards, Megatron's second layer of a pair)
does change the numbers, because a per-token activation scale is a maximum over all K:

- ``"global"``: the per-token absmax of each shard's (balanced) slice is all-reduced with MAX
  first, so every shard quantizes its slice with the unsharded scale and its codes are the
  unsharded codes. Summing the int32 partial GEMMs (plus the zero-point row sums) before the
  epilogue is bit-exact with ``quant.qlinear`` (per-channel weights); summing fp32 partial
  outputs is exact up to the order of the fp32 additions.
- ``"per_shard"``: each shard quantizes its own slice with its own per-token scale (no
  communication before the GEMM): a different but valid quantization, finer than the global
  one (each scale covers fewer channels); the fp32 partial outputs are summed.

Rotation: a full-width Hadamard mixes all K channels, so it does not commute with a K split.
A row-parallel layer is rotated block-diagonally instead, ``I_n ⊗ H(K/n)``: each shard rotates
its own slice by ``kron_factors(K/n)``. As Kronecker factors that is ``[eye(n), *kron_factors(K/n)]``
(``block_diagonal_factors``), which every ``viditq`` op takes as it is, so the unsharded program
computes what the shards compute.

Shapes: x [..., K] float; w_q [N, K] int8 (unpacked); w_scale fp32 [N] or [N, K / g];
w_zero int32 like w_scale or None; bias [N] or None. Each shard's K must be a multiple of
``SHARD_K_MULTIPLE`` and of the weight group (``check_row_split``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from viditq_compile.numerics import quant
from viditq_compile.numerics.hadamard import kron_factors

__all__ = ["ROW_POLICIES", "PARTIALS", "SHARD_K_MULTIPLE", "check_row_split", "block_diagonal_factors",
           "rotation_factors", "row_rotation_blocks", "shard_slice", "quantize_shard", "shard_partial",
           "row_parallel_qlinear"]

ROW_POLICIES = ("global", "per_shard")
PARTIALS = ("fp32", "int32")
SHARD_K_MULTIPLE = 16
"""Each shard's K must be a multiple of this: the integer GEMM kernels' K tile, and the int4 pair."""


def check_row_split(k: int, shards: int, group: int | None = None, layer: str = "layer") -> int:
    """``K / shards`` for a row-parallel split of K=k; ``ValueError`` naming the layer and the
    bad value when it is not a multiple of ``SHARD_K_MULTIPLE`` and of the weight ``group``."""
    if not isinstance(shards, int) or isinstance(shards, bool) or shards < 1:
        raise ValueError(f"tensor_parallel must be a positive int, got {shards!r}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"{layer}: K must be a positive int, got {k!r}")
    if k % shards:
        raise ValueError(f"{layer}: K={k} does not split over tensor_parallel={shards} shards")
    per = k // shards
    if per % SHARD_K_MULTIPLE:
        raise ValueError(f"{layer}: each of the {shards} row-parallel shards would hold K={per}, not a "
                         f"multiple of {SHARD_K_MULTIPLE} (K={k}); keep the layer unsharded or use "
                         f"fewer shards")
    if group and per % group:
        raise ValueError(f"{layer}: each of the {shards} row-parallel shards would hold K={per}, not a "
                         f"multiple of the weight group {group} (K={k})")
    return per


def block_diagonal_factors(k: int, shards: int, dtype: torch.dtype = torch.float32) -> list[Tensor]:
    """The block-diagonal Hadamard ``I_shards ⊗ H(K/shards)`` as Kronecker factors, outer first:
    ``[eye(shards), *kron_factors(K/shards)]`` (``kron_factors(k)`` itself for one shard).
    Orthonormal; ``kron_apply`` of it rotates each of the ``shards`` consecutive slices of K by
    ``H(K/shards)`` and mixes none of them."""
    per = check_row_split(k, shards)
    inner = kron_factors(per, dtype)
    if shards == 1:
        return inner
    return [torch.eye(shards, dtype=dtype), *inner]


def rotation_factors(k: int, blocks: int | None = None, dtype: torch.dtype = torch.float32) -> list[Tensor]:
    """The rotation of a balanced layer of width ``k`` as Kronecker factors: ``kron_factors(k)``
    (``blocks`` None or 1: one full-width Hadamard), else ``blocks`` equal diagonal blocks
    ``I_blocks ⊗ H(k / blocks)``: ``[eye(blocks), *kron_factors(k / blocks)]``. Unlike
    ``block_diagonal_factors`` the block width need not be a shard's K (a packed row-parallel
    layer holds several blocks per shard). ``ValueError`` naming the numbers when ``blocks`` does
    not divide ``k`` or no Hadamard matrix of order ``k / blocks`` is known."""
    if blocks is None or blocks == 1:
        return kron_factors(k, dtype)
    if not isinstance(blocks, int) or isinstance(blocks, bool) or blocks < 1:
        raise ValueError(f"rotation blocks must be a positive int, got {blocks!r}")
    if not isinstance(k, int) or k < 1 or k % blocks:
        raise ValueError(f"a block-diagonal rotation of {blocks} blocks does not divide K={k!r}")
    return [torch.eye(blocks, dtype=dtype), *kron_factors(k // blocks, dtype)]


def row_rotation_blocks(k: int, shards: int, blocks: Sequence[int] | None = None) -> int:
    """How many diagonal blocks the rotation of a row-parallel layer of width ``k`` over ``shards``
    needs so that every shard's input channels are whole blocks: ``shards`` for one contiguous
    split; for a packed layer (its K the concatenation of streams in proportions ``blocks``, each
    split over the shards, as ``parallel.tp_plan.rank_columns``) one block per ``gcd`` of the
    per-shard chunks. ``ValueError`` when the split is uneven."""
    sizes = [k] if not blocks else [b * (k // sum(blocks)) for b in blocks]
    if sum(sizes) != k or any(s % shards for s in sizes):
        raise ValueError(f"K={k} with blocks {list(blocks or [])} does not split over {shards} shards")
    width = math.gcd(*(s // shards for s in sizes))
    return k // width


def shard_slice(t: Tensor | None, dim: int, rank: int, shards: int) -> Tensor | None:
    """Shard ``rank``'s part of ``t`` split in ``shards`` equal consecutive chunks along ``dim``
    (``None`` stays ``None``)."""
    if t is None:
        return None
    if not 0 <= rank < shards or t.shape[dim] % shards:
        raise ValueError(f"shard {rank} of {shards}: dim {dim} of shape {tuple(t.shape)} does not split evenly")
    return t.chunk(shards, dim=dim)[rank]


def quantize_shard(xb: Tensor, bits: int, absmax: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Quantize one shard's balanced slice ``xb [..., K/n]`` (fp32) per token. ``absmax``
    ``[..., 1]``: the all-reduced per-token absmax over every shard (policy ``"global"``: the codes
    are the unsharded ones); ``None``: the slice's own (policy ``"per_shard"``). Returns
    q [..., K/n] int8 and scale [..., 1] fp32, as ``quant.quantize_per_token``."""
    if absmax is None:
        return quant.quantize_per_token(xb, bits)
    qmin, qmax = quant.qrange(bits)
    scale = absmax.to(torch.float32).clamp_min(quant.SCALE_FLOOR) / qmax
    q = torch.clamp(torch.round(xb.to(torch.float32) / scale), qmin, qmax)
    return q.to(torch.int8), scale


def shard_partial(xq: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, w_zero: Tensor | None,
                  group: int | None, partials: str,
                  gemm=quant.int_gemm_ref) -> Tensor | tuple[Tensor, Tensor | None]:
    """One shard's contribution, without the bias. ``partials="fp32"``: ``quant.qlinear`` of the
    shard (fp32 [M, N]); ``"int32"`` (per-channel weights only): the int32 GEMM ``acc [M, N]`` and,
    for asymmetric weights, the int32 row sum ``[M, 1]``, to be summed over shards before
    ``quant.dequantize_epilogue``. xq: [M, K/n] int8; w_q: [N, K/n] int8 (this shard's columns)."""
    if partials not in PARTIALS:
        raise ValueError(f"partials={partials!r} (supported: {PARTIALS})")
    if partials == "fp32":
        return quant.qlinear(xq, x_scale, w_q, w_scale, w_zero, None, group, torch.float32, gemm)
    if group:
        raise ValueError(f"partials='int32' needs per-channel weights: a grouped weight (group={group}) sums "
                         f"one fp32 term per group, whose order a sum of int32 shards cannot keep")
    rowsum = xq.to(torch.int32).sum(dim=-1, keepdim=True) if w_zero is not None else None
    return gemm(xq, w_q), rowsum


def row_parallel_qlinear(x: Tensor, shards: int, w_q: Tensor, w_scale: Tensor, w_zero: Tensor | None,
                         bias: Tensor | None, *, act_bits: int = 8, group: int | None = None,
                         smooth: Tensor | None = None, rotate: bool = False, policy: str = "global",
                         partials: str = "fp32", out_dtype: torch.dtype = torch.float32) -> Tensor:
    """Reference of a row-parallel quantized linear on ``shards`` shards, computed in one process.

    x: [..., K] float; smooth: [K] fp32 or None (the balancing vector, sliced per shard);
    rotate: each shard rotates its slice by ``kron_factors(K/shards)`` (the block-diagonal
    rotation; W must have been balanced with ``block_diagonal_factors``); policy: one of
    ``ROW_POLICIES``; partials: one of ``PARTIALS`` (``"int32"`` with ``"global"`` only: per-shard
    codes on different scales cannot share one integer sum). Shards are summed in rank order.
    With ``policy="global", partials="int32"`` the result equals, bit for bit,
    ``quant.qlinear(*quant.quantize_act(x, smooth, block_diagonal_factors(K, shards), None, act_bits),
    w_q, ...)`` for fp32 x (the 16-bit route of ``quantize_act`` prescales each row by its own
    absmax, which a shard does not know).
    """
    if policy not in ROW_POLICIES:
        raise ValueError(f"policy={policy!r} (supported: {ROW_POLICIES})")
    if partials not in PARTIALS:
        raise ValueError(f"partials={partials!r} (supported: {PARTIALS})")
    if partials == "int32" and policy != "global":
        raise ValueError("partials='int32' needs policy='global': per-shard scales differ, so the integer "
                         "partial sums are on different grids")
    k = x.shape[-1]
    if w_q.dim() != 2 or w_q.shape[1] != k:
        raise ValueError(f"w_q must be [N, K={k}] int8 (unpacked), got {tuple(w_q.shape)}")
    check_row_split(k, shards, group)
    lead, n = x.shape[:-1], w_q.shape[0]
    x2 = x.reshape(-1, k)
    rot = kron_factors(k // shards) if rotate else []
    grouped = group is not None
    xb = [quant.balance_activation(shard_slice(x2, 1, r, shards), shard_slice(smooth, 0, r, shards), rot)  # type: ignore[arg-type]
          for r in range(shards)]
    absmax = None
    if policy == "global":
        absmax = torch.stack([b.abs().amax(dim=-1, keepdim=True) for b in xb]).amax(dim=0)
    out: Tensor | None = None
    acc: Tensor | None = None
    rowsum: Tensor | None = None
    x_scale: Tensor | None = None
    for r in range(shards):
        q, s = quantize_shard(xb[r], act_bits, absmax)
        ws = shard_slice(w_scale, 1, r, shards) if grouped else w_scale
        wz = shard_slice(w_zero, 1, r, shards) if grouped else w_zero
        part = shard_partial(q, s, shard_slice(w_q, 1, r, shards), ws, wz, group, partials)  # type: ignore[arg-type]
        if isinstance(part, tuple):
            a, rs = part
            acc = a if acc is None else acc + a
            rowsum = rs if rowsum is None or rs is None else rowsum + rs
            x_scale = s
        else:
            out = part if out is None else out + part
    if partials == "int32":
        assert acc is not None and x_scale is not None
        y = quant.dequantize_epilogue(acc, x_scale, w_scale, w_zero, rowsum, bias, out_dtype)
        return y.reshape(*lead, n)
    assert out is not None
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype).reshape(*lead, n)
