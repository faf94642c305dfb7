"""What can run: the widths that have ops (the one place they are spelled: recipes, plans, the
search and the ops read them here), and which shapes the Triton kernels take, without importing
Triton: the quantization report says which layers would run the reference GEMM on CUDA, and the
Inductor lowering which activation quantizations stay one Triton kernel (rotation in registers)
rather than fusible ATen ops."""

from __future__ import annotations

import torch

WEIGHT_BITS = (4, 8)
"""Weight widths with an op: int8, and int4 packed two per byte."""

ACT_BITS = (4, 8)
"""Activation widths with an op (4-bit values travel in int8 through the same GEMM)."""

CANDIDATE_WIDTHS = tuple((w, a) for w in sorted(WEIGHT_BITS, reverse=True) for a in sorted(ACT_BITS, reverse=True))
"""``(weight_bits, act_bits)`` pairs the mixed-precision search chooses from, widest first:
((8, 8), (8, 4), (4, 8), (4, 4)). The first, W8A8, is the safe choice every search keeps."""

K_MULTIPLE = 16
"""The GEMM steps along K in multiples of 16 (int8 tensor-core tiles, two int4 nibbles a byte)."""

GROUP_MULTIPLE = 32
"""A weight group of the GEMM is a multiple of 32: the kernel's K step divides the group and an
int8 tensor-core dot needs K >= 32 (``mma.m16n8k32``, ``wgmma ... k32``). Groups that are odd
multiples of 16 (16, 48, 80, ...) would need a K step of 16, which does not compile
(``tests/kernels/test_aot_compile.py`` checks both sides)."""


INT4_SPLIT_CHUNK = 128
"""K values per chunk of the GEMM's int4 weight layout (``kernels.int_gemm.split_int4``): byte j of a
chunk's 64 holds K index j in its low nibble and j + 64 in its high one. The kernel steps K by one
chunk (BLOCK_K = 128), so the layout serves per-channel weights and groups that are multiples of
128; other groups keep ``numerics.packing``'s layout."""

INT4_SPLIT_MAX_K = 2 ** 17 - 16
"""Largest K (a multiple of 16) the split int4 layout takes: the kernel multiplies the weights' nibbles
shifted up by 4 (16 x [-8, 7] is still int8) and shifts the int32 sum back, exact while
16 * 128 * 8 * K < 2^31."""


def int4_split_applies(weight_bits: int, group_size: int) -> bool:
    """Whether ``int_gemm.qlinear_triton`` runs 4-bit weights of this group size (0: per channel)
    in the split layout (``INT4_SPLIT_CHUNK``)."""
    return weight_bits == 4 and group_size % INT4_SPLIT_CHUNK == 0


def unsupported_reason(m: int, n: int, k: int, weight_bits: int, group_size: int) -> str | None:
    """Why ``int_gemm.qlinear_triton`` cannot take this shape, or None when it can."""
    if weight_bits not in WEIGHT_BITS:
        return f"weight_bits={weight_bits} (supported: {', '.join(map(str, WEIGHT_BITS))})"
    if m < 0 or n < 1 or k < 1:
        return f"empty or negative shape M={m}, N={n}, K={k}"
    if k % K_MULTIPLE:
        return f"K={k} is not a multiple of {K_MULTIPLE}"
    if group_size and (group_size % GROUP_MULTIPLE or k % group_size):
        return (f"group_size={group_size} must be a multiple of {GROUP_MULTIPLE} dividing K={k} "
                "(int8 tensor-core dots step K by 32)")
    if int4_split_applies(weight_bits, group_size) and k > INT4_SPLIT_MAX_K:
        return (f"K={k} > {INT4_SPLIT_MAX_K} with int4 weights (the split layout's 16x-scaled int32 sums "
                "would overflow)")
    return None


FP8_MIN_ARCH = 89
"""e4m3 tensor cores: compute capability 8.9 (Ada's e4m3 ``mma.sync``) and later (Hopper's wgmma).
sm_80 has none: the e4m3 GEMM runs the reference there (``ops/cuda.py``, logged)."""

FP8_GEMM_ROUTE = f"e4m3 Triton GEMM on sm_{FP8_MIN_ARCH}+, reference elsewhere"
"""What the report says of an e4m3 layer whose shape the e4m3 kernel takes."""


def fp8_unsupported_reason(m: int, n: int, k: int, arch: int | None = None) -> str | None:
    """Why ``fp8_gemm.fp8_qlinear_triton`` cannot take this shape on compute capability ``arch``
    (``10 * major + minor``; None: any device the shape alone allows), or None when it can. K is a
    multiple of ``K_MULTIPLE`` as for the int GEMM: 16-byte e4m3 rows, the vectorized loads the
    AOT tests compile (the dot itself steps K by 32 and masks the tail). Other K compile but lose
    the pipelined loads: measured (triton 3.9, sm_90, K = 72) 32 KiB shared instead of 128 and 179
    local loads / stores in the K loop."""
    if m < 0 or n < 1 or k < 1:
        return f"empty or negative shape M={m}, N={n}, K={k}"
    if k % K_MULTIPLE:
        return f"K={k} is not a multiple of {K_MULTIPLE}"
    if arch is not None and arch < FP8_MIN_ARCH:
        return (f"compute capability {arch // 10}.{arch % 10} has no e4m3 tensor cores "
                f"(needs sm_{FP8_MIN_ARCH}+)")
    return None


def weight_width_refusal(k: int, n: int, weight_bits: int, group: int | None = None) -> str | None:
    """Why a linear of ``n`` outputs over ``k`` inputs cannot store its weights at ``weight_bits``
    (with weight group ``group``, or per output channel), or None when it can, on every route (the
    numerics and ops; a GEMM kernel that cannot take the shape falls back to the reference, see
    ``unsupported_reason``). The select pass falls to the next width this accepts, a given plan is
    refused by name, and the search offers no refused width."""
    if weight_bits not in WEIGHT_BITS:
        return f"weight_bits={weight_bits} (supported: {', '.join(map(str, WEIGHT_BITS))})"
    if k < 1 or n < 1:
        return f"empty layer (K={k}, N={n}): nothing to quantize"
    if weight_bits == 4 and k % 2:
        return f"K={k} is odd: int4 packs two values per byte"
    if weight_bits == 4 and group and group % 2:
        return f"weight group {group} is odd: int4 packs two values per byte"
    if group and k % group:
        return f"K={k} is not a multiple of weight group {group}"
    return None


ROTATION_IN_KERNEL_MAX_TILE = 16384
"""Largest padded row ``A_PAD x B`` the rotating quantization kernel holds (K=15360 as 120 x 128
pads to 128 x 128)."""


def rotation_in_kernel(x, rotation, static_scale) -> bool:
    """Whether ``quantize_act_triton`` rotates inside the kernel: 16-bit x, dynamic scales (the
    reference's 16-bit route, which the kernel reproduces), two ``kron_factors`` whose orders
    suit tensor-core dots (the power-of-two inner one and the padded outer one both >= 16) and
    fit one program. x, rotation and static_scale as ``viditq.quantize_act`` takes them (fake
    tensors do)."""
    if static_scale is not None or x.dtype not in (torch.bfloat16, torch.float16) or len(rotation) != 2:
        return False
    a, b = (int(r.shape[0]) for r in rotation)
    a_pad = 1 << max(a - 1, 0).bit_length()
    return b & (b - 1) == 0 and b >= 16 and a_pad >= 16 and a_pad * b <= ROTATION_IN_KERNEL_MAX_TILE
