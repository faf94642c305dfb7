"""``viditq.qlinear_timestep``: range selection, per-version numerics, mixed batches, checks,
export round trip, and an opaque Inductor call that serves every timestep from one graph."""

import io

import pytest
import torch

import viditq_compile  # noqa: F401
from viditq_compile.numerics import quant as N
from viditq_compile.numerics.hadamard import kron_factors
from viditq_compile.numerics.packing import pack_int4

OP = torch.ops.viditq.qlinear_timestep.default

BOUNDS = [300.0, 700.0]
VERSIONS = [(8, 8, True), (4, 8, False), (4, 4, True)]  # (weight_bits, act_bits, weight_sym) per range


def _layer(k=64, n=24, group=None, versions=VERSIONS, smooth=True, rotate=True, seed=0):
    """Operands of one timestep-dispatching layer and its versions' unpacked weights."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) + 0.2
    qws = [N.quantize_weight(w, bits=b, sym=sym, group=group) for b, _, sym in versions]
    return dict(
        smooth=torch.rand(k, generator=g) + 0.5 if smooth else None,
        rotation=kron_factors(k) if rotate else [],
        w_q=[pack_int4(q.q) if q.bits == 4 else q.q for q in qws],
        w_scale=[q.scale for q in qws],
        w_zero=[q.zero for q in qws],
        bias=torch.randn(n, generator=g),
        weight_bits=[v[0] for v in versions],
        act_bits=[v[1] for v in versions],
        group_size=group or 0,
    ), qws


def _call(x, t, ops, bounds=BOUNDS, out_dtype=torch.float32):
    return OP(x, ops["smooth"], ops["rotation"], t, bounds, ops["w_q"], ops["w_scale"], ops["w_zero"],
              ops["bias"], ops["weight_bits"], ops["act_bits"], ops["group_size"], out_dtype)


def _version(x, i, ops, qws, out_dtype=torch.float32):
    """The reference: ``quantize_act`` + ``qlinear`` of version i on the int32 reference GEMM."""
    xq, xs = N.quantize_act(x, ops["smooth"], ops["rotation"], None, ops["act_bits"][i])
    return N.qlinear(xq, xs, qws[i].q, qws[i].scale, qws[i].zero, ops["bias"], qws[i].group, out_dtype,
                     gemm=N.int_gemm_ref)


def test_timestep_range_counts_the_bounds_strictly_below():
    t = torch.tensor([0, 299, 300, 301, 700, 701, 999])
    assert N.timestep_range(t, BOUNDS).tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert N.timestep_range(t.float() + 0.5, BOUNDS).tolist() == [0, 0, 1, 1, 2, 2, 2]
    assert N.timestep_range(torch.tensor(300.0), BOUNDS).shape == ()
    assert N.timestep_range(torch.tensor(300.0), BOUNDS).item() == 0
    assert N.timestep_range(t, []).tolist() == [0] * 7
    from viditq_compile.config.plan import Plan

    plan = Plan("x", timestep_bounds=tuple(BOUNDS))
    assert [plan.range_of(v) for v in t.tolist()] == N.timestep_range(t, BOUNDS).tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [None, 32])
@pytest.mark.parametrize("smooth,rotate", [(False, False), (True, True)])
def test_each_range_runs_its_version_bit_exactly(dtype, group, smooth, rotate):
    ops, qws = _layer(group=group, smooth=smooth, rotate=rotate)
    x = torch.randn(3, 5, 64).to(dtype)
    for t, i in [(0, 0), (300, 0), (301, 1), (700, 1), (999, 2)]:
        for ts in (torch.tensor(t), torch.full((3,), t), torch.full((3,), float(t))):
            out = _call(x, ts, ops, out_dtype=dtype)
            assert out.dtype == dtype and out.shape == (3, 5, 24)
            assert torch.equal(out, _version(x, i, ops, qws, dtype)), (t, i, ts.dtype)


def test_uniform_timestep_runs_on_any_leading_shape():
    """All entries in one range: the batch layout of x does not matter (e.g. frames x batch)."""
    ops, qws = _layer()
    x = torch.randn(6, 64)
    assert torch.equal(_call(x, torch.tensor([800, 900]), ops), _version(x, 2, ops, qws))


def test_mixed_batch_routes_each_row_to_its_range():
    ops, qws = _layer()
    x = torch.randn(4, 5, 64)
    t = torch.tensor([999, 10, 500, 20])
    out = _call(x, t, ops)
    ranges = N.timestep_range(t, BOUNDS)
    for i in range(3):
        rows = (ranges == i).nonzero().squeeze(1)
        assert torch.equal(out[rows], _version(x[rows], i, ops, qws)), i
    # per-token quantization reads one row at a time: without balancing GEMMs the rows equal
    # the version run on the whole batch
    ops, qws = _layer(smooth=False, rotate=False)
    out = _call(x, t, ops)
    for b, i in enumerate(ranges.tolist()):
        assert torch.equal(out[b], _version(x, i, ops, qws)[b])


def test_mixed_batch_needs_x_batched_like_the_timestep():
    ops, _ = _layer()
    with pytest.raises(ValueError, match=r"timestep \(2,\) spans 2 ranges.*x is \(6, 64\).*B=2"):
        _call(torch.randn(6, 64), torch.tensor([10, 900]), ops)
    with pytest.raises(ValueError, match=r"x is \(64,\)"):
        _call(torch.randn(64), torch.tensor([10, 900]), ops)


def test_opcheck():
    ops, _ = _layer(group=32)
    for x, t in [(torch.randn(2, 3, 64), torch.tensor([10, 900])), (torch.randn(4, 64), torch.tensor(400.0)),
                 (torch.randn(2, 3, 64).bfloat16(), torch.tensor([500, 500]))]:
        torch.library.opcheck(OP, (x, ops["smooth"], ops["rotation"], t, BOUNDS, ops["w_q"], ops["w_scale"],
                                   ops["w_zero"], ops["bias"], ops["weight_bits"], ops["act_bits"], 32,
                                   torch.bfloat16))
    ops, _ = _layer(versions=[(8, 8, True), (8, 4, True)], smooth=False, rotate=False)
    torch.library.opcheck(OP, (torch.randn(2, 64), None, [], torch.tensor([1, 2]), [1.5], ops["w_q"], ops["w_scale"],
                               ops["w_zero"], None, [8, 8], [8, 4], 0, torch.float32))


def test_rejects_bad_operands():
    ops, _ = _layer(group=32)
    x, t = torch.randn(2, 64), torch.tensor([1, 2])

    def args(**over):
        a = dict(x=x, smooth=ops["smooth"], rotation=ops["rotation"], timestep=t, bounds=BOUNDS, w_q=ops["w_q"],
                 w_scale=ops["w_scale"], w_zero=ops["w_zero"], bias=ops["bias"],
                 weight_bits=ops["weight_bits"], act_bits=ops["act_bits"], group_size=32,
                 out_dtype=torch.float32)
        a.update(over)
        return tuple(a.values())

    w_q = list(ops["w_q"])
    cases = [
        (args(x=x.int()), "x must"),
        (args(smooth=torch.rand(32)), "smooth"),
        (args(timestep=torch.ones(2, 2)), r"timestep must be a real 0-d or \[B\]"),
        (args(timestep=torch.tensor([True])), "timestep must"),
        (args(bounds=[700.0, 300.0]), "strictly ascending"),
        (args(bounds=[float("nan"), 300.0]), "strictly ascending"),
        (args(w_q=w_q[:2]), r"w_q has 2 entries; 2 bounds make 3 timestep ranges"),
        (args(w_zero=ops["w_zero"] + [None]), "w_zero has 4 entries"),
        (args(act_bits=[8, 8]), "act_bits has 2 entries"),
        (args(act_bits=[8, 3, 8]), r"version 1\): act_bits=3"),
        (args(weight_bits=[8, 8, 4]), r"version 1\): w_q for 8-bit"),
        (args(w_q=[w_q[0], w_q[1], w_q[2][:8]]), r"version 2\): w_scale must be fp32 \(8, 2\)"),
        (args(group_size=48), r"version 0\): group_size=48"),
        (args(bias=torch.randn(3)), "bias"),
        (args(out_dtype=torch.int8), "out_dtype"),
    ]
    for a, match in cases:
        with pytest.raises(ValueError, match=match):
            OP(*a)
            pytest.fail(f"accepted operands that should fail with {match!r}")


class _TimestepLinear(torch.nn.Module):
    """LayerNorm -> qlinear_timestep (W8 below t=500, W4 above) -> GELU, weights as buffers."""

    def __init__(self, k=64, n=16, group=32):
        super().__init__()
        ops, _ = _layer(k, n, group, versions=[(8, 8, True), (4, 8, False)])
        self.r = list(ops["rotation"])
        for name, t in [("smooth", ops["smooth"]), ("r0", self.r[0]), ("r1", self.r[1]), ("bias", ops["bias"]),
                        ("w8", ops["w_q"][0]), ("s8", ops["w_scale"][0]), ("w4", ops["w_q"][1]),
                        ("s4", ops["w_scale"][1]), ("z4", ops["w_zero"][1])]:
            self.register_buffer(name, t)
        self.group = group

    def forward(self, x, timestep):
        h = torch.nn.functional.layer_norm(x, x.shape[-1:])
        y = OP(h, self.smooth, [self.r0, self.r1], timestep, [500.0], [self.w8, self.w4], [self.s8, self.s4],
               [None, self.z4], self.bias, [8, 4], [8, 8], self.group, torch.float32)
        return torch.nn.functional.gelu(y)


def test_survives_export_save_load_and_the_pt2_check(tmp_path):
    from viditq_compile.io.safe_pt2 import check_pt2

    m = _TimestepLinear().eval()
    x = torch.randn(2, 5, 64)
    ep = torch.export.export(m, (x, torch.tensor([10, 900])))
    torch.export.save(ep, tmp_path / "p.pt2")
    check_pt2(tmp_path / "p.pt2")
    loaded = torch.export.load(tmp_path / "p.pt2")
    node = next(n for n in loaded.graph.nodes if n.target == OP)
    assert node.args[4] == [500.0] and node.args[7][0] is None and node.args[12] == torch.float32
    for t in ([10, 10], [900, 900], [10, 900]):
        assert torch.equal(loaded.module()(x, torch.tensor(t)), m(x, torch.tensor(t))), t
    buf = io.BytesIO()
    torch.export.save(loaded, buf)  # and saves again


def test_inductor_calls_the_op_opaquely_and_never_recompiles_for_a_timestep():
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    from viditq_compile.lowering import inductor

    inductor.install()
    m = _TimestepLinear().eval()
    x = torch.randn(2, 5, 64)
    compiled = torch.compile(m)
    counters.clear()
    _, code = run_and_get_code(compiled, x, torch.tensor([10, 10]))
    calls = [line for line in code[0].splitlines() if "torch.ops.viditq.qlinear_timestep.default(" in line]
    assert len(calls) == 1  # one extern call, the version choice is inside it
    outs = {}
    for t in (10, 499, 500, 501, 999):
        ts = torch.full((2,), t)
        outs[t] = compiled(x, ts)
        torch.testing.assert_close(outs[t], m(x, ts), rtol=1e-5, atol=1e-5)  # LayerNorm/GELU fused
    assert counters["stats"]["unique_graphs"] == 1
    assert torch.equal(outs[10], outs[500])  # same range, same version
    assert not torch.allclose(outs[500], outs[501], rtol=1e-3)  # W8 -> W4 at the boundary
    mixed = compiled(x, torch.tensor([10, 999]))
    assert torch.equal(mixed[0], outs[10][0]) and torch.equal(mixed[1], outs[999][1])
    assert counters["stats"]["unique_graphs"] == 1
