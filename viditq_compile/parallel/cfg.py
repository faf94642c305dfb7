"""CFG parallelism: the conditional and unconditional halves of a guided batch on two ranks.

A pipeline with classifier-free guidance calls its transformer on ``[uncond; cond]`` (batch 2b).
Per-token activation scales make the quantized model row-local, so each rank running one half
computes those rows as one process does; the halves are gathered back after the call, and every
rank returns the full output. No attention, no weights, no plan change: only the output is
exchanged, once per call. Batch split in ``size`` equal parts, so over more ranks it is plain data
parallelism.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable
from dataclasses import fields, is_dataclass
from typing import Any

import torch
from torch import nn

from viditq_compile.parallel.mesh import Group, resolve_group, shard

log = logging.getLogger(__name__)

__all__ = ["cfg_parallel", "remove_cfg_parallel"]

_ACTIVE: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()


def _batch(args: tuple, kwargs: dict, latent: str) -> int:
    x = kwargs.get(latent)
    if not isinstance(x, torch.Tensor):
        x = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if x is None or x.dim() == 0:
        raise ValueError(f"cfg_parallel: no batched tensor {latent!r} (or first positional tensor) in the call")
    return int(x.shape[0])


def _split(value: Any, batch: int, g: Group, keep: bool) -> Any:
    """Every tensor whose dim 0 is the batch, sliced to this rank's part (nested in dicts, lists,
    tuples); others (scalars, per-token tables, replicated arguments) passed whole."""
    if isinstance(value, torch.Tensor):
        return shard(value, 0, g) if not keep and value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: _split(v, batch, g, keep) for k, v in value.items()}
    if isinstance(value, list | tuple) and not hasattr(value, "_fields"):
        return type(value)(_split(v, batch, g, keep) for v in value)
    return value


def _gather_tensor(x: torch.Tensor, local: int, g: Group, where: str) -> torch.Tensor:
    import torch.distributed._functional_collectives as funcol

    if x.dim() == 0 or x.shape[0] != local:
        raise ValueError(f"cfg_parallel: output {where} of shape {tuple(x.shape)} has no batch dim of "
                         f"{local} (this rank's part) to gather")
    y = funcol.all_gather_tensor(x.contiguous(), 0, g.group)
    return y.wait() if isinstance(y, funcol.AsyncCollectiveTensor) else y


def _gather(out: Any, local: int, g: Group, where: str = "") -> Any:
    if isinstance(out, torch.Tensor):
        return _gather_tensor(out, local, g, where or "tensor")
    if is_dataclass(out) and not isinstance(out, type):  # diffusers BaseOutput (return_dict=True)
        values = {f.name: _gather(getattr(out, f.name), local, g, f"{where}.{f.name}") for f in fields(out)}
        return type(out)(**values)
    if isinstance(out, dict):
        return {k: _gather(v, local, g, f"{where}[{k!r}]") for k, v in out.items()}
    if isinstance(out, list | tuple):
        return type(out)(_gather(v, local, g, f"{where}[{i}]") for i, v in enumerate(out))
    if out is None:
        return None
    raise ValueError(f"cfg_parallel: output {where or 'value'} of type {type(out).__name__} cannot be gathered")


def cfg_parallel(model: nn.Module, mesh=None, *, latent: str = "hidden_states",
                 replicated: Iterable[str] = ()) -> nn.Module:
    """Run ``model`` (an ``nn.Module``, a ``QuantizedModel``, a diffusers transformer a pipeline
    calls) with its batch split over the ranks of ``mesh`` (a 1-D ``DeviceMesh``, a
    ``ProcessGroup`` or None for the world; 2 ranks for the two CFG halves). Returns ``model``
    itself, with a forward pre-hook that keeps this rank's part of every batched argument (dim 0
    equal to the batch of ``latent``, else of the first positional tensor; nested dicts / lists
    too; names in ``replicated`` passed whole) and a forward hook that all-gathers every output
    tensor along dim 0 in rank order (tensors, tuples, dicts, diffusers ``BaseOutput`` for
    ``return_dict=True``). Every rank must make the same calls with the same inputs.

    Refused (``ValueError``): a batch that does not divide by the ranks (guidance off: batch b, not
    2b), an output tensor with no batch dim, a second ``cfg_parallel`` on the same module.
    ``remove_cfg_parallel(model)`` undoes it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"cfg_parallel takes an nn.Module (a QuantizedModel is one), got {type(model).__name__}")
    if model in _ACTIVE:
        raise ValueError("cfg_parallel: already applied to this module (remove_cfg_parallel first)")
    keep = frozenset(replicated)
    g = resolve_group(mesh, what="cfg_parallel")
    if g.size < 2:
        raise ValueError(f"cfg_parallel over {g.size} rank: nothing to split")

    state: dict[str, int] = {}  # this call's local batch, from the pre hook to the post hook

    def pre(_module, args, kwargs):
        batch = _batch(args, kwargs, latent)
        if batch % g.size:
            raise ValueError(f"cfg_parallel: batch {batch} does not split over {g.size} ranks (with "
                             f"guidance the pipeline passes 2 x its batch; without, do not use cfg_parallel)")
        args = tuple(_split(a, batch, g, False) for a in args)
        kwargs = {k: _split(v, batch, g, k in keep) for k, v in kwargs.items()}
        state["local"] = batch // g.size
        return args, kwargs

    def post(_module, _args, output):
        return _gather(output, state["local"], g)

    _ACTIVE[model] = (model.register_forward_pre_hook(pre, with_kwargs=True), model.register_forward_hook(post))
    log.info("cfg_parallel: batch split over %d ranks (this is rank %d)", g.size, g.rank)
    return model


def remove_cfg_parallel(model: nn.Module) -> None:
    """Remove the hooks ``cfg_parallel`` added; ``ValueError`` when it added none."""
    handles = _ACTIVE.pop(model, None)
    if handles is None:
        raise ValueError("remove_cfg_parallel: cfg_parallel was not applied to this module")
    for h in handles:
        h.remove()
