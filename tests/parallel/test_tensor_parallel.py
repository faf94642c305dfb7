"""Tensor parallelism of quantized models in module form (``viditq_compile.parallel.tensor``), on 2
CPU ranks (gloo).

Specification: a row-parallel quantized layer with policy ``"global"`` and int32 partial sums is
bit-exact with the unsharded layer, with fp32 partials within fp32 rounding of it, with
``"per_shard"`` equal (to fp32 rounding) to ``numerics.parallel``'s per-shard reference; a
column-parallel quantized layer (DTensor ``ColwiseParallel`` + the ops' sharding rules) is
bit-exact and holds half the int8 rows on each rank. A tiny Flux quantized W8A8 and sharded by
diffusers' own ``_tp_plan`` computes what it computes in one process, bit for bit, both with the
explicit row-parallel layers (``parallelize``) and with DTensor alone (diffusers' styles through
``parallelize_module``), and stays above 50 dB against floating point. Plans the kernels cannot
split are refused before anything changes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests import zoo
from tests.parallel import ranks
from viditq_compile import module_form as mf
from viditq_compile.numerics import parallel as pnum
from viditq_compile.numerics import quant
from viditq_compile.numerics.packing import unpack_int4
from viditq_compile.parallel import tensor as tp


def _mlp(hidden=128, seed=0):
    torch.manual_seed(seed)  # every rank builds the same model
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, 64))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.distributions.StudentT(4.0).sample(p.shape) * 0.05)
    x = torch.randn(2, 12, 64, generator=g)
    x[..., 7] *= 30
    return model, x


def _layer_worker(rank, world, out_dir, recipe):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from viditq_compile.parallel import sharding

    model, x = _mlp()
    mf.quantize_modules(model, (x,), recipe=recipe)
    up, down = model[0], model[2]
    h = model[1](up(x))
    ref = down(h)
    mesh = init_device_mesh("cpu", (world,))
    group = mesh.get_group()
    cols = tp.rank_columns(h.shape[-1], world, rank)
    h_local = h.index_select(-1, cols)
    res = {}
    for policy, partials in (("global", "int32"), ("global", "fp32"), ("per_shard", "fp32")):
        if partials == "int32" and down.spec["group_size"]:
            continue
        row = tp.RowParallelQuantizedLinear(down, group=group, policy=policy, partials=partials)
        y = row(h_local)
        if policy == "global" and partials == "int32":
            res["row_int32_exact"] = torch.equal(y, ref)
        elif policy == "global":
            res["row_fp32_close"] = bool((y - ref).abs().max() <= 1e-5 * ref.abs().max())
        else:
            s = down.spec
            wq = down.weight if s["weight_bits"] == 8 else unpack_int4(down.weight)
            ps = pnum.row_parallel_qlinear(h, world, wq, down.weight_scale, down.weight_zero, down.bias,
                                           group=s["group_size"] or None, smooth=down.act_vector, policy="per_shard")
            res["row_per_shard_is_the_reference"] = bool((y - ps).abs().max() <= 1e-5 * ps.abs().max())
            res["row_per_shard_differs"] = not torch.equal(y, ref)
        res["row_holds_half_k"] = row.weight.shape[1] == h.shape[-1] // world
    sharding.register()
    col = copy.deepcopy(up)
    parallelize_module(col, mesh, ColwiseParallel(use_local_output=False))
    yc = col(x)
    res["column_exact"] = torch.equal(yc.full_tensor(), up(x))
    res["column_holds_half_n"] = col.weight.to_local().shape[0] == up.out_features // world
    ranks.save(out_dir, rank, **{k: torch.tensor(v) for k, v in res.items()})


@pytest.mark.parametrize("recipe", ["w8a8", "w4a8-dynamic"])
def test_row_and_column_parallel_quantized_layers_match_one_process(recipe):
    for r, res in enumerate(ranks.run(_layer_worker, recipe, timeout=120)):
        bad = [k for k, v in res.items() if not bool(v)]
        assert res and not bad, f"rank {r} ({recipe}): {bad}"


def _flux_worker(rank, world, out_dir):
    from diffusers.hooks.tensor_parallel import _resolve_tp_plan, _styles
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from viditq_compile.parallel import sharding

    model, kwargs = zoo.build_flux(seed=0)
    with torch.no_grad():
        fp = model(**kwargs)[0]
    packed = {p: m._tp_packed_row_blocks for p, m in model.named_modules() if hasattr(m, "_tp_packed_row_blocks")}
    mf.quantize_modules(model, (), kwargs, recipe="w8a8")
    for p, blocks in packed.items():  # the QuantizedLinear that replaced the layer does not carry it
        model.get_submodule(p)._tp_packed_row_blocks = blocks
    with torch.no_grad():
        one = model(**kwargs)[0]
    mesh = init_device_mesh("cpu", (world,))
    explicit = copy.deepcopy(model)
    done = tp.parallelize(explicit, mesh)
    with torch.no_grad():
        y = explicit(**kwargs)[0]
    rows = [p for p, v in done.items() if v == "RowParallelQuantizedLinear"]
    # DTensor alone: diffusers' styles, the viditq ops' sharding rules
    sharding.register()
    dt = copy.deepcopy(model)
    for sub, rel in _resolve_tp_plan(dt, dt._tp_plan):
        parallelize_module(sub, mesh, _styles(rel))
    with torch.no_grad():
        y_dt = dt(**kwargs)[0]
    q = dt.transformer_blocks[0].attn.to_q
    ranks.save(out_dir, rank, explicit_exact=torch.equal(y, one), dtensor_exact=torch.equal(y_dt, one),
               sqnr=quant.sqnr_db(fp, y), sqnr_one=quant.sqnr_db(fp, one), rows=len(rows), layers=len(done),
               quantized=isinstance(q, mf.QuantizedLinear), half_rows=q.weight.to_local().shape[0] * world == 64)


def test_tiny_flux_quantized_and_sharded_by_its_tp_plan_matches_one_process():
    out = ranks.run(_flux_worker, timeout=120)
    for r, res in enumerate(out):
        assert res["explicit_exact"] and res["dtensor_exact"], (r, res)
        assert res["sqnr"] >= 50.0 and res["sqnr"] == res["sqnr_one"], (r, res)
        # row-parallel: 2 double blocks x (to_out, to_add_out, ff, ff_context) + 2 single x proj_out;
        # all: 2 x 12 + 2 x 5 plan entries
        assert res["rows"] == 10 and res["layers"] == 34, (r, res)
        assert res["quantized"] and res["half_rows"], (r, res)


def test_plans_the_shards_cannot_take_are_refused_before_anything_changes():
    model, x = _mlp(hidden=48)
    mf.quantize_modules(model, (x,), recipe="w8a8")
    plan = {"0": "colwise", "2": "rowwise"}
    with pytest.raises(ValueError, match=r"^2: each of the 2 row-parallel shards would hold K=24, not a "
                                         r"multiple of 16"):
        tp.check_tensor_parallel(model, 2, plan)
    assert isinstance(model[2], mf.QuantizedLinear)
    with pytest.raises(ValueError, match="matches no module"):
        tp.check_tensor_parallel(model, 2, {"blocks.*.ff": "rowwise"})
    with pytest.raises(ValueError, match="no tensor-parallel plan"):
        tp.check_tensor_parallel(model, 2)
    with pytest.raises(ValueError, match="style 'diagonal'"):
        tp.check_tensor_parallel(model, 2, {"0": "diagonal"})


def test_a_row_parallel_layer_with_a_full_width_rotation_is_refused():
    model, x = _mlp()
    mf.quantize_modules(model, (x,), recipe="w8a8-rotate")
    assert model[2].spec["rotated"]
    with pytest.raises(ValueError, match="full-width Hadamard rotation .* does not commute"):
        tp.check_tensor_parallel(model, 2, {"0": "colwise", "2": "rowwise"})


def test_the_package_holds_the_flux_plan_of_diffusers():
    """The tests above depend on diffusers' Flux plan (0.42.1) pairing the layers the Megatron way."""
    model, _ = zoo.build_flux(seed=0)
    plan = tp.resolve_plan(model)
    assert plan["transformer_blocks.0.attn.to_out.0"] == ("rowwise", None)
    assert plan["transformer_blocks.0.ff.net.2"] == ("rowwise", None)
    assert plan["single_transformer_blocks.1.proj_out"] == ("rowwise", [64, 256])
    assert plan["transformer_blocks.1.attn.to_q"] == ("colwise", None)


def _compiled_flux_worker(rank, world, out_dir, route):
    from torch.distributed.device_mesh import init_device_mesh

    model, kwargs = zoo.build_flux(seed=0)
    packed = {p: m._tp_packed_row_blocks for p, m in model.named_modules() if hasattr(m, "_tp_packed_row_blocks")}
    mf.quantize_modules(model, (), kwargs, recipe="w8a8")
    for p, blocks in packed.items():
        model.get_submodule(p)._tp_packed_row_blocks = blocks
    one = torch.compile(copy.deepcopy(model), backend="viditq", options={"recipe": "fp"})
    with torch.no_grad():
        ref = one(**kwargs)[0]
    mesh = init_device_mesh("cpu", (world,))
    if route == "explicit":
        tp.parallelize(model, mesh)
    else:
        from diffusers.hooks.tensor_parallel import _resolve_tp_plan, _styles
        from torch.distributed.tensor.parallel import parallelize_module

        from viditq_compile.parallel import sharding

        sharding.register()
        for sub, rel in _resolve_tp_plan(model, model._tp_plan):
            parallelize_module(sub, mesh, _styles(rel))
    compiled = torch.compile(model, backend="viditq", options={"recipe": "fp"})
    with torch.no_grad():
        y = compiled(**kwargs)[0]
    ranks.save(out_dir, rank, exact=torch.equal(y, ref))


@pytest.mark.slow
@pytest.mark.parametrize("route", ["explicit", "dtensor"])
def test_compiled_sharded_flux_matches_the_compiled_model_in_one_process(route):
    """torch.compile with the viditq backend over the sharded module form (about 40-60 s on 2 cores)."""
    for r, res in enumerate(ranks.run(_compiled_flux_worker, route, timeout=400)):
        assert res["exact"], (route, r)
