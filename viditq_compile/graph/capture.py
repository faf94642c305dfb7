"""Capture: ``nn.Module`` + example inputs -> ``ExportedProgram`` in ATen IR.

Dynamic dimensions use ``Dim.AUTO``, chosen by what each tensor input is
(``graph.shapes.auto_dims``): every dimension of a 4-D/5-D latent (batch, channels, frames, H,
W), all but the feature width of a 2-D/3-D token or embedding tensor, the one dimension of a
timestep or label vector. Export keeps a dimension symbolic where the model allows (batch,
tokens, text length, frames, latent H/W) and specializes it where the model's code pins it
(channels, or H/W in diffusers' PatchEmbed) instead of failing; a pin that export leaves as a
guard on a symbol is written into the program's ``range_constraints``
(``graph.shapes.narrow_pinned_ranges``), so the program itself says what it takes
(``graph.shapes.InputShapes``). Examples should use batch >= 2 and sizes > 1 so that no
dimension is specialized to 0/1.

The program is then decomposed with the default table minus ``aten.linear`` and
``aten.scaled_dot_product_attention``, so the passes see linears whole and attention stays one
op for the backends that have fused kernels.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Any

import torch
from torch.utils import _pytree as pytree

from viditq_compile.graph.shapes import auto_dims, narrow_pinned_ranges

log = logging.getLogger(__name__)


class CaptureError(RuntimeError):
    """The model could not be captured by ``torch.export``; the message says why: torch's whole
    message, then ``BACKEND_HINT``."""


BACKEND_HINT = ("torch.export needs the whole forward as one graph (no data-dependent control flow, "
                "no untraceable calls). The viditq torch.compile backend quantizes a model that export "
                "cannot capture, graph breaks included: torch.compile(model, backend=\"viditq\").")


def _auto_dims(value: Any):
    return pytree.tree_map(auto_dims, value)


def dynamic_shapes_for(model: torch.nn.Module, args: tuple, kwargs: dict):
    """A ``dynamic_shapes`` spec marking ``Dim.AUTO`` the dimensions ``auto_dims`` picks for each
    tensor input."""
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

    dynamic: True (``Dim.AUTO`` as ``dynamic_shapes_for`` picks), False (static shapes), or a
    ``dynamic_shapes`` spec passed to ``torch.export.export`` as is. Whichever, pins the model's
    guards leave on a symbol become ranges of the returned program.
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
        ep = torch.export.export(model, *_fresh(args, kwargs), dynamic_shapes=shapes)
    except Exception as e:  # export raises many types; all mean "not capturable"
        static = _static_retry(model, args, kwargs, e) if dynamic is True else None
        if static is None:
            raise CaptureError(
                f"torch.export could not capture {type(model).__name__}: {type(e).__name__}: "
                f"{str(e).strip()}\n\n{BACKEND_HINT}"
            ) from e
        ep = static
    ep = ep.run_decompositions(decomposition_table())
    narrowed = narrow_pinned_ranges(ep)
    if narrowed:
        log.info("the model pins input dimensions (symbol: sizes taken): %s", narrowed)
    return ep


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """``model`` in eval mode inside the block, its own mode restored after (capture traces the
    inference graph: no dropout, running norm statistics)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _static_retry(model, args, kwargs, error: Exception) -> torch.export.ExportedProgram | None:
    """Export with static shapes after the dynamic export failed (model code that cannot take a
    symbolic size, e.g. ``numpy.sqrt`` of one: Cosmos): the program then takes only the
    example's shapes, and a warning says so. ``None`` when static export fails too."""
    try:
        ep = torch.export.export(model, *_fresh(args, kwargs), dynamic_shapes=None)
    except Exception:  # the dynamic error is the one to report
        return None
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    log.warning("%s cannot be exported with dynamic shapes (%s: %s); captured with static shapes: "
                "the program takes only the example call's shapes (other sizes: quantize again "
                "with an example at that size, or torch.compile(model, backend=\"viditq\"))",
                type(model).__name__, type(error).__name__, first[:300])
    return ep



def _fresh(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The example call with new tensor objects on the same storage: export leaves its
    dynamic-dimension marks on the tensors it is given (a failed export too), and marked tensors
    make a later export, or a ``torch.compile`` of the same call, trace differently."""
    return pytree.tree_map_only(torch.Tensor, torch.Tensor.detach, (args, kwargs))
