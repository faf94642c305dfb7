"""Two int4 values per byte: the storage layout of 4-bit weights.

Layout (little nibble first): ``q [..., K]`` int8 with values in [-8, 7] and K even packs to
``p [..., K // 2]`` uint8 with ``p[..., j] = (q[..., 2j] & 0xF) | (q[..., 2j + 1] << 4)``.

``unpack_int4`` is pure ATen (view as int8, shifts, reshape), so it traces through
``torch.export`` and Inductor fuses it into the kernel that consumes the weight.
``pack_int4`` runs offline and checks the values.
"""

from __future__ import annotations

import torch
from torch import Tensor


def pack_int4(q: Tensor) -> Tensor:
    """``q [..., K] int8`` in [-8, 7], K even -> ``[..., K // 2] uint8`` (low nibble = even index)."""
    if not isinstance(q, Tensor) or q.dtype != torch.int8:
        raise ValueError(f"pack_int4: q must be an int8 tensor, got "
                         f"{getattr(q, 'dtype', type(q).__name__)}")
    if q.dim() == 0 or q.shape[-1] % 2:
        raise ValueError(f"pack_int4: the last dim K must be even, got shape {tuple(q.shape)}")
    if q.numel() and (q.min() < -8 or q.max() > 7):
        raise ValueError(f"pack_int4: values must lie in [-8, 7], got [{int(q.min())}, "
                         f"{int(q.max())}]")
    return pack_int4_values(q)


def pack_int4_values(q: Tensor) -> Tensor:
    """``pack_int4`` without the value check, for values already known to lie in [-8, 7] (a
    4-bit quantizer's output inside a compiled graph): pure ATen with no host sync, so Inductor
    fuses it into the kernel that quantizes. Out-of-range values wrap (their low nibble)."""
    q16 = q.to(torch.int16)
    return ((q16[..., 0::2] & 0xF) | ((q16[..., 1::2] & 0xF) << 4)).to(torch.uint8)


def unpack_int4(p: Tensor) -> Tensor:
    """``p [..., K // 2] uint8`` (``pack_int4``'s layout) -> ``[..., K] int8`` in [-8, 7].

    Sign-extends each nibble with shifts on the int8 view ``v``: low = ``(v << 4) >> 4``,
    high = ``(v << 0) >> 4`` (arithmetic). Both are computed at once on ``v`` repeated along a new
    last axis with per-position shifts ``[4, 0]``, which interleaves them along K without a
    concatenation, so Inductor emits one pointwise kernel (``stack`` of the two halves costs an
    extra ``aten.cat`` call).
    """
    if not isinstance(p, Tensor) or p.dtype != torch.uint8:
        raise ValueError(f"unpack_int4: p must be a uint8 tensor, got "
                         f"{getattr(p, 'dtype', type(p).__name__)}")
    if p.dim() == 0:
        raise ValueError("unpack_int4: p must have at least one dim")
    v = p.view(torch.int8).unsqueeze(-1).expand(*p.shape, 2)
    shift = (1 - torch.arange(2, dtype=torch.int8, device=p.device)) * 4  # [4, 0]: low, high nibble
    return ((v << shift) >> 4).reshape(*p.shape[:-1], 2 * p.shape[-1])
