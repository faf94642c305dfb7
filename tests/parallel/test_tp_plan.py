"""Quantizing for tensor parallelism: ``vq.quantize(model, ..., tensor_parallel=N)`` and its module
form (``viditq_compile.parallel.tp_plan``).

Specification: a rotating row-parallel layer is rotated block-diagonally, one block of
``H(K / N)`` per shard (a packed layer one per shard per stream), column-parallel and unrotated
layers are unchanged; the module form built this way passes ``check_tensor_parallel`` and, sharded
over 2 gloo ranks (``parallelize``), computes what it computes in one process, bit for bit
(policy ``"global"``, int32 partials), a tiny Flux by its own ``_tp_plan`` included. The plan
records the treatment and the rotation's measured cost (the SQNR the layer alone reaches on the
example call), the report prints both, and both survive a plan file. A split the kernels cannot
take (shard K not a multiple of 16 or of the weight group), a bad ``tensor_parallel``, a plan
rotated for another split and a ``tp_plan`` without ``tensor_parallel`` are refused, naming the
layer and the numbers."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

import viditq_compile as vq
from tests import zoo
from tests.parallel import ranks
from viditq_compile import module_form as mf
from viditq_compile.config.plan import Plan
from viditq_compile.numerics import quant
from viditq_compile.parallel import tensor as tp
from viditq_compile.parallel import tp_plan

PLAN = {"0": "colwise", "2": "rowwise"}


def _mlp(k=64, hidden=128, seed=0):
    torch.manual_seed(seed)  # every rank builds the same model
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(k, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, k))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.distributions.StudentT(4.0).sample(p.shape) * 0.05)
    x = torch.randn(2, 12, k, generator=g)
    x[..., 7] *= 30
    return model, x


def _mlp_worker(rank, world, out_dir, recipe):
    from torch.distributed.device_mesh import init_device_mesh

    model, x = _mlp()
    calib = [((x,), {})]
    mf.quantize_modules(model, (x,), recipe=recipe, calibration=calib, tensor_parallel=world, tp_plan=PLAN)
    with torch.no_grad():
        one = model(x)
    tp.check_tensor_parallel(model, world, PLAN)
    done = tp.parallelize(model, init_device_mesh("cpu", (world,)), PLAN)
    with torch.no_grad():
        y = model(x)
    ranks.save(out_dir, rank, exact=torch.equal(y, one), row=done["2"] == "RowParallelQuantizedLinear",
               local_factors=[int(f.shape[0]) for f in model[2]._buffers.values()
                              if f is not None and f.dim() == 2 and f.dtype == torch.float32])


@pytest.mark.parametrize("recipe", ["w8a8-rotate", "w8a8-viditq", "w4a8-rotate"])
def test_a_block_diagonally_rotated_mlp_shards_over_2_ranks_bit_exact(recipe):
    for r, res in enumerate(ranks.run(_mlp_worker, recipe, timeout=120)):
        assert res["exact"] and res["row"], (recipe, r, res)
        # each rank rotates its 64 channels alone: kron_factors(64), no identity block
        assert res["local_factors"] == [8, 8], (recipe, r, res)


def test_row_parallel_rotating_layers_get_one_block_per_shard_and_the_rest_is_unchanged():
    model, x = _mlp()
    one = vq.quantize(copy.deepcopy(model), (x,), recipe="w8a8-rotate")
    two = vq.quantize(copy.deepcopy(model), (x,), recipe="w8a8-rotate", tensor_parallel=2, tp_plan=PLAN)
    assert one.plan.layers["2"].rotation_blocks is None
    assert two.plan.layers["2"].rotation_blocks == 2
    assert two.plan.layers["0"] == one.plan.layers["0"]  # column-parallel: nothing changes
    rec = two.plan.tensor_parallel
    assert rec["shards"] == 2 and rec["layers"]["0"]["style"] == "colwise" and rec["layers"]["2"]["style"] == "rowwise"
    assert not torch.equal(one(x), two(x))  # another rotation, another rounding
    fp = model(x)
    assert quant.sqnr_db(fp, two(x)) > quant.sqnr_db(fp, one(x)) - 3.0
    # an unrotated recipe: the split is checked and recorded, no rotation blocks
    plain = vq.quantize(copy.deepcopy(model), (x,), recipe="w8a8", tensor_parallel=2, tp_plan=PLAN)
    assert plain.plan.layers["2"].rotation_blocks is None
    assert torch.equal(plain(x), vq.quantize(copy.deepcopy(model), (x,), recipe="w8a8")(x))
    assert "row-parallel (K split" in str(plain.report)


def test_the_recorded_cost_is_the_sqnr_the_layer_alone_reaches_and_the_report_prints_it():
    """A one-layer model: the layer's input is the example input, so the block-diagonal SQNR
    the plan records is the program's own SQNR against floating point."""
    torch.manual_seed(3)
    layer = nn.Linear(128, 48)
    with torch.no_grad():
        layer.weight.copy_(torch.distributions.StudentT(4.0).sample(layer.weight.shape) * 0.05)
    model = nn.Sequential(layer)
    x = torch.randn(4, 40, 128)
    x[..., 5] *= 40
    qm = vq.quantize(model, (x,), recipe="w8a8-rotate", tensor_parallel=2, tp_plan={"0": "rowwise"})
    e = qm.plan.tensor_parallel["layers"]["0"]
    assert e["sqnr_block_db"] == pytest.approx(quant.sqnr_db(model(x), qm(x)), abs=0.01)
    full = vq.quantize(model, (x,), recipe="w8a8-rotate")
    assert e["sqnr_full_db"] == pytest.approx(quant.sqnr_db(model(x), full(x)), abs=0.01)
    text = str(qm.report)
    assert "TP 2: row-parallel, rotation 2 x H(64) instead of H(128)" in text
    assert f"SQNR {e['sqnr_block_db']:.2f} dB vs {e['sqnr_full_db']:.2f} dB full-width" in text


def test_the_plan_file_keeps_the_blocks_and_the_record_and_reapplies(tmp_path):
    model, x = _mlp()
    qm = vq.quantize(copy.deepcopy(model), (x,), recipe="w8a8-rotate", tensor_parallel=2, tp_plan=PLAN)
    qm.plan.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded.layers == qm.plan.layers and loaded.tensor_parallel == qm.plan.tensor_parallel
    again = vq.quantize(copy.deepcopy(model), (x,), plan=loaded)
    assert torch.equal(again(x), qm(x))
    assert again.plan.tensor_parallel == qm.plan.tensor_parallel  # the record and its report notes
    assert "TP 2: row-parallel" in str(again.report)
    same = vq.quantize(copy.deepcopy(model), (x,), plan=loaded, tensor_parallel=2, tp_plan=PLAN)
    assert torch.equal(same(x), qm(x)) and same.plan.layers == qm.plan.layers
    with pytest.raises(ValueError, match=r"^2: the plan rotates K=128 in 2 blocks, which do not keep each of "
                                         r"the 4 shards' channels whole \(needs a multiple of 4 blocks\)"):
        vq.quantize(copy.deepcopy(model), (x,), plan=loaded, tensor_parallel=4, tp_plan=PLAN)
    # a plan without rotation blocks reads as before (the key is left out)
    plain = vq.quantize(copy.deepcopy(model), (x,), recipe="w8a8-rotate").plan.to_dict()
    assert "tensor_parallel" not in plain and all("rotation_blocks" not in row for row in plain["layers"])
    bad = qm.plan.to_dict()
    bad["tensor_parallel"]["layers"]["2"]["rotation_blocks"] = 4
    with pytest.raises(ValueError, match=r"rotation_blocks=4 but the layer has 2"):
        Plan.from_dict(bad)


def test_splits_the_kernels_cannot_take_are_refused_naming_the_layer_and_the_numbers():
    model, x = _mlp(hidden=48)
    with pytest.raises(ValueError, match=r"^2: each of the 2 row-parallel shards would hold K=24, not a "
                                         r"multiple of 16 \(K=48\)"):
        vq.quantize(model, (x,), recipe="w8a8-rotate", tensor_parallel=2, tp_plan=PLAN)
    model, x = _mlp()
    qm = vq.quantize(copy.deepcopy(model), (x,), recipe="w4a8-rotate")
    grouped = replace(qm.plan, layers={**qm.plan.layers, "2": replace(qm.plan.layers["2"], weight_group=128)})
    with pytest.raises(ValueError, match=r"^2: each of the 2 row-parallel shards would hold K=64, not a "
                                         r"multiple of the weight group 128 \(K=128\)"):
        vq.quantize(copy.deepcopy(model), (x,), plan=grouped, tensor_parallel=2, tp_plan=PLAN)
    with pytest.raises(ValueError, match="does not split over 3 shards"):
        vq.quantize(copy.deepcopy(model), (x,), recipe="w8a8", tensor_parallel=3, tp_plan=PLAN)


@pytest.mark.parametrize("bad", [0, -2, 1.5, "2", True, None])
def test_tensor_parallel_must_be_an_int_of_at_least_one(bad):
    model, x = _mlp()
    with pytest.raises(ValueError, match=r"tensor_parallel must be an int >= 1 .* got "):
        vq.quantize(model, (x,), tensor_parallel=bad)


def test_a_tp_plan_without_tensor_parallel_and_a_model_without_a_plan_are_refused():
    model, x = _mlp()
    with pytest.raises(ValueError, match="tp_plan is given but tensor_parallel=1"):
        vq.quantize(model, (x,), tp_plan=PLAN)
    with pytest.raises(ValueError, match="no tensor-parallel plan"):
        vq.quantize(model, (x,), tensor_parallel=2)
    assert tp_plan.TensorParallel.of(model, 1) is None


def test_a_full_width_rotation_is_still_refused_by_check_tensor_parallel():
    model, x = _mlp()
    mf.quantize_modules(model, (x,), recipe="w8a8-rotate")
    with pytest.raises(ValueError, match=r"full-width Hadamard rotation .* tensor_parallel=2"):
        tp.check_tensor_parallel(model, 2, PLAN)


def _flux_worker(rank, world, out_dir):
    from torch.distributed.device_mesh import init_device_mesh

    model, kwargs = zoo.build_flux(seed=0)
    with torch.no_grad():
        fp = model(**kwargs)[0]
    report = mf.quantize_modules(model, (), kwargs, recipe="w8a8-rotate", tensor_parallel=world)
    with torch.no_grad():
        one = model(**kwargs)[0]
    proj = model.single_transformer_blocks[0].proj_out
    tp.check_tensor_parallel(model, world)
    done = tp.parallelize(model, init_device_mesh("cpu", (world,)))
    with torch.no_grad():
        y = model(**kwargs)[0]
    notes = [r.note for r in report.rows if "TP 2: row-parallel, rotation" in r.note]
    ranks.save(out_dir, rank, exact=torch.equal(y, one), sqnr=quant.sqnr_db(fp, one),
               rows=sum(v == "RowParallelQuantizedLinear" for v in done.values()), notes=len(notes),
               proj_blocks=proj.spec["rotation_blocks"], proj_k=proj.in_features)


@pytest.mark.slow
def test_tiny_flux_rotated_for_2_ranks_by_its_tp_plan_shards_bit_exact():
    """Packed ``proj_out`` (attention and MLP streams, 1:4): 5 blocks per rank (about 70 s on 2 cores)."""
    for r, res in enumerate(ranks.run(_flux_worker, timeout=180)):
        assert res["exact"], (r, res)
        assert res["rows"] == 10 and res["notes"] == 10, (r, res)
        assert res["proj_blocks"] == 10 and res["proj_k"] % 10 == 0, (r, res)
        assert res["sqnr"] >= 30.0, (r, res)


@pytest.mark.slow
def test_a_tp_artifact_saves_loads_and_its_module_form_passes_the_check(tmp_path):
    """The program (tiny PixArt, the Megatron pairing given as tp_plan) keeps its block-diagonal
    rotations and its record through vq.save / vq.load, and to_modules of the loaded program is
    what check_tensor_parallel accepts (about 25 s on 2 cores)."""
    model, kwargs = zoo.build_pixart(seed=0)
    plan = {f"transformer_blocks.*.{a}.{p}": "colwise" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v")}
    plan.update({f"transformer_blocks.*.{p}": "rowwise" for p in ("attn1.to_out.0", "attn2.to_out.0", "ff.net.2")})
    qm = vq.quantize(copy.deepcopy(model), (), kwargs, recipe="w8a8-rotate", tensor_parallel=2, tp_plan=plan)
    rows = [n for n, e in qm.plan.tensor_parallel["layers"].items() if e["style"] == "rowwise"]
    assert len(rows) == 6 and all(qm.plan.layers[n].rotation_blocks == 2 for n in rows)
    qm.save(tmp_path / "a")
    loaded = vq.load(tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(loaded(**kwargs)[0], qm(**kwargs)[0])
    assert loaded.plan.tensor_parallel == qm.plan.tensor_parallel
    mods = copy.deepcopy(model)
    mf.to_modules(mods, loaded)
    tp.check_tensor_parallel(mods, 2, plan)
    assert all(mods.get_submodule(n).spec["rotation_blocks"] == 2 for n in rows)


def test_the_rotation_blocks_keep_every_shard_whole_and_bad_ones_are_refused_by_the_plan():
    from viditq_compile.config.plan import LayerPlan, PlanError
    from viditq_compile.numerics import parallel as pnum

    assert pnum.row_rotation_blocks(1152, 2) == 2
    assert pnum.row_rotation_blocks(4608, 4) == 4
    assert pnum.row_rotation_blocks(15360, 2, [1, 4]) == 10  # Flux proj_out: 3072 + 12288, 1536 wide
    assert [f.shape[0] for f in pnum.rotation_factors(1152, 2)] == [2, 36, 16]
    assert [f.shape[0] for f in pnum.rotation_factors(1152, None)] == [36, 32]
    with pytest.raises(ValueError, match="does not split over 3 shards"):
        pnum.row_rotation_blocks(1152, 3, [1, 4])
    base = dict(name="blocks.0.ff.net.2", in_features=128, out_features=64, weight_bits=8, act_bits=8,
                balance="rotate", rotation_seed=0)
    LayerPlan(**base, rotation_blocks=2).validate()
    for bad, match in [(dict(rotation_blocks=3), "rotation_blocks=3 does not divide in_features=128"),
                       (dict(rotation_blocks=1), r"rotation_blocks=1 must be an int >= 2"),
                       (dict(rotation_blocks=2, balance=None, rotation_seed=None), "the layer does not rotate")]:
        with pytest.raises(PlanError, match=match):
            LayerPlan(**{**base, **bad}).validate()


def test_row_parallel_e4m3_layers_are_refused_naming_the_layer():
    model, x = _mlp()
    with pytest.raises(ValueError, match=r"^2: row-parallel e4m3 layers are not supported"):
        vq.quantize(model, (x,), recipe="w8a8-fp8", tensor_parallel=2, tp_plan=PLAN)


def _named_mlp():
    from collections import OrderedDict

    m, x = _mlp()
    return nn.Sequential(OrderedDict(zip(["up", "act", "down"], m))), x


def test_the_module_form_layout_carries_the_rotation_blocks_and_refuses_bad_ones():
    model, x = _named_mlp()
    mf.quantize_modules(model, (x,), recipe="w8a8-rotate", tensor_parallel=2,
                        tp_plan={"up": "colwise", "down": "rowwise"})
    lay = mf.layout(model)
    assert lay["layers"]["down"]["rotation_blocks"] == 2 and "rotation_blocks" not in lay["layers"]["up"]
    fresh, _ = _named_mlp()
    assert mf.from_layout(fresh, lay) == 2
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), model(x))
    for bad, match in [(3, "rotation_blocks=3 needs a rotated layer whose in_features=128 it divides"),
                       ("2", "rotation_blocks='2' is not an integer")]:
        spec = {**lay["layers"]["down"], "rotation_blocks": bad}
        with pytest.raises(mf.LayoutError, match=match):
            mf.from_layout(_named_mlp()[0], {"version": lay["version"], "layers": {"down": spec}})
