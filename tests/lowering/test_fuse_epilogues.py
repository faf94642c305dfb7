"""The CUDA compile route, run on the CPU: ``viditq.qlinear_fused`` and the ``fuse_epilogues`` pass.

On CUDA the GEMM is our Triton kernel, which also runs the dequantizing epilogue; Inductor keeps it
opaque and fuses the activation quantization into the kernel that produces the activation. The
route is chosen by device type (``inductor.GEMM_KERNEL_DEVICES``); adding ``"cpu"`` runs the same
graphs here on the ops' CPU implementations, so the rewrite and Inductor's generated code around it
are checked without a GPU.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import viditq_compile as vq
from tests.zoo import build_pixart, build_stdit3_block
from viditq_compile.lowering import inductor
from viditq_compile.lowering.fuse_epilogues import fuse_epilogues
from viditq_compile.numerics import quant as numerics
from viditq_compile.numerics.packing import pack_int4
from viditq_compile.ops import schema

QLINEAR_FUSED = torch.ops.viditq.qlinear_fused.default


def _operands(lead=(2, 9), k=64, n=32, bits=4, group=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g)
    qw = numerics.quantize_weight(torch.randn(n, k, generator=g), bits=bits, sym=False, group=group)
    xq, xs = numerics.quantize_act(x, None, [], None, 8)
    w = pack_int4(qw.q) if bits == 4 else qw.q
    return xq, xs, w, qw, torch.randn(n, generator=g)


# ---- the op -----------------------------------------------------------------------------------

@pytest.mark.parametrize("activation", ["none", "gelu_tanh", "silu"])
@pytest.mark.parametrize("gate_shape", [None, (32,), (2, 1, 32), (2, 9, 32)])
def test_qlinear_fused_is_qlinear_then_the_epilogue_in_fp32(activation, gate_shape):
    xq, xs, w, qw, bias = _operands()
    gate = torch.randn(gate_shape) if gate_shape else None
    residual = torch.randn(2, 9, 32)
    got = torch.ops.viditq.qlinear_fused(xq, xs, w, qw.scale, qw.zero, bias, 4, 32, torch.bfloat16,
                                         activation, gate, residual, False)
    y = numerics.qlinear(xq, xs, qw.q, qw.scale, qw.zero, bias, 32, torch.float32)
    assert torch.equal(got, numerics.epilogue(y, activation, gate, residual).to(torch.bfloat16))


def test_qlinear_fused_reads_packed_4bit_activations():
    xq, xs, w, qw, bias = _operands()
    xq4 = xq.clamp(-8, 7)
    plain = torch.ops.viditq.qlinear_fused(xq4, xs, w, qw.scale, qw.zero, bias, 4, 32, torch.float32,
                                           "none", None, None, False)
    packed = torch.ops.viditq.qlinear_fused(pack_int4(xq4), xs, w, qw.scale, qw.zero, bias, 4, 32,
                                            torch.float32, "none", None, None, True)
    assert torch.equal(plain, packed)


@pytest.mark.parametrize("change,match", [
    (dict(activation="relu"), "activation='relu' is not supported"),
    (dict(gate=torch.ones(2, 9, 1)), "gate of shape"),
    (dict(gate=torch.ones(9, 32)), "gate of shape"),
    (dict(gate=torch.ones(32, dtype=torch.int32)), "gate must be a float"),
    (dict(residual=torch.ones(2, 32)), "residual must be a float tensor of the output's shape"),
    (dict(packed_act=True), "packed_act=True needs xq as packed int4"),
])
def test_qlinear_fused_refuses_bad_operands(change, match):
    xq, xs, w, qw, bias = _operands()
    args = dict(activation="none", gate=None, residual=None, packed_act=False) | change
    with pytest.raises(ValueError, match=match):
        torch.ops.viditq.qlinear_fused(xq, xs, w, qw.scale, qw.zero, bias, 4, 32, torch.float32,
                                       args["activation"], args["gate"], args["residual"], args["packed_act"])


def test_epilogue_gate_rows():
    assert numerics.epilogue_gate_rows((2, 9, 32), (32,)) == 18
    assert numerics.epilogue_gate_rows((2, 9, 32), (2, 1, 32)) == 9
    assert numerics.epilogue_gate_rows((2, 9, 32), (1, 1, 32)) == 18
    assert numerics.epilogue_gate_rows((2, 9, 32), (2, 9, 32)) == 1
    for bad in [(9, 32), (2, 9, 1), (1, 9, 32), (2, 9, 16), (3, 2, 9, 32)]:
        with pytest.raises(ValueError):
            numerics.epilogue_gate_rows((2, 9, 32), bad)


# ---- the pass on exported programs (ATen spellings) ------------------------------------------

@pytest.mark.parametrize("builder,recipe,want", [
    # per block: gelu into fc1; gate + residual after self-attention and the MLP; the cross-attention
    # has no gate (PixArt), so only its residual; eval dropout and `/ rescale_output_factor` (1.0)
    # are skipped over
    (build_pixart, "w8a8", dict(w8a8_split=20, qlinear=20, gelu_tanh=2, gate=4, residual=6, transparent=10)),
    (build_pixart, "w4a8", dict(qlinear=20, gelu_tanh=2, gate=4, residual=6, transparent=10)),
    # STDiT3: spatial + temporal blocks; gated attention/MLP outputs, ungated cross-attention
    (build_stdit3_block, "w4a8", dict(qlinear=14, gelu_tanh=2, gate=2, residual=4)),
])
def test_pass_folds_dit_block_tails_and_keeps_the_numbers(builder, recipe, want):
    model, kwargs = builder()
    qm = vq.quantize(model.eval(), (), kwargs, recipe=recipe)
    gm = qm.program.module()
    with torch.no_grad():
        before = gm(**kwargs)
        done = fuse_epilogues(gm, {"cpu"})
        after = gm(**kwargs)
    assert dict(done) == want
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.viditq.qlinear.default not in targets and torch.ops.viditq.w8a8_linear.default not in targets
    assert targets.count(QLINEAR_FUSED) == want["qlinear"]
    first = before[0] if isinstance(before, (tuple, list)) else before
    second = after[0] if isinstance(after, (tuple, list)) else after
    # fp32 model: the fused fp32 epilogue does the unfused ops' arithmetic
    torch.testing.assert_close(second, first, rtol=1e-5, atol=1e-5)


def test_pass_leaves_other_devices_alone():
    model, kwargs = build_pixart()
    gm = vq.quantize(model.eval(), (), kwargs, recipe="w8a8").program.module()
    code = gm.code
    assert not fuse_epilogues(gm)  # default: CUDA only, and this graph is on the CPU
    assert gm.code == code


class _Tail(torch.nn.Module):
    """qlinear -> tail ops, with knobs for the cases the pass must not fold."""

    def __init__(self, gate_dtype=torch.float32, gate_shape=(2, 1, 32), extra_user=False, act_bits=8):
        super().__init__()
        xq, xs, w, qw, bias = _operands()
        for name, t in [("w", w), ("ws", qw.scale), ("wz", qw.zero), ("bias", bias),
                        ("gate", torch.randn(gate_shape).to(gate_dtype))]:
            self.register_buffer(name, t)
        self.extra_user, self.act_bits = extra_user, act_bits

    def forward(self, x, res):
        q, s = torch.ops.viditq.quantize_act(x, None, [], None, self.act_bits)
        y = torch.ops.viditq.qlinear(q, s, self.w, self.ws, self.wz, self.bias, 4, 32, x.dtype)
        h = torch.nn.functional.silu(y)
        out = h * self.gate + res
        return (out, h) if self.extra_user else out


def _exported(module, x, res):
    return torch.export.export(module, (x, res)).module()


def test_pass_folds_silu_gate_residual_and_packs_4bit_activations():
    x, res = torch.randn(2, 9, 64), torch.randn(2, 9, 32)
    m = _Tail(act_bits=4)
    gm = _exported(m, x, res)
    done = fuse_epilogues(gm, {"cpu"})
    assert dict(done) == dict(qlinear=1, silu=1, gate=1, residual=1, packed_act=1)
    (fused,) = [n for n in gm.graph.nodes if n.target is QLINEAR_FUSED]
    activation, gate, residual, packed = fused.args[9:]
    assert activation == "silu" and packed is True
    assert gate.name == "gate" and residual.name == "res"
    assert fused.args[0].meta["val"].dtype == torch.uint8  # packed two per byte
    torch.testing.assert_close(gm(x, res), m(x, res), rtol=1e-5, atol=1e-5)


def _as_keywords(node, keep: int = 1) -> None:
    """Rewrite a call of a ``viditq`` op to pass all but its first ``keep`` arguments by name."""
    spec = schema.of(node.target)
    bound = spec.node_args(node)
    node.args, node.kwargs = tuple(bound[n] for n in spec.names[:keep]), {n: bound[n] for n in spec.names[keep:]}


def test_pass_folds_calls_made_with_keyword_arguments():
    """The pass reads the ops' arguments by name (``ops.schema``): a ``qlinear`` / ``quantize_act``
    whose arguments come as keywords is fused like a positional one."""
    x, res = torch.randn(2, 9, 64), torch.randn(2, 9, 32)
    m = _Tail(act_bits=4)
    gm = _exported(m, x, res)
    for node in gm.graph.nodes:
        if schema.QLINEAR.calls(node):
            _as_keywords(node, keep=2)
        elif schema.QUANTIZE_ACT.calls(node):
            _as_keywords(node, keep=0)
    gm.recompile()
    assert any(n.kwargs for n in gm.graph.nodes if schema.QLINEAR.calls(n))
    done = fuse_epilogues(gm, {"cpu"})
    assert dict(done) == dict(qlinear=1, silu=1, gate=1, residual=1, packed_act=1)
    (fused,) = [n for n in gm.graph.nodes if n.target is QLINEAR_FUSED]
    args = schema.QLINEAR_FUSED.node_args(fused)
    assert (args["activation"], args["packed_act"], args["weight_bits"], args["group_size"]) == ("silu", True, 4, 32)
    torch.testing.assert_close(gm(x, res), m(x, res), rtol=1e-5, atol=1e-5)


class _KeywordTail(_Tail):
    def forward(self, x, res):
        q, s = torch.ops.viditq.quantize_act(x, smooth=None, rotation=[], static_scale=None, act_bits=self.act_bits)
        y = torch.ops.viditq.qlinear(q, s, w_q=self.w, w_scale=self.ws, w_zero=self.wz, bias=self.bias,
                                     weight_bits=4, group_size=32, out_dtype=x.dtype)
        return torch.nn.functional.silu(y) * self.gate + res


@pytest.mark.parametrize("knobs,want", [
    (dict(gate_dtype=torch.float64), dict(qlinear=1, silu=1)),  # the mul would promote the dtype
    (dict(gate_shape=(2, 9, 1)), dict(qlinear=1, silu=1)),      # the gate broadcasts along N
    (dict(extra_user=True), dict(qlinear=1, silu=1)),           # silu's output is needed as well
])
def test_pass_stops_where_folding_would_change_the_result(knobs, want):
    x, res = torch.randn(2, 9, 64), torch.randn(2, 9, 32)
    m = _Tail(**knobs)
    gm = _exported(m, x, res)
    assert dict(fuse_epilogues(gm, {"cpu"})) == want
    got, ref = gm(x, res), m(x, res)
    for a, b in zip(got if knobs.get("extra_user") else [got], ref if knobs.get("extra_user") else [ref]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_pass_refuses_a_non_graph_module():
    with pytest.raises(TypeError, match="GraphModule"):
        fuse_epilogues(torch.nn.Linear(2, 2))


# ---- the whole route through the backend, pinned by Inductor's generated code ------------------

def test_cuda_route_on_cpu_generated_code(monkeypatch):
    """What the CUDA route compiles to (here on the CPU implementations of the same ops): the
    activation quantization is part of the LayerNorm/modulate kernel, each GEMM is one opaque
    ``qlinear_fused`` call that also applies bias, GELU, gate and residual, and no generated kernel
    touches a GEMM output for dequantization (no kernel carries the decomposed qlinear's ops)."""
    monkeypatch.setattr(inductor, "GEMM_KERNEL_DEVICES", frozenset({"cuda", "cpu"}))
    model, kwargs = build_pixart()
    model.eval()
    with torch.no_grad():
        ref = model(**kwargs)[0]
        out, codes = run_and_get_code(torch.compile(model, backend="viditq"), **kwargs)
    code = "\n".join(codes)
    from viditq_compile.backend import last_report

    quantized = last_report().num_quantized
    assert quantized == 20
    calls = re.findall(r"torch\.ops\.viditq\.(\w+)\.default\(", code)
    # q/k/v of each block and the caption's k/v of both blocks share GEMMs (passes.fuse_qkv):
    # 10 of the 20 layers in 3 GEMMs
    assert set(calls) == {"qlinear_fused"} and len(calls) == quantized - 10 + 3
    assert "_int_mm" not in code  # the GEMM is the kernel, not an ATen int8 matmul
    kernels = set(re.findall(r"(cpp_fused_\w+) = ", code))
    assert any("native_layer_norm" in k and "quantize_act" in k for k in kernels), kernels
    assert not any("qlinear" in k for k in kernels), kernels
    assert numerics.sqnr_db(ref, out[0]) > 35


class _RotatedQuant(torch.nn.Module):
    def __init__(self, k=256, n=32):
        super().__init__()
        from viditq_compile.numerics.hadamard import kron_factors

        self.rot = kron_factors(k)  # 16 x 16: the Triton kernel holds this rotation in registers
        qw = numerics.quantize_weight(torch.randn(n, k), bits=8, sym=True)
        self.register_buffer("w", qw.q)
        self.register_buffer("ws", qw.scale)

    def forward(self, x):
        h = torch.nn.functional.layer_norm(x, x.shape[-1:])
        q, s = torch.ops.viditq.quantize_act(h, None, self.rot, None, 8)
        return torch.ops.viditq.qlinear(q, s, self.w, self.ws, None, None, 8, 0, x.dtype)


@pytest.mark.parametrize("dtype,opaque", [(torch.bfloat16, True), (torch.float32, False)])
def test_cuda_route_keeps_a_rotating_quantization_as_one_kernel(monkeypatch, dtype, opaque):
    """16-bit activations: the rotation happens in the quantization kernel's registers, so the op
    stays one call (decomposed, the rotation would be two extern GEMMs); fp32 decomposes."""
    monkeypatch.setattr(inductor, "GEMM_KERNEL_DEVICES", frozenset({"cuda", "cpu"}))
    inductor.install()
    m = _RotatedQuant()
    x = torch.randn(2, 8, 256, dtype=dtype)
    with torch.no_grad():
        out, codes = run_and_get_code(torch.compile(m), x)
    code = "\n".join(codes)
    assert ("torch.ops.viditq.quantize_act.default(" in code) == opaque
    assert "torch.ops.viditq.qlinear.default(" in code
    torch.testing.assert_close(out.float(), m(x).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("tail", [_Tail, _KeywordTail])
def test_cuda_route_through_the_backend_on_ops_written_by_hand(monkeypatch, tail):
    """Dynamo records ``torch.ops.viditq.qlinear(...)`` in user code as the op packet (with the
    keywords as written, for ``_KeywordTail``); the pass takes it as well. W4A4: the 4-bit values
    are packed inside the quantizing kernel, and the GEMM call gets them packed, with SiLU, gate and
    residual folded in."""
    monkeypatch.setattr(inductor, "GEMM_KERNEL_DEVICES", frozenset({"cuda", "cpu"}))
    m = tail(act_bits=4)
    x, res = torch.randn(2, 9, 64), torch.randn(2, 9, 32)
    with torch.no_grad():
        out, codes = run_and_get_code(torch.compile(m, backend="viditq"), x, res)
    code = "\n".join(codes)
    (call,) = re.findall(r"torch\.ops\.viditq\.(\w+)\.default\(([^\n]*)\)", code)
    args = [a.strip() for a in call[1].split(",")]
    assert call[0] == "qlinear_fused" and len(args) == 13
    assert args[9] == "'silu'" and "None" not in (args[10], args[11]) and args[12] == "True"
    (kernel,) = re.findall(r"(cpp_fused_\w+) = ", code)  # quantize + pack, one kernel; no epilogue kernel
    assert "quantize_act" in kernel and "bitwise_or" in kernel
    torch.testing.assert_close(out, m(x, res), rtol=1e-6, atol=1e-6)
