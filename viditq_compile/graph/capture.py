"""Capture: ``nn.Module`` + example inputs -> ``ExportedProgram`` in ATen IR.

Dynamic dimensions use ``Dim.AUTO`` on every dimension of every tensor input except the last
(features): export keeps a dimension symbolic where the model allows (batch, tokens, text length,
frames) and specializes it where the model's code pins it (channels, or H/W in diffusers'
PatchEmbed), instead of failing. Examples should use batch >= 2 and sizes > 1 so that no
dimension is specialized to 0/1.

The program is then decomposed with the default table minus ``aten.linear`` and
``aten.scaled_dot_product_attention``, so the passes see linears whole and attention stays one
op for the backends that have fused kernels.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from torch.utils import _pytree as pytree

log = logging.getLogger(__name__)


class CaptureError(RuntimeError):
    """The model could not be captured by ``torch.export``; the message says why: torch's whole
    message, then ``BACKEND_HINT``."""


BACKEND_HINT = ("torch.export needs the whole forward as one graph (no data-dependent control flow, "
                "no untraceable calls). The viditq torch.compile backend quantizes a model that export "
                "cannot capture, graph breaks included: torch.compile(model, backend=\"viditq\").")


def _auto_dims(value: Any):
    def spec(x):
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            dims = range(x.dim() - 1) if x.dim() > 1 else range(1)
            return {d: torch.export.Dim.AUTO for d in dims}
        return None

    return pytree.tree_map(spec, value)


def dynamic_shapes_for(model: torch.nn.Module, args: tuple, kwargs: dict):
    """A ``dynamic_shapes`` spec marking every non-feature dimension ``Dim.AUTO``."""
    sig = inspect.signature(model.forward)
    bound = sig.bind(*args, **kwargs)
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind == inspect.Parameter.VAR_KEYWORD:
            out[name] = {k: _auto_dims(v) for k, v in value.items()}
        elif kind == inspect.Parameter.VAR_POSITIONAL:
            out[name] = tuple(_auto_dims(v) for v in value)
        else:
            out[name] = _auto_dims(value)
    return out


def decomposition_table() -> dict:
    aten = torch.ops.aten
    defaults = getattr(torch.export, "default_decompositions", None)  # torch >= 2.6
    if defaults is None:
        from torch._decomp import core_aten_decompositions

        defaults = core_aten_decompositions
    table = dict(defaults())
    for op in (aten.linear.default, aten.scaled_dot_product_attention.default):
        table.pop(op, None)
    return table


def capture(model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None, *,
            dynamic: Any = True) -> torch.export.ExportedProgram:
    """Export ``model(*args, **kwargs)``.

    dynamic: True (``Dim.AUTO`` on non-feature dims), False (static shapes), or a
    ``dynamic_shapes`` spec passed to ``torch.export.export`` as is.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(args, tuple):
        raise TypeError(f"args must be a tuple of positional inputs, got {type(args).__name__}")
    kwargs = dict(kwargs or {})
    if dynamic is True:
        try:
            shapes = dynamic_shapes_for(model, args, kwargs)
        except TypeError as e:
            raise CaptureError(f"inputs do not match {type(model).__name__}.forward: {e}") from e
    elif dynamic is False or dynamic is None:
        shapes = None
    else:
        shapes = dynamic
    try:
        ep = torch.export.export(model, args, kwargs, dynamic_shapes=shapes)
    except Exception as e:  # export raises many types; all mean "not capturable"
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {type(e).__name__}: "
            f"{str(e).strip()}\n\n{BACKEND_HINT}"
        ) from e
    return ep.run_decompositions(decomposition_table())
