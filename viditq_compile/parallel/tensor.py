"""Tensor parallelism of a quantized model in module form (``module_form.QuantizedLinear``), on the
engines that exist: DTensor's ``ColwiseParallel`` for the column-parallel layers (with the
``viditq`` ops' sharding rules, ``parallel.sharding``), and a row-parallel quantized layer with
explicit collectives, ``RowParallelQuantizedLinear``, for the row-parallel ones, which DTensor's
rules cannot express exactly (the per-token scale needs a MAX all-reduce before quantizing, and
bit-exact output needs the int32 partial GEMMs summed before the epilogue).

Which layers are row-parallel: the standard Megatron pairing, the attention out projection and the
MLP down projection of each block (the column-parallel q / k / v and MLP up projection before them
leave the activation sharded along K, so the pair communicates once, an all-reduce of the output).
The pairing is read from a tensor-parallel plan, ``{module-path glob: style}`` with styles
``"colwise"``, ``"rowwise"`` or diffusers' ``PackedColwiseParallel`` / ``PackedRowwiseParallel``:
diffusers models' own ``_tp_plan`` (Flux, Flux2, QwenImage) by default.

Numerics: ``numerics/parallel.py`` (policies ``"global"`` / ``"per_shard"``, partials ``"int32"``
/ ``"fp32"``). Column-parallel layers are bit-exact with one process; row-parallel ones with
``policy="global", partials="int32"`` too; ``"fp32"`` partials up to the fp32 summation order;
``"per_shard"`` is a different quantization (each shard's own per-token scale).

A rotated (Hadamard-balanced) row-parallel layer must have been balanced block-diagonally
(``vq.quantize(..., tensor_parallel=N)`` does it: ``parallel.tp_plan``, ``numerics.parallel.
rotation_factors``), so that each rank's channels are whole blocks and the rank rotates its slice
alone; a full-width rotation does not commute with the K split, and ``check_tensor_parallel``
refuses it. ``resolve_plan`` and ``rank_columns`` live in ``parallel.tp_plan`` (the quantization
pipeline reads them without the module form).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from viditq_compile.module_form import QuantizedLinear
from viditq_compile.numerics import parallel as pnum
from viditq_compile.numerics import quant
from viditq_compile.numerics.packing import unpack_int4
from viditq_compile.parallel.tp_plan import check_row_layer, rank_columns, resolve_plan

log = logging.getLogger(__name__)

__all__ = ["resolve_plan", "check_tensor_parallel", "RowParallelQuantizedLinear", "RowParallelLinear",
           "parallelize", "rank_columns"]


def _k_of(m: nn.Module) -> tuple[int, int]:
    if isinstance(m, QuantizedLinear):
        return m.in_features, m.out_features
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    raise ValueError(f"{type(m).__name__} is not a linear layer")


def check_tensor_parallel(model: nn.Module, shards: int, tp_plan: Mapping[str, Any] | None = None) -> dict:
    """Validate that every layer of the plan splits over ``shards``; returns ``resolve_plan``'s map.

    Column-parallel: N divisible by ``shards`` (with the plan's blocks). Row-parallel: each shard's
    K a multiple of ``numerics.parallel.SHARD_K_MULTIPLE`` and of the weight group
    (``check_row_split``); a rotated quantized layer needs a block-diagonal rotation whose blocks
    keep every shard's channels whole (``_check_rotation``: a full-width Hadamard does not commute
    with the K split). ``ValueError`` naming the first bad layer; nothing is changed."""
    plan = resolve_plan(model, tp_plan)
    for path, (kind, blocks) in plan.items():
        m = model.get_submodule(path)
        k, n = _k_of(m)
        if kind == "colwise":
            rank_columns(n, shards, 0, blocks)  # raises if N does not split
            continue
        group = m.spec["group_size"] if isinstance(m, QuantizedLinear) else None
        check_row_layer(path, k, shards, group or None, blocks)
        if isinstance(m, QuantizedLinear):
            _check_rotation(path, m, shards, blocks)
            if m.spec["number_format"] != "int":
                raise ValueError(f"{path}: row-parallel {m.spec['number_format']} layers are not supported "
                                 f"(integer formats only)")
    return plan


def _check_rotation(path: str, m: QuantizedLinear, shards: int, blocks: Sequence[int] | None) -> int:
    """The diagonal blocks of the rotation of row-parallel ``m`` (1: not rotated); ``ValueError``
    unless each of the ``shards`` ranks holds whole blocks."""
    if not m.spec["rotated"]:
        return 1
    k, have = m.in_features, m.spec.get("rotation_blocks") or 1
    want = pnum.row_rotation_blocks(k, shards, blocks)
    if have == 1:
        raise ValueError(f"{path}: row-parallel layer balanced with a full-width Hadamard rotation "
                         f"(K={k}), which does not commute with a split of K over {shards} shards; "
                         f"quantize it with vq.quantize(..., tensor_parallel={shards}) (a block-diagonal "
                         f"rotation of {want} blocks) or without rotation")
    if have % want:
        raise ValueError(f"{path}: rotation of K={k} in {have} diagonal blocks of {k // have}; a split over "
                         f"{shards} shards needs a multiple of {want} blocks (quantize with "
                         f"tensor_parallel={shards})")
    return have


def _group_info(group) -> tuple[int, int]:
    import torch.distributed as dist

    return dist.get_rank(group), dist.get_world_size(group)


class RowParallelQuantizedLinear(nn.Module):
    """This rank's part of a row-parallel ``QuantizedLinear``: the input channels ``rank_columns``
    of the weight (and of the balancing vector, and of grouped scales / zero points), the
    per-channel scales and the bias whole. Input: this rank's channels of x ``[..., K/n]`` (what
    a column-parallel layer before it leaves); output: the whole ``[..., N]`` on every rank.

    Forward, per rank: balance the slice (fp32; a block-diagonally rotated layer rotates its
    whole blocks, ``rotation_factors(K/n, blocks/n)``); ``policy="global"``: all-reduce (MAX) the per-token
    absmax and quantize with it (the unsharded codes), ``"per_shard"``: quantize with the slice's
    own; static per-tensor scales need neither. Then ``partials="int32"``: all-reduce (SUM) the
    int32 GEMM (and the zero-point row sums), one epilogue (bit-exact with the unsharded op);
    ``"fp32"``: each rank's fp32 output all-reduced, the bias added after. ``numerics.parallel``
    computes every step. Packed int4 weights are held unpacked (int8) here: the CPU reference GEMM
    takes int8, so an int4 row-parallel shard holds K/n bytes a row, not K/2n.
    """

    weight: Tensor
    weight_scale: Tensor
    weight_zero: Tensor | None
    act_vector: Tensor | None
    act_scale: Tensor | None

    def __init__(self, layer: QuantizedLinear, *, group=None, policy: str = "global", partials: str = "int32",
                 blocks: Sequence[int] | None = None):
        super().__init__()
        if not isinstance(layer, QuantizedLinear):
            raise TypeError(f"layer must be a QuantizedLinear, got {type(layer).__name__}")
        if policy not in pnum.ROW_POLICIES:
            raise ValueError(f"policy={policy!r} (supported: {pnum.ROW_POLICIES})")
        if partials not in pnum.PARTIALS:
            raise ValueError(f"partials={partials!r} (supported: {pnum.PARTIALS})")
        s = layer.spec
        if s["number_format"] != "int" or s["spatial"]:
            raise ValueError(f"RowParallelQuantizedLinear takes integer linear layers, got {layer!r}")
        static = layer.act_scale is not None
        if partials == "int32" and policy != "global" and not static:
            raise ValueError("partials='int32' needs policy='global' (per-shard scales put the integer partial "
                             "sums on different grids)")
        group_size = s["group_size"] or None
        if partials == "int32" and group_size:
            raise ValueError(f"partials='int32' needs per-channel weights, the layer has group={group_size}")
        self.group = group
        rank, world = _group_info(group)
        k = layer.in_features
        sizes = [k] if not blocks else [b * (k // sum(blocks)) for b in blocks]
        for size in sizes:
            pnum.check_row_split(size, world, group_size)
        cols = rank_columns(k, world, rank, blocks)
        rot_blocks = _check_rotation(type(self).__name__, layer, world, blocks)
        # this rank's channels are whole blocks of the block-diagonal rotation: it rotates them alone
        local_rot = pnum.rotation_factors(k // world, rot_blocks // world) if s["rotated"] else []
        for i, f in enumerate(local_rot):
            self.register_buffer(f"hadamard_{i}", f.to(layer.weight.device), persistent=False)
        self._n_factors = len(local_rot)
        self.policy, self.partials, self.rank, self.world = policy, partials, rank, world
        self.weight_bits, self.act_bits, self.group_size = s["weight_bits"], s["act_bits"], group_size
        self.in_features, self.out_features = k, layer.out_features
        with torch.no_grad():
            w = unpack_int4(layer.weight) if s["weight_bits"] == 4 else layer.weight
            self.register_buffer("weight", w.index_select(1, cols.to(w.device)).contiguous())

            def per_k(t):
                if t is None or not group_size:
                    return t.clone() if t is not None else None
                gcols = cols.reshape(-1, group_size)[:, 0] // group_size  # this rank's groups
                return t.index_select(1, gcols.to(t.device)).contiguous()

            self.register_buffer("weight_scale", per_k(layer.weight_scale))
            self.register_buffer("weight_zero", per_k(layer.weight_zero))
            vec = layer.act_vector
            self.register_buffer("act_vector", None if vec is None else vec.index_select(0, cols.to(vec.device)))
            self.register_buffer("act_scale", None if layer.act_scale is None else layer.act_scale.clone())
        self.bias = layer.bias

    def forward(self, x: Tensor) -> Tensor:
        import torch.distributed as dist

        kl = self.weight.shape[1]
        if x.shape[-1] != kl:
            raise ValueError(f"RowParallelQuantizedLinear (rank {self.rank}): x has {x.shape[-1]} features, this "
                             f"rank holds K={kl} of {self.in_features}")
        lead = x.shape[:-1]
        rotation = [getattr(self, f"hadamard_{i}") for i in range(self._n_factors)]
        xb = quant.balance_activation(x.reshape(-1, kl), self.act_vector, rotation)
        if self.act_scale is not None:
            q, scale = quant.quantize_per_tensor(xb, self.act_scale, self.act_bits)
        else:
            absmax = None
            if self.policy == "global":
                absmax = xb.abs().amax(dim=-1, keepdim=True)
                dist.all_reduce(absmax, op=dist.ReduceOp.MAX, group=self.group)
            q, scale = pnum.quantize_shard(xb, self.act_bits, absmax)
        part = pnum.shard_partial(q, scale, self.weight, self.weight_scale, self.weight_zero, self.group_size,
                                  self.partials, gemm=quant.int_gemm_fast)
        if self.partials == "int32":
            acc, rowsum = part  # type: ignore[misc]
            dist.all_reduce(acc, group=self.group)
            if rowsum is not None:
                dist.all_reduce(rowsum, group=self.group)
            y = quant.dequantize_epilogue(acc, scale, self.weight_scale, self.weight_zero, rowsum, self.bias,
                                          x.dtype)
        else:
            y = part  # type: ignore[assignment]
            dist.all_reduce(y, group=self.group)  # type: ignore[arg-type]
            if self.bias is not None:
                y = y + self.bias.to(torch.float32)
            y = y.to(x.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (rank {self.rank} of {self.world}), out_features={self.out_features}, "
                f"W{self.weight_bits}A{self.act_bits}, policy={self.policy}, partials={self.partials}")


class RowParallelLinear(nn.Module):
    """This rank's part of a row-parallel floating-point ``nn.Linear`` (a layer the plan kept in
    floating point): its input channels ``rank_columns``, the output all-reduced, the bias after."""

    def __init__(self, layer: nn.Linear, *, group=None, blocks: Sequence[int] | None = None):
        super().__init__()
        rank, world = _group_info(group)
        cols = rank_columns(layer.in_features, world, rank, blocks)
        self.group, self.out_features = group, layer.out_features
        self.weight = nn.Parameter(layer.weight.detach().index_select(1, cols.to(layer.weight.device)).contiguous(),
                                   requires_grad=False)
        self.bias = layer.bias

    def forward(self, x: Tensor) -> Tensor:
        import torch.distributed as dist

        y = torch.nn.functional.linear(x, self.weight).float()
        dist.all_reduce(y, group=self.group)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)


def parallelize(model: nn.Module, mesh, tp_plan: Mapping[str, Any] | None = None, *, policy: str = "global",
                partials: str = "int32") -> dict[str, str]:
    """Shard ``model`` (module form, in place) over the 1-D device ``mesh`` by a tensor-parallel plan
    (default ``model._tp_plan``): column-parallel layers through DTensor's ``ColwiseParallel`` (the
    ``viditq`` ops' sharding rules registered first; the output is left as this rank's local
    channels), row-parallel ones replaced by ``RowParallelQuantizedLinear`` (``policy``,
    ``partials``) or ``RowParallelLinear`` (layers kept in floating point). Validated first
    (``check_tensor_parallel``); returns module path -> what it became. The model's attention must
    take the head count from the local width (diffusers' processors do, ``unflatten(-1, (-1, head_dim))``).
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from viditq_compile.parallel import sharding

    if getattr(mesh, "ndim", None) != 1:
        raise ValueError(f"mesh must be a 1-D DeviceMesh, got {mesh!r}")
    plan = check_tensor_parallel(model, mesh.size(), tp_plan)
    sharding.register()
    group = mesh.get_group()
    done: dict[str, str] = {}
    for path, (kind, blocks) in plan.items():
        m = model.get_submodule(path)
        if kind == "colwise":
            if blocks:
                raise ValueError(f"{path}: packed column-parallel layers are not supported yet")
            parallelize_module(m, mesh, ColwiseParallel())
            done[path] = "colwise"
            continue
        new: nn.Module
        if isinstance(m, QuantizedLinear):
            new = RowParallelQuantizedLinear(m, group=group, policy=policy, partials=partials, blocks=blocks)
        else:
            new = RowParallelLinear(m, group=group, blocks=blocks)  # type: ignore[arg-type]
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
        done[path] = type(new).__name__
    log.info("tensor parallel over %d ranks: %d column-parallel, %d row-parallel layers", mesh.size(),
             sum(v == "colwise" for v in done.values()), sum(v != "colwise" for v in done.values()))
    return done
