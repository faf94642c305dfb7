"""``viditq.attention`` (``ops/library.py``): the CPU implementation against ``numerics.attention``,
its fake under export and compile, and its refusals."""

import math

import pytest
import torch
import torch.nn.functional as F

from viditq_compile.numerics import attention as A
from viditq_compile.numerics.quant import sqnr_db
from viditq_compile.ops import library
from viditq_compile.ops.schema import ATTENTION


def _qkv(shape=(2, 3, 200, 64), lk=None, dv=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    *lead, lq, d = shape
    lk = lk or lq
    q = torch.randn(*lead, lq, d, generator=g)
    k = torch.randn(*lead, lk, d, generator=g)
    k[..., 3] += 10.0  # a key channel offset, as a projection bias makes it
    v = torch.randn(*lead, lk, dv or d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blocks", [(128, 128), (1, 1), (64, 16)])
def test_op_in_one_chunk_is_the_reference_bit_for_bit(dtype, blocks):
    q, k, v = _qkv(dtype=dtype)
    scale = 1 / math.sqrt(q.shape[-1])
    got = ATTENTION.overload(q, k, v, scale, *blocks)
    want = A.attention_ref(q, k, v, scale, block_q=blocks[0], block_k=blocks[1])
    assert got.dtype == dtype and torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_rows_match_within_fp32_summation_order(dtype):
    q, k, v = _qkv(shape=(2, 2, 100, 32), lk=77, dv=48, dtype=dtype)
    whole = library.attention_impl(q, k, v, 0.2, 128, 128)
    chunked = library.attention_impl(q, k, v, 0.2, 128, 128, chunk_rows=7)
    assert whole.shape == (2, 2, 100, 48)
    tol = 0 if dtype == torch.float32 else torch.finfo(dtype).eps
    torch.testing.assert_close(chunked.float(), whole.float(), rtol=tol + 1e-6, atol=1e-6)


def test_head_dims_past_the_exact_fp32_bound_take_int64():
    """Above 1040 channels an fp32 sum of int8 products may round; the op switches to int64 scores
    and stays the reference."""
    d = A.exact_fp32_max_d() + 8
    q, k, v = _qkv(shape=(1, 1, 24, d))
    assert torch.equal(ATTENTION.overload(q, k, v, 0.01), A.attention_ref(q, k, v, 0.01))


def test_close_to_fp32_sdpa():
    q, k, v = _qkv()
    assert sqnr_db(F.scaled_dot_product_attention(q, k, v), ATTENTION.overload(q, k, v, 1 / 8)) > 30


class _Attn(torch.nn.Module):
    def forward(self, q, k, v):
        return ATTENTION.overload(q, k, v, 0.125, 128, 128) * 2


def test_export_and_compile_keep_the_op():
    q, k, v = _qkv(shape=(2, 2, 40, 64))
    batch = torch.export.Dim("batch")
    ep = torch.export.export(_Attn(), (q, k, v), dynamic_shapes=({0: batch}, {0: batch}, {0: batch}))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert ATTENTION.overload in targets
    q3, k3, v3 = _qkv(shape=(3, 2, 40, 64), seed=1)
    want = _Attn()(q3, k3, v3)
    assert torch.equal(ep.module()(q3, k3, v3), want)
    # caches off: the FX graph cache keys on the graph, not on the op's fake (its output strides)
    with torch._inductor.config.patch(force_disable_caches=True):
        got = torch.compile(_Attn(), fullgraph=True)(q3, k3, v3)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got.stride() == want.stride()  # SDPA's layout, as the fake says


def test_fake_gives_the_output_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = torch.empty(2, 4, 10, 32), torch.empty(2, 4, 7, 32), torch.empty(2, 4, 7, 16)
        out = ATTENTION.overload(q, k, v, 0.1)
    assert out.shape == (2, 4, 10, 16) and out.dtype == torch.float32


@pytest.mark.parametrize("args,match", [
    ((torch.randn(2, 8, 32), torch.randn(2, 8, 16), torch.randn(2, 8, 32), 0.1), "head dim"),
    ((torch.randn(2, 8, 32), torch.randn(2, 8, 32), torch.randn(2, 8, 32).half(), 0.1), "share a dtype"),
    ((torch.randn(2, 8, 32), torch.randn(2, 8, 32), torch.randn(2, 8, 32), -1.0), "scale"),
    ((torch.randn(2, 8, 32), torch.randn(2, 8, 32), torch.randn(2, 8, 32), 0.1, 0), "block_q"),
    ((torch.randn(8, 32), torch.randn(8, 32), torch.randn(8, 32), 0.1), "batch/head"),
])
def test_refusals_name_the_operand(args, match):
    with pytest.raises(ValueError, match=match):
        ATTENTION.overload(*args)
