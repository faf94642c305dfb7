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
(``numerics.parallel.block_diagonal_factors``): a full-width rotation does not commute with the K
split, and ``check_tensor_parallel`` refuses it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from viditq_compile.module_form import QuantizedLinear
from viditq_compile.numerics import parallel as pnum
from viditq_compile.numerics import quant
from viditq_compile.numerics.packing import unpack_int4

log = logging.getLogger(__name__)

__all__ = ["resolve_plan", "check_tensor_parallel", "RowParallelQuantizedLinear", "RowParallelLinear",
           "parallelize", "rank_columns"]


def _style_name(style: Any) -> tuple[str, list[int] | None]:
    """``("colwise" | "rowwise", blocks)`` of a plan style (a string or a diffusers packed marker)."""
    if style in ("colwise", "rowwise"):
        return style, None
    kind = type(style).__name__
    if kind in ("PackedColwiseParallel", "PackedRowwiseParallel"):
        return ("colwise" if kind == "PackedColwiseParallel" else "rowwise"), getattr(style, "blocks", None)
    raise ValueError(f"tensor-parallel style {style!r} is not 'colwise', 'rowwise' or a diffusers "
                     f"PackedColwiseParallel / PackedRowwiseParallel")


def resolve_plan(model: nn.Module, tp_plan: Mapping[str, Any] | None = None) -> dict[str, tuple[str, list[int] | None]]:
    """Module path -> ``(style, blocks)`` for every layer a tensor-parallel plan names.

    tp_plan: ``{glob: style}`` (``*`` matches one module-list index, as in diffusers' ``_tp_plan``);
    default: ``model._tp_plan``. ``blocks``: the proportional block sizes of a packed style (from the
    marker, else the layer's ``_tp_packed_row_blocks`` / ``_tp_packed_col_blocks``), None otherwise.
    ``ValueError`` for a model without a plan, a pattern that matches nothing, or a bad style."""
    plan = tp_plan if tp_plan is not None else getattr(model, "_tp_plan", None)
    if not isinstance(plan, Mapping) or not plan:
        raise ValueError(f"{type(model).__name__} has no tensor-parallel plan (no _tp_plan): pass tp_plan="
                         f"{{'blocks.*.attn.to_out.0': 'rowwise', ...}}")
    named = dict(model.named_modules())
    out: dict[str, tuple[str, list[int] | None]] = {}
    for pattern, style in plan.items():
        if not isinstance(pattern, str) or pattern.count("*") > 1:
            raise ValueError(f"tp_plan key {pattern!r}: a module path with at most one '*'")
        kind, blocks = _style_name(style)
        rx = re.compile(re.escape(pattern).replace(r"\*", r"\d+"))
        hits = [p for p in named if rx.fullmatch(p)]
        if not hits:
            raise ValueError(f"tp_plan key {pattern!r} matches no module of {type(model).__name__}")
        for p in hits:
            b = blocks
            if b is None and style not in ("colwise", "rowwise"):
                attr = "_tp_packed_row_blocks" if kind == "rowwise" else "_tp_packed_col_blocks"
                b = getattr(named[p], attr, None)
                if not b:
                    raise ValueError(f"tp_plan {pattern!r}: layer {p!r} uses a packed style but has no blocks "
                                     f"(pass them to the marker or set {attr} on the layer)")
            out[p] = (kind, list(b) if b else None)
    return out


def rank_columns(k: int, shards: int, rank: int, blocks: Sequence[int] | None = None) -> Tensor:
    """The input channels (int64 indices into K=k) shard ``rank`` of ``shards`` holds: one
    contiguous K/shards chunk, or with proportional ``blocks`` (a packed layer whose input is a
    concatenation of column-sharded streams) the rank's chunk of each block, concatenated."""
    sizes = [k] if not blocks else [b * (k // sum(blocks)) for b in blocks]
    if sum(sizes) != k or any(s % shards for s in sizes):
        raise ValueError(f"K={k} with blocks {list(blocks or [])} does not split over {shards} shards")
    parts, offset = [], 0
    for s in sizes:
        c = s // shards
        parts.append(torch.arange(offset + rank * c, offset + (rank + 1) * c))
        offset += s
    return torch.cat(parts)


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
    (``check_row_split``); a rotated quantized layer is refused (its full-width Hadamard does not
    commute with the K split). ``ValueError`` naming the first bad layer; nothing is changed."""
    plan = resolve_plan(model, tp_plan)
    for path, (kind, blocks) in plan.items():
        m = model.get_submodule(path)
        k, n = _k_of(m)
        if kind == "colwise":
            rank_columns(n, shards, 0, blocks)  # raises if N does not split
            continue
        group = m.spec["group_size"] if isinstance(m, QuantizedLinear) else None
        sizes = [k] if not blocks else [b * (k // sum(blocks)) for b in blocks]
        if sum(sizes) != k:
            raise ValueError(f"{path}: K={k} does not split into blocks {blocks}")
        for s in sizes:
            pnum.check_row_split(s, shards, group or None, layer=path)
        if isinstance(m, QuantizedLinear):
            if m.spec["rotated"]:
                raise ValueError(f"{path}: row-parallel layer balanced with a full-width Hadamard rotation "
                                 f"(K={k}), which does not commute with a split of K over {shards} shards; "
                                 f"quantize it with a block-diagonal rotation (numerics.parallel."
                                 f"block_diagonal_factors) or without rotation")
            if m.spec["number_format"] != "int":
                raise ValueError(f"{path}: row-parallel {m.spec['number_format']} layers are not supported "
                                 f"(integer formats only)")
    return plan


def _group_info(group) -> tuple[int, int]:
    import torch.distributed as dist

    return dist.get_rank(group), dist.get_world_size(group)


class RowParallelQuantizedLinear(nn.Module):
    """This rank's part of a row-parallel ``QuantizedLinear``: the input channels ``rank_columns``
    of the weight (and of the balancing vector, and of grouped scales / zero points), the
    per-channel scales and the bias whole. Input: this rank's channels of x ``[..., K/n]`` (what
    a column-parallel layer before it leaves); output: the whole ``[..., N]`` on every rank.

    Forward, per rank: balance the slice (fp32); ``policy="global"``: all-reduce (MAX) the per-token
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
        if s["rotated"] or s["number_format"] != "int" or s["spatial"]:
            raise ValueError(f"RowParallelQuantizedLinear takes unrotated integer linear layers, got {layer!r}")
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
        xb = quant.balance_activation(x.reshape(-1, kl), self.act_vector, [])
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
