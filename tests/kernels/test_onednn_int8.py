"""The CPU int8 GEMM through oneDNN (``kernels.onednn_int8``) and the op that calls it
(``viditq.int8_mm``): bit-exact with ``numerics.int8_mm``, prepacked once per weight, never stale."""

import gc

import pytest
import torch

from viditq_compile.kernels import onednn_int8
from viditq_compile.numerics import quant as N
from viditq_compile.numerics.packing import pack_int4

needs_onednn = pytest.mark.skipif(not onednn_int8.available(),
                                  reason=f"oneDNN int8 route not here: {onednn_int8.unavailable_reason()}")


def _operands(m=67, k=288, n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    xq = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    wq = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    ws = torch.rand(n, generator=g) * 1e-3 + 1e-5
    return xq, wq, ws


@needs_onednn
@pytest.mark.parametrize("scaled,out_dtype", [(False, torch.float32), (True, torch.float32),
                                              (True, torch.bfloat16)])
def test_onednn_product_is_bit_exact_with_the_reference(scaled, out_dtype):
    xq, wq, ws = _operands()
    want = N.int8_mm(xq, wq, ws if scaled else None, out_dtype)  # int64 reference GEMM
    got = onednn_int8.int8_mm(xq, wq, ws if scaled else None, out_dtype)
    assert got.dtype == out_dtype and torch.equal(got, want)


@needs_onednn
def test_a_weight_is_prepacked_once_and_dropped_with_it():
    onednn_int8.clear_cache()
    xq, wq, ws = _operands(seed=1)
    for _ in range(3):
        onednn_int8.int8_mm(xq, wq, ws, torch.bfloat16)
    assert onednn_int8.cached_weights() == 1
    assert onednn_int8.cached_bytes() >= wq.numel()
    del wq
    gc.collect()
    assert onednn_int8.cached_weights() == 0


@needs_onednn
def test_a_weight_changed_in_place_is_packed_again():
    onednn_int8.clear_cache()
    xq, wq, ws = _operands(seed=2)
    before = onednn_int8.int8_mm(xq, wq, None, torch.float32)
    wq.mul_(-1)  # bumps the version counter: the cached copy is stale
    after = onednn_int8.int8_mm(xq, wq, None, torch.float32)
    assert torch.equal(after, -before)
    assert torch.equal(after, N.int8_mm(xq, wq, None, torch.float32))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_op_matches_the_reference_on_either_route(monkeypatch, out_dtype):
    xq, wq, ws = _operands(m=5, k=64, n=24, seed=3)
    want = N.int8_mm(xq, wq, ws, out_dtype)
    assert torch.equal(torch.ops.viditq.int8_mm(xq, wq, None, 8, ws, out_dtype), want)
    monkeypatch.setitem(onednn_int8._state, "reason", "forced off by the test")
    assert torch.equal(torch.ops.viditq.int8_mm(xq, wq, None, 8, ws, out_dtype), want)


@pytest.mark.parametrize("sym", [True, False])
def test_int4_weights_give_the_references_integer_gemm_on_either_route(monkeypatch, sym):
    """Packed int4 (with a zero point or not): the op's fp32 accumulator is the reference's
    ``acc - rowsum(xq) * zero``, unpacked and zero-adjusted once (prepacked, on oneDNN)."""
    g = torch.Generator().manual_seed(6)
    k, n = 128, 40
    qw = N.quantize_weight(torch.randn(n, k, generator=g), bits=4, sym=sym)
    xq, _ = N.quantize_per_token(torch.randn(9, k, generator=g))
    acc = N.int_gemm_ref(xq, qw.q)
    if qw.zero is not None:
        acc = acc - xq.to(torch.int32).sum(-1, keepdim=True) * qw.zero
    packed = pack_int4(qw.q)
    onednn_int8.clear_cache()
    for _ in range(2):
        got = torch.ops.viditq.int8_mm(xq, packed, qw.zero, 4, None, torch.float32)
        assert torch.equal(got, acc.to(torch.float32))
    assert onednn_int8.cached_weights() == int(onednn_int8.available())
    monkeypatch.setitem(onednn_int8._state, "reason", "forced off by the test")
    assert torch.equal(torch.ops.viditq.int8_mm(xq, packed, qw.zero, 4, None, torch.float32),
                       acc.to(torch.float32))


@needs_onednn
def test_a_changed_zero_point_is_packed_again():
    g = torch.Generator().manual_seed(9)
    qw = N.quantize_weight(torch.randn(16, 64, generator=g), bits=4, sym=False)
    xq, _ = N.quantize_per_token(torch.randn(4, 64, generator=g))
    packed, zero = pack_int4(qw.q), qw.zero.clone()
    torch.ops.viditq.int8_mm(xq, packed, zero, 4, None, torch.float32)
    zero.sub_(1)
    want = N.int8_mm(xq, N.zero_adjusted_weight(qw.q, zero), None, torch.float32)
    assert torch.equal(torch.ops.viditq.int8_mm(xq, packed, zero, 4, None, torch.float32), want)


@pytest.mark.parametrize("bad,match", [
    (lambda xq, wq, ws: (xq.float(), wq, None, 8, ws, torch.float32), "xq must be an int8"),
    (lambda xq, wq, ws: (xq, wq[:, :-1], None, 8, ws, torch.float32), r"8-bit weights must be int8 \[N, K=64\]"),
    (lambda xq, wq, ws: (xq, wq, None, 4, ws, torch.float32), r"packed uint8 \[N, K/2\]"),
    (lambda xq, wq, ws: (xq, wq, torch.zeros(24, dtype=torch.int32), 8, ws, torch.float32), "must be symmetric"),
    (lambda xq, wq, ws: (xq, wq, None, 2, ws, torch.float32), "weight_bits=2"),
    (lambda xq, wq, ws: (xq, wq, None, 8, ws[:-1], torch.float32), r"w_scale must be None or fp32 \[24\]"),
    (lambda xq, wq, ws: (xq, wq, None, 8, ws, torch.int32), "out_dtype=torch.int32"),
    (lambda xq, wq, ws: (xq, wq, None, 8, None, torch.bfloat16), "without w_scale"),
])
def test_op_names_the_bad_operand(bad, match):
    xq, wq, ws = _operands(m=5, k=64, n=24, seed=4)
    with pytest.raises(ValueError, match=match):
        torch.ops.viditq.int8_mm(*bad(xq, wq, ws))


def test_the_route_variable_is_validated(monkeypatch):
    onednn_int8.available()  # decided, so the monkeypatch below puts the decision back
    monkeypatch.delitem(onednn_int8._state, "reason", raising=False)
    monkeypatch.setenv(onednn_int8.ENV, "mkl")
    with pytest.raises(ValueError, match=r"VIDITQ_CPU_INT8_GEMM='mkl': must be one of \('onednn', 'int_mm'\)"):
        onednn_int8.available()
    monkeypatch.setenv(onednn_int8.ENV, "int_mm")
    assert not onednn_int8.available()
    assert onednn_int8.unavailable_reason() == "VIDITQ_CPU_INT8_GEMM=int_mm"


def test_the_report_says_when_the_cpu_gemm_is_not_onednn(monkeypatch):
    """The slower ``torch._int_mm`` route is never silent: the report's summary names it and why."""
    import viditq_compile as vq
    from tests.zoo import build_pixart
    from viditq_compile.report.tables import build_report

    model, kwargs = build_pixart()
    plan = vq.quantize(model.eval(), (), kwargs, recipe="w8a8").plan
    on = build_report(plan).summary()
    assert ("torch._int_mm" in on) == (not onednn_int8.available())
    monkeypatch.setitem(onednn_int8._state, "reason", "forced off by the test")
    off = build_report(plan).summary()
    assert "int8 GEMMs run torch._int_mm, not oneDNN (forced off by the test)" in off
    assert "prepacked" not in off
