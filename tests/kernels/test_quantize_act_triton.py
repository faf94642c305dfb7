"""``kernels/quantize_act.py`` (Triton) against ``numerics.quantize_act``: bit-exact q, scale, rowsum.

Without CUDA the kernel runs on CPU tensors under ``TRITON_INTERPRET=1`` (in a child pytest:
``tests/triton_interpreter.py``), so the CPU tests use tiny shapes; DiT shapes run only on CUDA.
"""

import pytest
import torch

from tests.triton_interpreter import skip_module_if_off

pytestmark = pytest.mark.triton_interpreter
skip_module_if_off()
triton = pytest.importorskip("triton", reason="triton is not importable")

from viditq_compile.kernels.quantize_act import INTERPRET, quantize_act_ref, quantize_act_triton, rotation_in_kernel  # noqa: E402
from viditq_compile.numerics import quant as numerics  # noqa: E402
from viditq_compile.numerics.hadamard import kron_factors  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _inputs(shape, dtype, with_smooth, with_rotation, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    k = shape[-1]
    x = torch.randn(shape, generator=g) * 2.0
    x[..., 3] *= 20.0  # an outlier channel, as in DiT activations
    smooth = torch.rand(k, generator=g) + 0.25 if with_smooth else None
    rotation = [f.to(device) for f in kron_factors(k)] if with_rotation else []
    return (x.to(device=device, dtype=dtype), None if smooth is None else smooth.to(device), rotation)


def _assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(g, w), (g - w.to(g.dtype)).abs().max()


@pytest.mark.parametrize("shape", [(1, 16), (5, 48), (17, 96), (2, 3, 48)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_smooth", [False, True])
@pytest.mark.parametrize("with_rotation", [False, True])
@pytest.mark.parametrize("static", [False, True])
def test_matches_reference_exactly(shape, dtype, with_smooth, with_rotation, static):
    x, smooth, rotation = _inputs(shape, dtype, with_smooth, with_rotation)
    for bits in numerics.SUPPORTED_ACT_BITS:
        s = torch.tensor(0.05, device=DEVICE) if static else None
        got = quantize_act_triton(x, smooth, rotation, s, bits, with_rowsum=True)
        _assert_same(got, quantize_act_ref(x, smooth, rotation, s, bits, with_rowsum=True))
        qmin, qmax = numerics.qrange(bits)
        assert int(got[0].min()) >= qmin and int(got[0].max()) <= qmax


@pytest.mark.parametrize("block_k", [16, 32])
def test_k_in_several_chunks(block_k):
    """K larger than BLOCK_K: both passes loop over chunks, the tail chunk masked (96 = 3x32)."""
    x, smooth, _ = _inputs((5, 96), torch.float32, True, False)
    got = quantize_act_triton(x, smooth, [], None, 8, with_rowsum=True, block_k=block_k)
    _assert_same(got, quantize_act_ref(x, smooth, [], None, 8, with_rowsum=True))
    x2, _, _ = _inputs((3, 40), torch.float32, False, False)  # 40 = 32 + masked tail of 8
    _assert_same(quantize_act_triton(x2, None, [], None, 4, block_k=32), quantize_act_ref(x2, None, [], None, 4))


def test_fp16_and_strided_input():
    x, smooth, _ = _inputs((6, 96), torch.float16, True, False)
    _assert_same(quantize_act_triton(x, smooth, [], None), quantize_act_ref(x, smooth, [], None))
    wide, _, _ = _inputs((5, 96), torch.float32, False, False)
    cols = wide[:, ::2]  # stride_xk = 2
    _assert_same(quantize_act_triton(cols, None, [], None), quantize_act_ref(cols, None, [], None))
    t = wide.reshape(5, 2, 48).transpose(0, 1)  # [2, 5, 48], rows not contiguous
    _assert_same(quantize_act_triton(t, None, [], None, with_rowsum=True),
                 quantize_act_ref(t, None, [], None, with_rowsum=True))


def test_rowsum_is_q_sum():
    x, smooth, rotation = _inputs((2, 3, 96), torch.bfloat16, True, True)
    q, _, rowsum = quantize_act_triton(x, smooth, rotation, None, 4, with_rowsum=True)
    assert rowsum.dtype == torch.int32 and rowsum.shape == (2, 3, 1)
    assert torch.equal(rowsum, q.to(torch.int32).sum(-1, keepdim=True))


def test_all_zero_rows_use_scale_floor():
    x = torch.zeros(3, 48, device=DEVICE)
    x[1] = torch.linspace(-1, 1, 48)
    q, scale, rowsum = quantize_act_triton(x, None, [], None, 8, with_rowsum=True)
    floor = torch.tensor(numerics.SCALE_FLOOR, dtype=torch.float32) / 127
    assert scale[0, 0].item() == floor.item() and scale[2, 0].item() == floor.item()
    assert not q[0].any() and not q[2].any() and not rowsum[0].any()
    _assert_same((q, scale), quantize_act_ref(x, None, [], None, 8))
    # a static scale below the floor is floored too
    s = torch.tensor(0.0, device=DEVICE)
    _assert_same(quantize_act_triton(x, None, [], s), quantize_act_ref(x, None, [], s))


def test_rounding_ties_to_even():
    halves = torch.arange(-130, 130, dtype=torch.float32) + 0.5
    near = torch.tensor([0.49999997, -0.49999997, 1.4999999, 2.5000002, 1e-30, -0.0, 127.0, -128.0, 1e30, -1e30])
    x = torch.cat([halves, near]).reshape(1, -1).to(DEVICE)
    q, scale = quantize_act_triton(x, None, [], torch.tensor(1.0, device=DEVICE))
    want = torch.clamp(torch.round(x), -128, 127).to(torch.int8)
    assert torch.equal(q, want)
    assert q[0, 132].item() == 2 and q[0, 133].item() == 4  # 2.5 -> 2, 3.5 -> 4
    assert q[0, 127].item() == -2 and q[0, 260].item() == 0  # -2.5 -> -2, 0.49999997 -> 0
    # dynamic scale: absmax 127 makes scale exactly 1, so x / scale keeps the ties
    row = torch.tensor([[127.0, 0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, -3.5, 126.5]], device=DEVICE)
    q, scale = quantize_act_triton(row, None, [], None)
    assert scale.item() == 1.0
    assert q.tolist() == [[127, 0, 2, 2, 4, 0, -2, -2, -4, 126]]
    # 4-bit: ties and clipping at [-8, 7]
    q4, s4 = quantize_act_triton(torch.tensor([[7.0, 0.5, 1.5, -2.5, 6.5]], device=DEVICE), None, [], None, 4)
    assert s4.item() == 1.0 and q4.tolist() == [[7, 0, 2, -2, 6]]
    one = torch.tensor(1.0, device=DEVICE)
    q4, _ = quantize_act_triton(torch.tensor([[7.5, -8.5, -9.0, -7.5, 100.0]], device=DEVICE), None, [], one, 4)
    assert q4.tolist() == [[7, -8, -8, -8, 7]]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter: NaN / NaN
def test_nonfinite_rows_propagate_to_their_scale_only():
    x = torch.ones(3, 16, device=DEVICE)
    x[0, 5] = float("nan")
    x[2, 7] = float("inf")
    q, scale = quantize_act_triton(x, None, [], None)
    assert torch.isnan(scale[0, 0]) and torch.isinf(scale[2, 0])
    _assert_same((q[1], scale[1]), tuple(t[1] for t in quantize_act_ref(x, None, [], None)))


def test_empty_rows():
    x = torch.zeros(0, 3, 16, device=DEVICE)
    q, scale, rowsum = quantize_act_triton(x, None, [], None, with_rowsum=True)
    assert q.shape == (0, 3, 16) and scale.shape == (0, 3, 1) and rowsum.shape == (0, 3, 1)


@pytest.mark.parametrize("shape,block_k", [((5, 48), None), ((2, 3, 96), 32), ((7, 34), 16)])
@pytest.mark.parametrize("with_smooth", [False, True])
def test_packed_4bit_output_is_pack_int4_of_the_reference(shape, block_k, with_smooth):
    """W4A4: two 4-bit values per byte (``kernels.packing`` layout), same values and scales."""
    from viditq_compile.numerics.packing import pack_int4

    x, smooth, _ = _inputs(shape, torch.bfloat16, with_smooth, False, seed=4)
    q, s, rs = quantize_act_triton(x, smooth, [], None, 4, with_rowsum=True, block_k=block_k, pack=True)
    rq, rsc, rrs = quantize_act_ref(x, smooth, [], None, 4, with_rowsum=True)
    assert q.dtype == torch.uint8 and q.shape == (*shape[:-1], shape[-1] // 2)
    assert torch.equal(q, pack_int4(rq)) and torch.equal(s, rsc) and torch.equal(rs, rrs)


def test_pack_needs_4_bits_and_even_k():
    x = torch.randn(3, 48, device=DEVICE)
    with pytest.raises(ValueError, match="pack=True needs act_bits=4"):
        quantize_act_triton(x, None, [], None, 8, pack=True)
    with pytest.raises(ValueError, match="even K"):
        quantize_act_triton(torch.randn(3, 17, device=DEVICE), None, [], None, 4, pack=True)


def _assert_within_one_step(got, want):
    """A rotated value within fp32 summation-order rounding of a bf16 step can round either way:
    q may differ by one step on rare entries, the scale by one 16-bit rounding of the absmax."""
    q, scale, rowsum = got
    rq, rscale, _ = want
    d = (q.int() - rq.int()).abs()
    assert d.max() <= 1 and d.float().mean() < 1e-3
    torch.testing.assert_close(scale, rscale, rtol=2 ** -7, atol=0)
    assert torch.equal(rowsum, q.sum(-1, keepdim=True, dtype=torch.int32))


@pytest.mark.parametrize("k", [256, 576, 1152])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_smooth", [False, True])
def test_rotation_inside_the_kernel(k, dtype, with_smooth):
    """16-bit activations, two Kronecker factors of orders >= 16 (1152 = 36 x 32, the 36 padded to
    64): the kernel rotates in registers with the reference's roundings. Bit-exact under the
    interpreter (fp32 sums of exact ±1 products in the same order); one step on GPU."""
    x, smooth, rotation = _inputs((9, k), dtype, with_smooth, True, seed=k)
    assert rotation_in_kernel(x, rotation, None)
    for bits in numerics.SUPPORTED_ACT_BITS:
        got = quantize_act_triton(x, smooth, rotation, None, bits, with_rowsum=True)
        want = quantize_act_ref(x, smooth, rotation, None, bits, with_rowsum=True)
        if INTERPRET:
            _assert_same(got, want)
        else:
            _assert_within_one_step(got, want)


@pytest.mark.parametrize("k,rms", [(256, 2000.0), (1152, 600.0), (96, 3000.0)])
@pytest.mark.parametrize("with_smooth", [False, True])
def test_large_fp16_rows_rotate_without_overflow(k, rms, with_smooth):
    """fp16 rows whose unnormalised ±1 rotation overflowed 16 bits (RMS 600 at K=1152): both the
    in-register route (256, 1152) and the torch route (96 = 12 x 8) prescale the row by the power of
    two of ``numerics.rotation_prescale``, bit-exact with the reference and finite, within one
    step of the fp32 route."""
    x, smooth, rotation = _inputs((6, k), torch.float32, with_smooth, True, seed=k)
    x = x / x.pow(2).mean(-1, keepdim=True).sqrt() * rms
    x[0] /= rms  # an ordinary row next to the large ones
    x[1] = 0.0
    x = x.clamp(-60000, 60000).to(torch.float16)
    assert rotation_in_kernel(x, rotation, None) == (k != 96)
    got = quantize_act_triton(x, smooth, rotation, None, 8, with_rowsum=True)
    want = quantize_act_ref(x, smooth, rotation, None, 8, with_rowsum=True)
    assert torch.isfinite(got[1]).all() and torch.isfinite(want[1]).all()
    if INTERPRET or k == 96:
        _assert_same(got, want)
    else:
        _assert_within_one_step(got, want)
    exact = numerics.quantize_per_token(numerics.balance_activation(x, smooth, rotation))
    assert (got[0].int() - exact[0].int()).abs().max() <= 1


def test_rotation_stays_in_torch_where_the_kernel_cannot_hold_it():
    x = torch.randn(3, 48, dtype=torch.bfloat16)
    assert not rotation_in_kernel(x, kron_factors(48), None)            # orders 12 x 4: too small for dots
    assert not rotation_in_kernel(x.float(), kron_factors(48), None)    # fp32: the reference rotates in fp32
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    assert not rotation_in_kernel(x, kron_factors(256), torch.tensor(0.1))  # static scales
    assert rotation_in_kernel(x, kron_factors(256), None)


@pytest.mark.parametrize("with_rotation", [False, True])
def test_launch_runs_under_the_input_device_guard(monkeypatch, with_rotation):
    """Both kernels launch inside ``device_guard(x.device)`` (``tests/kernels/test_launch.py``)."""
    from viditq_compile.kernels import quantize_act

    entered = []
    real = quantize_act.device_guard
    monkeypatch.setattr(quantize_act, "device_guard", lambda d: entered.append(d) or real(d))
    x, smooth, rotation = _inputs((3, 256), torch.bfloat16, False, with_rotation)
    quantize_act_triton(x, smooth, rotation, None, 8)
    assert entered == [x.device]


def test_errors():
    x = torch.randn(4, 16, device=DEVICE)
    ok = (None, [], None)
    with pytest.raises(ValueError, match="floating point"):
        quantize_act_triton(x.to(torch.int32), *ok)
    with pytest.raises(ValueError, match="smooth"):
        quantize_act_triton(x, torch.ones(8, device=DEVICE), [], None)
    with pytest.raises(ValueError, match="smooth"):
        quantize_act_triton(x, torch.ones(16, dtype=torch.float64, device=DEVICE), [], None)
    with pytest.raises(ValueError, match="multiply to"):
        quantize_act_triton(x, None, [f.to(DEVICE) for f in kron_factors(8)], None)
    with pytest.raises(ValueError, match="square fp32"):
        quantize_act_triton(x, None, [torch.ones(16, 16, dtype=torch.float64, device=DEVICE)], None)
    with pytest.raises(ValueError, match="static_scale"):
        quantize_act_triton(x, None, [], torch.ones(1, device=DEVICE))
    with pytest.raises(ValueError, match="act_bits"):
        quantize_act_triton(x, None, [], None, 3)
    with pytest.raises(ValueError, match="block_k"):
        quantize_act_triton(x, None, [], None, 8, block_k=24)
    with pytest.raises(ValueError, match="K >= 1"):
        quantize_act_triton(torch.zeros(4, 0, device=DEVICE), *ok)
    with pytest.raises(ValueError, match="device"):
        quantize_act_triton(x, torch.ones(16, device="meta"), [], None)


@needs_cuda
@pytest.mark.parametrize("k", [1152, 4608])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_rotation", [False, True])
@pytest.mark.parametrize("static", [False, True])
def test_dit_shapes_cuda(k, dtype, with_rotation, static):
    x, smooth, rotation = _inputs((4096, k), dtype, True, with_rotation, device="cuda")
    s = torch.tensor(0.02, device="cuda") if static else None
    for bits in numerics.SUPPORTED_ACT_BITS:
        got = quantize_act_triton(x, smooth, rotation, s, bits, with_rowsum=True)
        want = quantize_act_ref(x, smooth, rotation, s, bits, with_rowsum=True)
        if rotation_in_kernel(x, rotation, s):
            _assert_within_one_step(got, want)  # tensor-core sums in another order than the CPU GEMM
        else:
            _assert_same(got, want)
