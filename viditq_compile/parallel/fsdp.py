"""FSDP2 (``torch.distributed.fsdp.fully_shard``) over a quantized model in module form.

What ``fully_shard`` does with a ``QuantizedLinear`` as it is (measured, torch 2.13, 2 gloo
ranks): the integer / e4m3 ``weight`` is a ``requires_grad=False`` Parameter, so it is sharded
along dim 0 like any parameter (each rank holds N/2 rows, int8 and fp32 parameters all-gathered
together) and the output is bit-exact; the bias (the model's own Parameter) too. Buffers are not
sharded: every rank keeps the whole ``weight_scale``, ``weight_zero`` and ``act_vector``. Per
channel that is 4 bytes a row against K bytes of int8 weight (0.35% at K=1152); for grouped int4
weights (scale fp32 + zero int32 per group of g: 8/g bytes a weight against 0.5) it is 25% more
than the sharded weight at g=64, so ``prepare`` turns them into ``requires_grad=False``
Parameters, which ``fully_shard`` then shards too. The state dict keeps its keys (parameters and
buffers share the namespace), so a checkpoint saved before loads after.

The program form (``vq.quantize``'s ``QuantizedModel``) holds its tensors in an
``ExportedProgram``, which FSDP cannot wrap: ``prepare`` refuses it; convert with
``module_form.to_modules`` first.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from viditq_compile.module_form import QuantizedLinear, quantized_linears

log = logging.getLogger(__name__)

__all__ = ["SHARDED_TENSORS", "prepare"]

SHARDED_TENSORS = ("weight_scale", "weight_zero", "act_vector")
"""The ``QuantizedLinear`` buffers ``prepare`` makes Parameters (the static activation scale, a
scalar, and the recomputed Hadamard factors stay buffers: every rank needs them whole)."""


def prepare(model: nn.Module) -> int:
    """Make the per-layer quantization tensors of every ``QuantizedLinear`` of ``model``
    (``SHARDED_TENSORS``) ``requires_grad=False`` Parameters, in place, so ``fully_shard`` shards
    them with the weight; returns the number of tensors converted (0 when called again).
    ``TypeError`` for a program-form model, ``ValueError`` for a model with no quantized layer."""
    if isinstance(getattr(model, "program", None), torch.export.ExportedProgram):
        raise TypeError(f"fsdp.prepare: {type(model).__name__} is the program form (its tensors live in an "
                        f"ExportedProgram, which FSDP cannot shard); convert it with "
                        f"viditq_compile.module_form.to_modules(model, qm) and shard the model")
    if not isinstance(model, nn.Module):
        raise TypeError(f"fsdp.prepare takes an nn.Module in module form, got {type(model).__name__}")
    layers = quantized_linears(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no QuantizedLinear layer: quantize it in module form "
                         f"first (module_form.quantize_modules)")
    converted = 0
    for layer in layers.values():
        converted += _to_parameters(layer)
    log.info("fsdp.prepare: %d quantization tensors of %d layers are now parameters", converted, len(layers))
    return converted


def _to_parameters(layer: QuantizedLinear) -> int:
    n = 0
    for name in SHARDED_TENSORS:
        t = layer._buffers.get(name)
        if t is None:
            continue
        del layer._buffers[name]
        layer.register_parameter(name, nn.Parameter(t, requires_grad=False))
        n += 1
    return n
