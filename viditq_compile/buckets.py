"""Resolution buckets: more programs for one quantized model, one per set of input sizes the
model's code pins, all built from one plan and sharing one copy of the weights.

A model whose code pins latent H/W (diffusers' PatchEmbed position tables: PixArt-α/Σ, SD3,
HunyuanDiT, ...) exports to a program that takes one resolution. PixArt-Σ samples at aspect-ratio
bins, so a user needs one program per bin. ``capture_bucket`` captures the model at another
example call and applies the first program's plan (the same layers, widths, balancing vectors and
static scales: no new selection, no new calibration), then ``share_tensors`` points every tensor
equal to one the earlier programs hold at that tensor, so a bucket costs its graph, not another
copy of the weights. ``QuantizedModel`` runs a call on the first bucket whose shapes take it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from viditq_compile.config.plan import Plan
from viditq_compile.graph.capture import capture, eval_mode
from viditq_compile.graph.sites import ExportedTensors
from viditq_compile.pipeline import quantize_graph

log = logging.getLogger(__name__)


def capture_bucket(model: torch.nn.Module, args: tuple, kwargs: dict | None, plan: Plan,
                   base: Sequence[torch.export.ExportedProgram]) -> torch.export.ExportedProgram:
    """``model(*args, **kwargs)`` captured and quantized by ``plan`` (``pipeline.quantize_graph``
    with the plan's own calibration statistics), its tensors shared with ``base`` where equal.

    Raises ``PlanError`` when the plan does not fit the new graph (a layer it names is absent, or
    has another shape) and ``CaptureError`` when export fails at this size."""
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a viditq_compile.Plan, got {type(plan).__name__}")
    with eval_mode(model):
        ep = capture(model, args, kwargs, dynamic=True)
    quantize_graph(ExportedTensors(ep), None, plan, plan.calibration)
    shared = share_tensors(base, ep)
    log.info("resolution bucket: %.1f MiB of tensors shared with the earlier program(s)", shared / 2**20)
    return ep


def _key(t: torch.Tensor) -> tuple:
    return (t.dtype, tuple(t.shape), t.device)


def share_tensors(base: Sequence[torch.export.ExportedProgram], ep: torch.export.ExportedProgram) -> int:
    """Point each tensor of ``ep`` (state_dict and constants) at an equal tensor of a ``base``
    program held under the same name; returns the bytes so shared. Equality is checked value for
    value (``torch.equal``): a balanced weight is recomputed per capture, bit-identical but a new
    tensor, and a name alone proves nothing (``_tensor_constant0`` is whatever that capture lifted).
    Call it before the program's module is built (``ep.module()`` takes the tensors it then holds)."""
    shared = 0
    for table in ("state_dict", "constants"):
        mine = getattr(ep, table)
        for name, t in list(mine.items()):
            if not isinstance(t, torch.Tensor):
                continue
            for other in base:
                o = getattr(other, table).get(name)
                if o is t:
                    shared += t.numel() * t.element_size()
                    break
                if isinstance(o, torch.Tensor) and _key(o) == _key(t) and type(o) is type(t) \
                        and torch.equal(o, t):
                    mine[name] = o
                    shared += t.numel() * t.element_size()
                    break
    return shared


def unique_tensor_bytes(programs: Sequence[torch.export.ExportedProgram]) -> int:
    """Bytes of the distinct tensors the programs hold (a storage shared by several counts once)."""
    seen: set[tuple] = set()
    total = 0
    for ep in programs:
        tensors = list(ep.state_dict.values()) + [t for t in ep.constants.values()
                                                   if isinstance(t, torch.Tensor)]
        for t in tensors:
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) \
                if t.numel() else (id(t),)
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    return total
