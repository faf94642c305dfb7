"""The DTensor sharding rules of the ``viditq`` ops (``viditq_compile.parallel.sharding``), on 2 CPU
ranks (gloo).

Specification: with the rules registered, every op runs on DTensor operands; token-parallel (rows
of x sharded) and column-parallel (output channels sharded) results are bit-exact with the op on
plain tensors in one process; ``qlinear`` with x split along K (x_scale the global per-token
scale) returns a ``Partial`` sum equal to it up to fp32 rounding; the ops that quantize per token
never split K under the default ``"global"`` policy (DTensor gathers x: bit-exact); under
``"per_shard"`` ``w8a8_linear`` splits K and computes ``numerics.parallel``'s per-shard quantization.
Registration happens only when asked: importing ``viditq_compile`` registers nothing."""

from __future__ import annotations

import subprocess
import sys

import torch

from tests.parallel import ranks
from viditq_compile.numerics import parallel as pnum
from viditq_compile.numerics import quant
from viditq_compile.numerics.packing import pack_int4


def _operands():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 64, generator=g)
    x[..., 3] *= 20  # an outlier channel, in the first K half
    w = torch.randn(32, 64, generator=g)
    qw = quant.quantize_weight(w, 8, sym=False)
    q4 = quant.quantize_weight(w, 4, sym=False, group=16)
    bias = torch.randn(32, generator=g)
    return x, qw, q4, bias


def _close(a, b, ref):
    return (a - b).abs().max().item() <= 1e-5 * ref.abs().max().item()


def _ops_worker(rank, world, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    from viditq_compile.parallel import sharding

    assert sharding.registered() == {}
    sharding.register()
    mesh = init_device_mesh("cpu", (world,))
    ops = torch.ops.viditq
    x, qw, q4, bias = _operands()
    R = Replicate()

    def d(t, p):
        return None if t is None else distribute_tensor(t, mesh, [p])

    res: dict = {}
    # w8a8_linear: token, column, and K-split x (gathered: exact)
    ref = ops.w8a8_linear(x, qw.q, qw.scale, qw.zero, bias, 8)
    y = ops.w8a8_linear(d(x, Shard(1)), d(qw.q, R), d(qw.scale, R), d(qw.zero, R), d(bias, R), 8)
    res["w8a8_token"] = (y.placements == (Shard(1),), torch.equal(y.full_tensor(), ref))
    y = ops.w8a8_linear(d(x, R), d(qw.q, Shard(0)), d(qw.scale, Shard(0)), d(qw.zero, Shard(0)), d(bias, Shard(0)), 8)
    res["w8a8_column"] = (y.placements == (Shard(2),) and y.to_local().shape[-1] == 32 // world,
                          torch.equal(y.full_tensor(), ref))
    y = ops.w8a8_linear(d(x, Shard(2)), d(qw.q, Shard(1)), d(qw.scale, R), d(qw.zero, R), d(bias, R), 8)
    res["w8a8_row_global"] = (not isinstance(y.placements[0], Partial), torch.equal(y.full_tensor(), ref))

    # quantize_act / balance / quantize_act_fp8: token-local
    smooth = torch.rand(64, generator=torch.Generator().manual_seed(1)) + 0.5
    q, s = quant.quantize_act(x, smooth, [], None, 8)
    qd, sd = ops.quantize_act(d(x, Shard(0)), d(smooth, R), [], None, 8)
    res["quantize_act_token"] = (qd.placements == (Shard(0),),
                                 torch.equal(qd.full_tensor(), q) & torch.equal(sd.full_tensor(), s))
    from viditq_compile.numerics.hadamard import kron_factors
    rot = kron_factors(64)
    qr, sr = ops.quantize_act(x, smooth, rot, None, 8)
    qd, sd = ops.quantize_act(d(x, Shard(1)), d(smooth, R), [d(f, R) for f in rot], None, 8)
    res["quantize_act_rotated_token"] = (True, torch.equal(qd.full_tensor(), qr) & torch.equal(sd.full_tensor(), sr))
    st = torch.tensor(0.05)
    qs, ss = ops.quantize_act(x, smooth, [], st, 8)
    qd, sd = ops.quantize_act(d(x, Shard(2)), d(smooth, R), [], d(st, R), 8)
    res["quantize_act_static_row"] = (qd.placements == (Shard(2),),
                                      torch.equal(qd.full_tensor(), qs) & torch.equal(sd.full_tensor(), ss))
    b = ops.balance(x, smooth, [])
    bd = ops.balance(d(x, Shard(2)), d(smooth, R), [])
    res["balance_row"] = (bd.placements == (Shard(2),), torch.equal(bd.full_tensor(), b))
    f8, f8s = ops.quantize_act_fp8(x, smooth, [])
    fd, fds = ops.quantize_act_fp8(d(x, Shard(0)), d(smooth, R), [])
    # gloo gathers no float8: compare each rank's local rows
    res["quantize_act_fp8_token"] = (fd.placements == (Shard(0),),
                                     torch.equal(fd.to_local().view(torch.uint8),
                                                 f8.chunk(world)[rank].view(torch.uint8))
                                     & torch.equal(fds.full_tensor(), f8s))

    # qlinear: token, column, row (Partial, fp32 rounding), int4 grouped row
    xq, xs = quant.quantize_act(x, None, [], None, 8)
    ref = ops.qlinear(xq, xs, qw.q, qw.scale, qw.zero, bias, 8, 0, torch.float32)
    y = ops.qlinear(d(xq, Shard(0)), d(xs, Shard(0)), d(qw.q, R), d(qw.scale, R), d(qw.zero, R), d(bias, R), 8, 0,
                    torch.float32)
    res["qlinear_token"] = (y.placements == (Shard(0),), torch.equal(y.full_tensor(), ref))
    y = ops.qlinear(d(xq, R), d(xs, R), d(qw.q, Shard(0)), d(qw.scale, Shard(0)), d(qw.zero, Shard(0)),
                    d(bias, Shard(0)), 8, 0, torch.float32)
    res["qlinear_column"] = (y.placements == (Shard(2),), torch.equal(y.full_tensor(), ref))
    y = ops.qlinear(d(xq, Shard(2)), d(xs, R), d(qw.q, Shard(1)), d(qw.scale, R), d(qw.zero, R), d(bias, R), 8, 0,
                    torch.float32)
    full = y.full_tensor()
    res["qlinear_row"] = (isinstance(y.placements[0], Partial), _close(full, ref, ref))
    p4 = pack_int4(q4.q)
    ref4 = ops.qlinear(xq, xs, p4, q4.scale, q4.zero, bias, 4, 16, torch.float32)
    y = ops.qlinear(d(xq, Shard(2)), d(xs, R), d(p4, Shard(1)), d(q4.scale, Shard(1)), d(q4.zero, Shard(1)),
                    d(bias, R), 4, 16, torch.float32)
    res["qlinear_int4_row"] = (isinstance(y.placements[0], Partial), _close(y.full_tensor(), ref4, ref4))

    # qlinear_fused: token and column, with an adaLN gate [B, 1, N] and a residual
    g = torch.Generator().manual_seed(3)
    gate = torch.randn(4, 1, 32, generator=g)
    resid = torch.randn(4, 6, 32, generator=g)
    ref = ops.qlinear_fused(xq, xs, qw.q, qw.scale, qw.zero, bias, 8, 0, torch.float32, "gelu_tanh", gate, resid,
                            False)
    y = ops.qlinear_fused(d(xq, Shard(1)), d(xs, Shard(1)), d(qw.q, R), d(qw.scale, R), d(qw.zero, R), d(bias, R),
                          8, 0, torch.float32, "gelu_tanh", d(gate, R), d(resid, Shard(1)), False)
    res["qlinear_fused_token"] = (y.placements == (Shard(1),), torch.equal(y.full_tensor(), ref))
    y = ops.qlinear_fused(d(xq, R), d(xs, R), d(qw.q, Shard(0)), d(qw.scale, Shard(0)), d(qw.zero, Shard(0)),
                          d(bias, Shard(0)), 8, 0, torch.float32, "gelu_tanh", d(gate, Shard(2)), d(resid, Shard(2)),
                          False)
    res["qlinear_fused_column"] = (y.placements == (Shard(2),), torch.equal(y.full_tensor(), ref))

    # qlinear_timestep: two versions (W8 asymmetric, W4 symmetric: a None zero point), one per batch row
    qs4 = quant.quantize_weight(torch.randn(32, 64, generator=torch.Generator().manual_seed(2)), 4, sym=True, group=16)
    ts = torch.tensor([900.0, 100.0, 800.0, 50.0])
    args = dict(bounds=[500.0], weight_bits=[8, 8], act_bits=[8, 8], group_size=0, out_dtype=torch.float32)
    args4 = dict(args, group_size=16)
    wq = [qw.q, pack_int4(qs4.q)]
    ref = ops.qlinear_timestep(x, smooth, [], ts, w_q=[qw.q, qw.q], w_scale=[qw.scale, qw.scale],
                               w_zero=[qw.zero, None], bias=bias, **args)
    y = ops.qlinear_timestep(d(x, Shard(0)), d(smooth, R), [], d(ts, Shard(0)), w_q=[d(qw.q, R), d(qw.q, R)],
                             w_scale=[d(qw.scale, R), d(qw.scale, R)], w_zero=[d(qw.zero, R), None],
                             bias=d(bias, R), **args)
    res["qlinear_timestep_token"] = (y.placements == (Shard(0),), torch.equal(y.full_tensor(), ref))
    ref = ops.qlinear_timestep(x, smooth, [], ts, w_q=[pack_int4(q4.q), wq[1]],
                               w_scale=[q4.scale, qs4.scale], w_zero=[q4.zero, None], bias=bias,
                               **dict(args4, weight_bits=[4, 4]))
    y = ops.qlinear_timestep(d(x, R), d(smooth, R), [], d(ts, R),
                             w_q=[d(pack_int4(q4.q), Shard(0)), d(wq[1], Shard(0))],
                             w_scale=[d(q4.scale, Shard(0)), d(qs4.scale, Shard(0))],
                             w_zero=[d(q4.zero, Shard(0)), None],
                             bias=d(bias, Shard(0)), **dict(args4, weight_bits=[4, 4]))
    res["qlinear_timestep_column"] = (y.placements == (Shard(2),), torch.equal(y.full_tensor(), ref))
    assert isinstance(y, DTensor)

    ranks.save(out_dir, rank, **{k: torch.tensor(v) for k, v in res.items()})


def _per_shard_worker(rank, world, out_dir):
    import pytest
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor

    from viditq_compile.parallel import sharding

    sharding.register(row_policy="per_shard")
    with pytest.raises(RuntimeError, match="one policy per process"):
        sharding.register(row_policy="global")
    mesh = init_device_mesh("cpu", (world,))
    x, qw, _, bias = _operands()
    R = Replicate()

    def d(t, p):
        return distribute_tensor(t, mesh, [p])

    y = torch.ops.viditq.w8a8_linear(d(x, Shard(2)), d(qw.q, Shard(1)), d(qw.scale, R), d(qw.zero, R), d(bias, R), 8)
    full = y.full_tensor()
    ps = pnum.row_parallel_qlinear(x, world, qw.q, qw.scale, qw.zero, bias, policy="per_shard")
    glob = torch.ops.viditq.w8a8_linear(x, qw.q, qw.scale, qw.zero, bias, 8)
    fp = x @ qw.dequantize().T + bias
    ranks.save(out_dir, rank, partial=isinstance(y.placements[0], Partial), close=_close(full, ps, ps),
               differs=not torch.equal(full, glob), sqnr_shard=quant.sqnr_db(fp, full),
               sqnr_glob=quant.sqnr_db(fp, glob))


def test_per_shard_policy_splits_w8a8_linear_along_k_with_per_shard_scales():
    """Each shard quantizes its 32 channels with its own per-token scale: not the unsharded codes (the
    outlier channel sits in shard 0 only, so shard 1 gets a finer grid)."""
    for res in ranks.run(_per_shard_worker, timeout=120):
        assert res["partial"] and res["close"] and res["differs"], res
        assert res["sqnr_shard"] > res["sqnr_glob"], res


def test_every_op_runs_token_column_and_row_sharded_with_the_unsharded_numbers():
    out = ranks.run(_ops_worker, timeout=120)
    for r, res in enumerate(out):
        bad = {k: v.tolist() for k, v in res.items() if not v.all()}
        assert not bad, f"rank {r}: (placement as expected, values as expected) failed for {bad}"
        assert len(res) == 16


def test_importing_the_package_registers_no_sharding_rule():
    code = ("import viditq_compile, torch; from viditq_compile.parallel import sharding; "
            "from torch.distributed.tensor import DTensor; "
            "reg = DTensor._op_dispatcher.sharding_propagator.op_strategy_funcs; "
            "assert torch.ops.viditq.qlinear.default not in reg, 'registered at import'; "
            "assert sharding.registered() == {}")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_register_refuses_an_unknown_policy():
    import pytest

    from viditq_compile.parallel import sharding

    with pytest.raises(ValueError, match="row_policy='mean'"):
        sharding.register(row_policy="mean")
