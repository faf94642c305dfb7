"""``kernels/attention.py``: the flash-style quantized attention kernel against
``numerics.attention.attention_ref`` (under ``TRITON_INTERPRET=1`` on CPU: tiny shapes), and its
ahead-of-time build for sm_90 / sm_80 (tensor-core dots, no spill in the K loop).

The kernel's integer Q·Kᵀ is the reference's (the same int8 operands, exact int32 sums); its
output differs from the reference by the online softmax's fp32 order and by which rescaled
probabilities it rounds to 16 bits, so it is held to ``attention_bound`` (a few 16-bit ulps of
``max |v|``), and to fp32 SDPA by the reference's own SQNR floor.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.triton_interpreter import mode
from viditq_compile.kernels import aot
from viditq_compile.numerics import attention as A
from viditq_compile.numerics.quant import sqnr_db

triton = pytest.importorskip("triton", reason="triton is not importable")

from viditq_compile.kernels import attention as K  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
skip_if_off = pytest.mark.skipif(mode() == "off", reason="no CUDA device and TRITON_INTERPRET is not '1'")


def _qkv(lead=(1, 2), lq=50, lk=70, d=24, dv=20, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*lead, lq, d, generator=g) * 1.5
    k = torch.randn(*lead, lk, d, generator=g) * 1.5
    k[..., 1] += 8.0  # a key channel offset: what the mean subtraction removes
    v = torch.randn(*lead, lk, dv, generator=g)
    return tuple(t.to(device=DEVICE, dtype=dtype) for t in (q, k, v))


def _check(q, k, v, **kw):
    got = K.attention_triton(q, k, v, **kw)
    want = A.attention_ref(q, k, v, **kw)
    assert got.dtype == q.dtype and got.shape == want.shape
    err = (got.float() - want.float()).abs().max().item()
    assert err <= A.attention_bound(v), (err, A.attention_bound(v))
    return got


@pytest.mark.triton_interpreter
@skip_if_off
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blocks", [(16, 8), (1, 1), (128, 128)])
def test_matches_the_reference_within_its_bound(dtype, blocks):
    q, k, v = _qkv(dtype=dtype)
    got = _check(q, k, v, block_q=blocks[0], block_k=blocks[1])
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert sqnr_db(ref, got) > 30


@pytest.mark.triton_interpreter
@skip_if_off
@pytest.mark.parametrize("lq,lk,d,dv", [
    (1, 1, 16, 16),     # one query, one key: softmax is 1
    (33, 31, 72, 72),   # PixArt's head dim (padded to 80 and a 128-wide tile), tails in both tiles
    (40, 100, 64, 48),  # several K tiles (the interpreter's BLOCK_N is 32), Dv != D
    (8, 77, 32, 32),    # cross-attention-like: 77 text tokens
])
def test_shapes(lq, lk, d, dv):
    _check(*_qkv(lq=lq, lk=lk, d=d, dv=dv, dtype=torch.bfloat16), block_q=16, block_k=16)


@pytest.mark.triton_interpreter
@skip_if_off
def test_scale_and_leading_dims():
    q, k, v = _qkv(lead=(2, 1, 3), lq=20, lk=20, d=16, dv=16)
    _check(q, k, v, scale=0.05)


def test_refuses_head_dims_past_the_kernel():
    q = torch.empty(1, 1, 4, 320, device="meta")
    assert "exceed" in K.unsupported_reason(q, q, q)
    assert K.unsupported_reason(q[..., :256], q[..., :256], q[..., :256]) is None


# ---- ahead of time, for the GPU (no GPU needed) ---------------------------------------------------

aot_only = pytest.mark.skipif(aot.unavailable_reason() is not None,
                              reason=f"cannot compile for CUDA targets here: {aot.unavailable_reason()}")


@aot_only
@pytest.mark.parametrize("arch,d,dtype", [(90, 72, torch.bfloat16), (90, 128, torch.float16),
                                          (90, 256, torch.bfloat16), (80, 72, torch.bfloat16),
                                          (90, 64, torch.float32)])
def test_compiles_to_tensor_core_dots_without_spills_in_the_k_loop(arch, d, dtype):
    b = aot.inspect(K.build(arch, d=d, dv=d, dtype=dtype), "attention", f"d{d}-{dtype}", "", arch)
    where = f"attention d={d} {dtype} sm_{arch}"
    assert b.mma == ("wgmma" if arch >= 90 else "mma"), f"{where}: dots lowered to {b.mma}"
    assert b.loop_spills == 0 and b.stack == 0, f"{where}: {b.loop_spills} local loads/stores in the K loop"
    assert b.regs <= aot.MAX_REGS and b.shared <= aot.SHARED_LIMIT[arch], b
    if arch == 90 and d <= 128:
        # 16-byte aligned rows (prepare pads D to a multiple of 16): K / V tiles go to shared
        # memory asynchronously, never through registers
        assert b.loop_sts == 0, f"{where}: {b.loop_sts} shared stores per K step"


# ---- on a GPU (skipped without one) -----------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 72, 128])
def test_dit_shapes_on_cuda(dtype, d):
    """PixArt-like heads (72) and the usual 64 / 128 over 1024 tokens, through the op's CUDA
    registration (``ops/cuda.py``) and the kernel alike."""
    from viditq_compile.ops import cuda  # noqa: F401  (registers the CUDA implementations)
    from viditq_compile.ops.schema import ATTENTION

    q, k, v = _qkv(lead=(2, 4), lq=1024, lk=1024, d=d, dv=d, dtype=dtype)
    got = _check(q, k, v)
    assert got.stride() == A.empty_output(q, d).stride()
    assert torch.equal(ATTENTION.overload(q, k, v, 1 / math.sqrt(d)), got)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert sqnr_db(ref, got) > 30
