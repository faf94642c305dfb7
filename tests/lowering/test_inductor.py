"""Inductor lowering on CPU, pinned by the generated code."""

import logging
import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from viditq_compile.kernels import onednn_int8
from viditq_compile.lowering import inductor
from viditq_compile.lowering.inductor import install
from viditq_compile.numerics import quant as N
from viditq_compile.numerics.hadamard import kron_factors
from viditq_compile.numerics.packing import pack_int4
from viditq_compile.numerics.quant import sqnr_db


def test_quantization_fuses_into_its_producer_and_gemm_is_extern(mlp_block):
    m, args = mlp_block
    compiled = torch.compile(m, backend="viditq")
    with torch.no_grad():
        out, codes = run_and_get_code(compiled, *args)
    code = "\n".join(codes)
    # both quantized linears run as extern int8 GEMMs (oneDNN's where it runs), no opaque
    # linear op call remains
    gemm = r"torch\.ops\.viditq\.int8_mm\.default\(" if onednn_int8.available() else r"extern_kernels\._int_mm\("
    assert len(re.findall(gemm, code)) == 2
    assert "torch.ops.viditq.w8a8_linear" not in code
    # per-token quantization of fc1's input is computed in the LayerNorm/modulate kernel
    kernels = set(re.findall(r"def (cpp_fused_\w+)|(cpp_fused_\w+)\(", code))
    names = {a or b for a, b in kernels}
    assert any("native_layer_norm" in k and "w8a8_linear" in k for k in names), names
    # fc1's dequant epilogue, GELU and fc2's quantization share one kernel
    assert any("gelu" in k and "w8a8_linear" in k for k in names), names
    assert sqnr_db(m(*args), out) > 35


class _BalancedW4Linear(torch.nn.Module):
    """LayerNorm -> viditq.quantize_act (smooth + Kronecker rotation) -> viditq.qlinear (int4) -> GELU."""

    def __init__(self, k=64, n=32, group=None, sym=False):
        super().__init__()
        smooth, rot = torch.rand(k) + 0.5, kron_factors(k)
        w = N.balance_weight(torch.randn(n, k) / k ** 0.5, smooth, None, rot)
        qw = N.quantize_weight(w, bits=4, sym=sym, group=group)
        self.register_buffer("smooth", smooth)
        self.register_buffer("r0", rot[0])
        self.register_buffer("r1", rot[1])
        for name, t in [("w_q", pack_int4(qw.q)), ("w_scale", qw.scale), ("w_zero", qw.zero),
                        ("bias", torch.randn(n))]:
            self.register_buffer(name, t)
        self.group = group or 0

    def forward(self, x):
        h = torch.nn.functional.layer_norm(x, x.shape[-1:])
        q, s = torch.ops.viditq.quantize_act(h, self.smooth, [self.r0, self.r1], None, 8)
        y = torch.ops.viditq.qlinear(q, s, self.w_q, self.w_scale, self.w_zero, self.bias, 4, self.group,
                                     x.dtype)
        return torch.nn.functional.gelu(y)


@pytest.mark.parametrize("group,sym", [(None, False), (32, False), (16, True)])
def test_balanced_int4_qlinear_compiles_to_extern_gemms(group, sym):
    install()
    m = _BalancedW4Linear(group=group, sym=sym).eval()
    x = torch.randn(2, 8, 64)
    with torch.no_grad():
        eager = m(x)
        out, codes = run_and_get_code(torch.compile(m), x)
    code = "\n".join(codes)
    if group is None and onednn_int8.available():
        # per channel: one oneDNN GEMM on the weight unpacked once (no unpack in the graph)
        assert len(re.findall(r"torch\.ops\.viditq\.int8_mm\.default\(", code)) == 1
        assert "torch.ops.viditq.qlinear" not in code and "extern_kernels._int_mm" not in code
    else:
        # one extern int8 GEMM per weight group, no opaque op call left
        assert len(re.findall(r"extern_kernels\._int_mm\(", code)) == 64 // (group or 64)
        assert "torch.ops.viditq" not in code
    # LayerNorm and smoothing share a kernel (the rotation is two extern GEMMs); the int4 unpack is
    # a generated kernel (no aten.cat fallback: Inductor's CPU cat has no int8 code); the epilogue
    # and GELU share one
    names = set(re.findall(r"(cpp_fused_\w+) = ", code))
    assert any("native_layer_norm" in k and "quantize_act" in k for k in names), names
    assert any("gelu" in k and "qlinear" in k for k in names), names
    assert "aten.cat" not in code
    # Inductor may reorder fp32 ops (a rounding flip of xq would show as ~1e-2 here)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sym,bias,lead", [(False, True, (2, 7)), (True, False, (5,))])
def test_grouped_qlinear_is_bit_exact_with_the_reference(sym, bias, lead):
    g = torch.Generator().manual_seed(3)
    k, n, group = 96, 40, 32
    qw = N.quantize_weight(torch.randn(n, k, generator=g), bits=4, sym=sym, group=group)
    xq, xs = N.quantize_per_token(torch.randn(*lead, k, generator=g) * 3)
    b = torch.randn(n, generator=g).to(torch.bfloat16) if bias else None
    want = N.qlinear(xq, xs, qw.q, qw.scale, qw.zero, b, group, torch.bfloat16)  # int_gemm_ref
    got = inductor.grouped_qlinear(xq, xs, qw.q, qw.scale, qw.zero, b, group, torch.bfloat16)
    assert got.shape == (*lead, n) and torch.equal(got, want)


@pytest.mark.parametrize("bits", [4, 8])
def test_zero_point_qlinear_is_bit_exact_with_the_reference(bits):
    g = torch.Generator().manual_seed(5)
    k, n = 160, 24
    qw = N.quantize_weight(torch.randn(n, k, generator=g), bits=bits, sym=False)
    xq, xs = N.quantize_per_token(torch.randn(3, 9, k, generator=g) * 2)
    b = torch.randn(n, generator=g)
    want = N.qlinear(xq, xs, qw.q, qw.scale, qw.zero, b, None, torch.float32)  # int_gemm_ref
    got = inductor.zero_point_qlinear(xq, xs, qw.q, qw.scale, qw.zero, b, torch.float32)
    assert got.shape == (3, 9, n) and torch.equal(got, want)


def test_grouped_int4_weights_unpack_group_major_in_one_kernel():
    """The CPU decomposition of a grouped int4 ``qlinear``: the unpack writes the weight
    group-major (each group's GEMM reads a contiguous ``[N, g]`` block, no strided view of a
    full unpacked weight), bit-exact with the eager op on the same quantized input."""
    import torch._inductor.config as inductor_config

    install()
    g = torch.Generator().manual_seed(4)
    k, n, group = 256, 64, 128
    qw = N.quantize_weight(torch.randn(n, k, generator=g), bits=4, sym=False, group=group)
    wp = pack_int4(qw.q)
    xq, xs = N.quantize_per_token(torch.randn(48, k, generator=g))

    def f(xq, xs, wp, ws, wz):
        return torch.ops.viditq.qlinear(xq, xs, wp, ws, wz, None, 4, group, torch.float32)

    with inductor_config.patch(force_disable_caches=True):
        out, codes = run_and_get_code(torch.compile(f), xq, xs, wp, qw.scale, qw.zero)
    code = "\n".join(codes)
    mms = re.findall(r"extern_kernels\._int_mm\((.*)\)", code)
    assert len(mms) == k // group
    # the weight operand of group j: [g, N] with strides (1, g) at offset j * N * g
    for j, call in enumerate(mms):
        assert f"({group}, {n}), (1, {group}), {j * n * group})" in call, call
    assert torch.equal(out, f(xq, xs, wp, qw.scale, qw.zero))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_smooth", [False, True])
def test_16bit_rotating_quantization_decomposes_and_stays_finite_on_large_rows(dtype, with_smooth):
    """The decomposition is the reference's 16-bit route, per-row power-of-two prescale included: an
    fp16 activation of RMS 600 at K=1152 (whose unprescaled ±1 rotation overflowed) stays finite and
    equals the eager op bit for bit. With smoothing that needs ``emulate_precision_casts``: by
    default Inductor skips the 16-bit rounding of ``smooth.to(x.dtype)`` inside the fused kernel."""
    install()
    k = 1152
    smooth, rot = (torch.rand(k) + 0.5 if with_smooth else None), kron_factors(k)
    x = torch.randn(6, k) * 600.0
    x[0] /= 600.0  # an ordinary row
    x = x.to(dtype)

    def f(x):
        return torch.ops.viditq.quantize_act(x, smooth, rot, None, 8)

    # caches off: the FX graph cache keys on the graph (one opaque op), not on the decomposition
    with torch.no_grad(), torch._inductor.config.patch(force_disable_caches=True,
                                                       emulate_precision_casts=with_smooth):
        (q, s), codes = run_and_get_code(torch.compile(f), x)
        qe, se = f(x)
    assert "torch.ops.viditq" not in "\n".join(codes)
    assert torch.isfinite(s).all() and torch.isfinite(se).all()
    assert torch.equal(q, qe) and torch.equal(s, se)


def test_balance_op_compiles_to_aten():
    install()
    rot = kron_factors(64)
    smooth = torch.rand(64) + 0.5
    lin = torch.nn.Linear(64, 16)

    def f(x):
        return lin(torch.ops.viditq.balance(x, smooth, rot))

    x = torch.randn(4, 64, dtype=torch.bfloat16)
    lin = lin.to(torch.bfloat16)
    with torch.no_grad():
        out, codes = run_and_get_code(torch.compile(f), x)
        torch.testing.assert_close(out, f(x), rtol=2e-2, atol=2e-2)
    assert "torch.ops.viditq" not in "\n".join(codes)


def test_non_cpu_keeps_the_opaque_op_and_warns_once(caplog):
    xq = torch.empty(4, 64, dtype=torch.int8, device="meta")
    args = (xq, torch.empty(4, 1, device="meta"), torch.empty(8, 32, dtype=torch.uint8, device="meta"),
            torch.empty(8, device="meta"), None, None, 4, 0, torch.float32)
    inductor._warned_devices.discard(("qlinear", "meta"))
    with caplog.at_level(logging.WARNING, logger=inductor.__name__):
        assert inductor._qlinear_decomp(*args) is NotImplemented
        assert inductor._qlinear_decomp(*args) is NotImplemented
    assert len([r for r in caplog.records if "viditq.qlinear on meta" in r.getMessage()]) == 1


def test_install_after_a_compile_still_takes_effect(monkeypatch):
    # Inductor memoizes its merged decomposition table at the first compile in the process
    from torch._inductor import decomposition

    install()
    ops = [torch.ops.viditq.qlinear.default, torch.ops.viditq.quantize_act.default,
           torch.ops.viditq.quantize_act_fp8.default, torch.ops.viditq.balance.default,
           torch.ops.viditq.w8a8_linear.default, torch.ops.viditq.qlinear_fused.default]
    for op in ops:
        monkeypatch.delitem(decomposition.decompositions, op)
    monkeypatch.setattr(inductor, "_installed", False)
    decomposition.fast_random_decomps.cache_clear()
    assert torch.ops.viditq.qlinear.default not in decomposition.select_decomp_table()  # a compile ran
    install()
    table = decomposition.select_decomp_table()
    assert all(op in table for op in ops)


class _W8Linear(torch.nn.Module):
    """viditq.quantize_act -> viditq.qlinear (int8 per channel, symmetric) -> + residual."""

    def __init__(self, k=96, n=96, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        qw = N.quantize_weight(torch.randn(n, k, generator=g) / k ** 0.5, bits=8, sym=True)
        self.register_buffer("w_q", qw.q)
        self.register_buffer("w_scale", qw.scale)
        self.register_buffer("bias", torch.randn(n, generator=g).to(dtype))

    def forward(self, x):
        q, s = torch.ops.viditq.quantize_act(x, None, [], None, 8)
        return torch.ops.viditq.qlinear(q, s, self.w_q, self.w_scale, None, self.bias, 8, 0, x.dtype) + x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_qlinear_compiles_to_one_gemm_packed_once(dtype):
    """Per-channel int8 ``qlinear`` on CPU: one extern GEMM, the weight prepacked once over many
    calls; fp32 bit-exact with the eager op (the bare accumulator, then the reference epilogue),
    bf16 within the one extra 16-bit rounding of the product (``numerics.int8_mm``)."""
    install()
    onednn_int8.clear_cache()
    m = _W8Linear(dtype=dtype).eval()
    x = (torch.randn(3, 40, 96) * 2).to(dtype)
    with torch.no_grad():
        eager = m(x)
        compiled = torch.compile(m)
        out, codes = run_and_get_code(compiled, x)
        for _ in range(3):
            out = compiled(x)
    code = "\n".join(codes)
    assert "torch.ops.viditq.qlinear" not in code
    if not onednn_int8.available():
        pytest.skip(f"oneDNN int8 route not here: {onednn_int8.unavailable_reason()}")
    assert len(re.findall(r"torch\.ops\.viditq\.int8_mm\.default\(", code)) == 1
    assert onednn_int8.cached_weights() == 1  # found again on every call, not packed per call
    if dtype == torch.float32:
        torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)  # Inductor may reassociate the residual add
    else:
        # one more bf16 rounding of the product, besides eager's of the linear's output and the sum
        q, s = N.quantize_act(x, None, [], None, 8)
        prod = N.qlinear(q, s, m.w_q, m.w_scale, None, None, None, torch.float32)
        bound = 2 ** -8 * (prod.abs() + x.float().abs() + eager.float().abs() + m.bias.float().abs()) + 1e-6
        assert ((out.float() - eager.float()).abs() <= bound).all()


@pytest.mark.parametrize("lead", [(2, 7), (5,)])
def test_cpu_qlinear_is_bit_exact_in_fp32_and_one_rounding_off_in_bf16(lead):
    g = torch.Generator().manual_seed(8)
    k, n = 128, 48
    qw = N.quantize_weight(torch.randn(n, k, generator=g), bits=8, sym=True)
    xq, xs = N.quantize_per_token(torch.randn(*lead, k, generator=g) * 3)
    b = torch.randn(n, generator=g)
    want = N.qlinear(xq, xs, qw.q, qw.scale, None, b, None, torch.float32)
    got = inductor.cpu_qlinear(xq, xs, qw.q, None, 8, qw.scale, b, torch.float32)
    assert got.shape == (*lead, n) and torch.equal(got, want)
    got16 = inductor.cpu_qlinear(xq, xs, qw.q, None, 8, qw.scale, b.bfloat16(), torch.bfloat16)
    want16 = N.qlinear(xq, xs, qw.q, qw.scale, None, b.bfloat16(), None, torch.bfloat16)
    # the product rounded to bf16 once before the per-token scale (half an ulp of the product);
    # the final cast may then land on the neighbouring bf16 value (one ulp of the output)
    prod = N.qlinear(xq, xs, qw.q, qw.scale, None, None, None, torch.float32)
    bound = 2 ** -9 * prod.abs() + 2 ** -7 * want16.float().abs() + 1e-6
    assert ((got16.float() - want16.float()).abs() <= bound).all()
