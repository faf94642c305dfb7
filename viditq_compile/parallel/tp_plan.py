"""The quantization side of tensor parallelism: what ``vq.quantize(model, ..., tensor_parallel=N)``
changes in the plan so that the program (or its module form) shards over N ranks as the model's
tensor-parallel plan says, and what that costs.

The tensor-parallel plan ``{module-path glob: style}`` (diffusers' ``_tp_plan`` by default, styles
``"colwise"`` / ``"rowwise"`` / ``PackedColwiseParallel`` / ``PackedRowwiseParallel``) is read by
``resolve_plan``; ``parallel.tensor`` shards a module-form model by it.

- Column-parallel layers (output channels N split): nothing changes in the numerics (each output
  channel is computed from the same codes and scales); N must split over the shards.
- Row-parallel layers (input channels K split): each shard's K must be a multiple of
  ``numerics.parallel.SHARD_K_MULTIPLE`` and of the weight group (int4 included), or the layer is
  refused with its name and the numbers. A rotating layer gets a block-diagonal rotation,
  ``LayerPlan.rotation_blocks`` blocks of ``H(K / blocks)`` (one per shard; a packed layer one per
  shard per stream), because a full-width Hadamard mixes channels that different shards hold.
  That changes the rounding: ``measure_rotation_cost`` records, per layer, the SQNR of the
  layer's output against floating point on the example call with the full-width and with the
  block-diagonal rotation, in ``Plan.tensor_parallel``, which the report prints.

Nothing here communicates: the plan is data, the same on every rank.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from viditq_compile.config.plan import Plan, PlanError
from viditq_compile.methods import balance
from viditq_compile.numerics import parallel as pnum
from viditq_compile.numerics import quant
from viditq_compile.numerics.hadamard import random_signs

log = logging.getLogger(__name__)

__all__ = ["resolve_plan", "rank_columns", "check_shards", "TensorParallel", "capture_inputs",
           "measure_rotation_cost", "MAX_COST_ROWS"]

MAX_COST_ROWS = 512
"""Rows (tokens) of each row-parallel layer's example input kept to measure the rotation's cost
(evenly strided over the call), so that measuring holds a few MiB per layer."""


def check_shards(shards: Any) -> int:
    """``tensor_parallel`` validated: an int >= 1 (``ValueError`` naming the value otherwise)."""
    if not isinstance(shards, int) or isinstance(shards, bool) or shards < 1:
        raise ValueError(f"tensor_parallel must be an int >= 1 (the number of tensor-parallel ranks), "
                         f"got {shards!r}")
    return shards


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


def check_row_layer(name: str, k: int, shards: int, group: int | None, blocks: Sequence[int] | None) -> None:
    """A row-parallel split of K=k: each shard's part of each stream a multiple of
    ``SHARD_K_MULTIPLE`` and of ``group`` (``ValueError`` naming the layer and the numbers)."""
    sizes = [k] if not blocks else [b * (k // sum(blocks)) for b in blocks]
    if sum(sizes) != k:
        raise ValueError(f"{name}: K={k} does not split into blocks {list(blocks or [])}")
    for s in sizes:
        pnum.check_row_split(s, shards, group or None, layer=name)


@dataclass(frozen=True)
class TensorParallel:
    """A tensor-parallel degree and the layers its plan shards (``resolve_plan``'s map), applied to
    a quantization plan by ``apply`` (``pipeline.quantize_graph`` does, after select)."""

    shards: int
    layers: Mapping[str, tuple[str, list[int] | None]]

    @staticmethod
    def of(model: nn.Module, shards: Any, tp_plan: Mapping[str, Any] | None = None) -> TensorParallel | None:
        """``None`` for ``shards == 1`` (one process: nothing changes; a ``tp_plan`` is then refused,
        it would do nothing), else the model's (or the given) plan resolved."""
        shards = check_shards(shards)
        if shards == 1:
            if tp_plan is not None:
                raise ValueError("tp_plan is given but tensor_parallel=1: pass tensor_parallel=N (N >= 2) "
                                 "to quantize for N tensor-parallel ranks")
            return None
        return TensorParallel(shards, resolve_plan(model, tp_plan))

    def row_layers(self) -> dict[str, list[int] | None]:
        return {p: b for p, (kind, b) in self.layers.items() if kind == "rowwise"}

    def apply(self, plan: Plan) -> Plan:
        """``plan`` with every row-parallel rotating layer's ``rotation_blocks`` set and
        ``tensor_parallel`` recorded (costs not yet measured). Refused (``ValueError`` naming the
        layer and the numbers): a plan layer the split cannot take, a row-parallel e4m3 layer,
        a layer of the tensor-parallel plan that the captured graph does not hold as a linear, a
        given plan whose rotation blocks were made for another split."""
        missing = sorted(set(self.layers) - set(plan.layers))
        if missing:
            raise ValueError(f"tensor_parallel={self.shards}: the tensor-parallel plan shards "
                             f"{len(missing)} layer(s) the captured graph does not run as linear layers: "
                             f"{missing[:5]}")
        layers = dict(plan.layers)
        record: dict[str, dict] = {}
        for name, (kind, blocks) in self.layers.items():
            lp = layers[name]
            entry: dict[str, Any] = {"style": kind, "rotation_blocks": None, "sqnr_full_db": None,
                                     "sqnr_block_db": None}
            if kind == "colwise":
                rank_columns(lp.out_features, self.shards, 0, blocks)  # raises if N does not split
                entry["rotation_blocks"] = lp.rotation_blocks
                record[name] = entry
                continue
            k = lp.in_features
            check_row_layer(name, k, self.shards, lp.weight_group if lp.quantized else None, blocks)
            if lp.quantized and lp.fp8:
                raise ValueError(f"{name}: row-parallel e4m3 layers are not supported (integer formats only): "
                                 f"keep it at number_format 'int' or in floating point")
            if lp.quantized and balance.rotates(lp.balance):
                want = pnum.row_rotation_blocks(k, self.shards, blocks)
                if lp.rotation_blocks is not None and lp.rotation_blocks % want:
                    raise ValueError(f"{name}: the plan rotates K={k} in {lp.rotation_blocks} blocks, which do "
                                     f"not keep each of the {self.shards} shards' channels whole (needs a "
                                     f"multiple of {want} blocks)")
                try:
                    pnum.rotation_factors(k, want)
                except ValueError as e:
                    raise ValueError(f"{name}: row-parallel over {self.shards} shards needs a block-diagonal "
                                     f"rotation of {want} blocks of width {k // want}: {e}") from None
                if lp.rotation_blocks is None:
                    lp = replace(lp, rotation_blocks=want)
                    layers[name] = lp
            entry["rotation_blocks"] = lp.rotation_blocks
            record[name] = entry
        out = replace(plan, layers=layers, tensor_parallel={"shards": self.shards, "layers": record})
        try:
            out.validate()
        except PlanError as e:
            raise ValueError(f"tensor_parallel={self.shards}: {e}") from None
        rows = sum(e["style"] == "rowwise" for e in record.values())
        log.info("tensor parallel %d: %d row-parallel layer(s) (%d with a block-diagonal rotation), %d column-"
                 "parallel", self.shards, rows, sum(e["rotation_blocks"] is not None and e["style"] == "rowwise"
                                                    for e in record.values()), len(record) - rows)
        return out


def capture_inputs(model: nn.Module, names: Sequence[str], args: tuple, kwargs: dict | None,
                   max_rows: int = MAX_COST_ROWS) -> dict[str, Tensor]:
    """The input of each layer ``names`` in one call ``model(*args, **kwargs)`` (no grad), as
    ``[rows, K]`` fp32, at most ``max_rows`` evenly strided rows of its first call."""
    if not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows must be a positive int, got {max_rows!r}")
    got: dict[str, Tensor] = {}
    hooks = []

    def hook(name):
        def pre(_mod, inputs):
            if name in got or not inputs or not isinstance(inputs[0], Tensor):
                return
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            step = max(1, math.ceil(x.shape[0] / max_rows))
            got[name] = x[::step][:max_rows].to(torch.float32).clone()
        return pre

    try:
        for n in names:
            hooks.append(model.get_submodule(n).register_forward_pre_hook(hook(n)))
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(*args, **(kwargs or {}))
        finally:
            model.train(was)
    finally:
        for h in hooks:
            h.remove()
    return got


def _layer_sqnr(x: Tensor, w: Tensor, bias: Tensor | None, lp, rotation: list[Tensor], stats) -> float:
    """SQNR (dB) of ``lp``'s quantized output against ``x @ w.T + bias``, balanced as the plan
    says (smoothing from the layer's own weight and statistics) with the given rotation."""
    k = w.shape[1]
    smooth = None
    if balance.smooths(lp.balance):
        smooth = quant.smoothing_vector(w.abs().amax(dim=0), stats.absmax(lp.name).to(torch.float32), lp.alpha)
    signs = random_signs(k, lp.rotation_seed)
    vec = smooth * signs if smooth is not None else signs
    qw = quant.quantize_weight(quant.balance_weight(w, smooth, signs, rotation), lp.weight_bits,
                               sym=lp.weight_sym, group=lp.weight_group)
    xq, xs = quant.quantize_act(x, vec, rotation, None, lp.act_bits)
    b = None if bias is None else bias.detach().to(torch.float32)
    y = quant.qlinear(xq, xs, qw.q, qw.scale, qw.zero, b, lp.weight_group, gemm=quant.int_gemm_fast)
    return quant.sqnr_db(x @ w.T + (0 if b is None else b), y)


def measure_rotation_cost(plan: Plan, model: nn.Module, inputs: Mapping[str, Tensor], stats=None) -> Plan:
    """``plan`` with ``tensor_parallel``'s ``sqnr_full_db`` / ``sqnr_block_db`` filled for every
    row-parallel layer with a block-diagonal rotation whose example input is in ``inputs``
    (``capture_inputs``): the layer alone, at its plan's widths (range 0 of timestep-dependent
    ones), its output against floating point. Layers without an input stay ``None`` (the report
    says "not measured")."""
    rec = plan.tensor_parallel
    if rec is None:
        return plan
    entries = {n: dict(e) for n, e in rec["layers"].items()}
    for name, e in entries.items():
        lp = plan.layers[name]
        x = inputs.get(name)
        mod = model.get_submodule(name)
        w = getattr(mod, "weight", None)
        if e["style"] != "rowwise" or not lp.rotation_blocks or x is None or not isinstance(w, Tensor) \
                or w.dim() != 2 or (balance.smooths(lp.balance) and stats is None):
            continue
        w32, bias = w.detach().to(torch.float32), getattr(mod, "bias", None)
        full = _layer_sqnr(x, w32, bias, lp, pnum.rotation_factors(lp.in_features), stats)
        block = _layer_sqnr(x, w32, bias, lp, pnum.rotation_factors(lp.in_features, lp.rotation_blocks), stats)
        e["sqnr_full_db"], e["sqnr_block_db"] = _finite(full), _finite(block)
    return replace(plan, tensor_parallel={"shards": rec["shards"], "layers": entries})


def _finite(db: float) -> float:
    """A JSON-safe SQNR: exact outputs (inf) recorded as 999 dB."""
    return round(min(float(db), 999.0), 3) if math.isfinite(db) or db > 0 else -999.0
