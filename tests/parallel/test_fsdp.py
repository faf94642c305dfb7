"""FSDP2 over a quantized model in module form (``viditq_compile.parallel.fsdp``), on 2 CPU ranks.

Specification: ``fully_shard`` shards the int8 (and packed int4) weights of ``QuantizedLinear``
layers as they are (``requires_grad=False`` Parameters): each rank holds half the rows, and the
forward, which all-gathers them, is bit-exact with the unsharded model. Their scales are buffers,
which it leaves whole on every rank, until ``fsdp.prepare`` makes them Parameters: then they are
sharded too, the output is still bit-exact, and the state dict keeps its keys."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import viditq_compile as vq
from tests.parallel import ranks
from viditq_compile import module_form as mf
from viditq_compile.parallel import fsdp


def _model(recipe):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(approximate="tanh"), nn.Linear(128, 64))
    x = torch.randn(2, 8, 64)
    mf.quantize_modules(model, (x,), recipe=recipe)
    return model, x


def _local_rows(t):
    return (t.to_local() if hasattr(t, "to_local") else t).shape[0]


def _fsdp_worker(rank, world, out_dir, recipe, prepared):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model, x = _model(recipe)
    with torch.no_grad():
        ref = model(x)
    if prepared:
        fsdp.prepare(model)
    mesh = init_device_mesh("cpu", (world,))
    for m in mf.quantized_linears(model).values():
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    layers = list(mf.quantized_linears(model).values())
    weight_half = all(_local_rows(m.weight) * world == m.weight.shape[0] for m in layers)
    int_weights = all(m.weight.dtype in (torch.int8, torch.uint8) for m in layers)
    scale_half = all(_local_rows(m.weight_scale) * world == m.weight_scale.shape[0] for m in layers)
    with torch.no_grad():
        y = model(x)
    ranks.save(out_dir, rank, exact=torch.equal(y, ref), weight_half=weight_half, int_weights=int_weights,
               scale_half=scale_half)


@pytest.mark.parametrize("recipe", ["w8a8", "w4a8-dynamic"])
def test_fully_shard_shards_the_integer_weights_and_prepare_the_scales(recipe):
    for prepared in (False, True):
        for r, res in enumerate(ranks.run(_fsdp_worker, recipe, prepared, timeout=120)):
            assert res["exact"] and res["weight_half"] and res["int_weights"], (recipe, prepared, r, res)
            assert res["scale_half"] == prepared, (recipe, prepared, r, res)


def test_prepare_keeps_the_state_dict_and_the_numbers():
    model, x = _model("w4a8-dynamic")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(x)
    n = fsdp.prepare(model)
    assert n == 2 * 2  # weight_scale and weight_zero of two asymmetric int4 layers
    assert fsdp.prepare(model) == 0
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert isinstance(model[0].weight_scale, nn.Parameter) and not model[0].weight_scale.requires_grad
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    fresh, _ = _model("w4a8-dynamic")
    fsdp.prepare(fresh)
    fresh.load_state_dict(before)


def test_prepare_refuses_the_program_form_and_models_with_nothing_quantized():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    x = torch.randn(2, 8, 64)
    qm = vq.quantize(copy.deepcopy(model), (x,), recipe="w8a8")
    with pytest.raises(TypeError, match="module_form.to_modules"):
        fsdp.prepare(qm)
    with pytest.raises(ValueError, match="has no QuantizedLinear"):
        fsdp.prepare(model)
