"""A quantized program in place of a diffusers pipeline's transformer.

A pipeline reads its transformer's ``config`` (``sample_size``, ``in_channels``,
``out_channels``), ``dtype`` and ``device``, and calls it the way the model's ``forward`` takes
arguments: ``PixArtSigmaPipeline`` passes the latents positionally and the rest by keyword with
``return_dict=False``; ``DiTPipeline`` passes no ``return_dict`` and reads ``.sample``. A
``QuantizedModel`` is an exported program: it runs only with the argument structure it was
exported with. ``as_diffusers_transformer`` wraps it so that a pipeline can call it as the model:

    qm = vq.load("pixart-w8a8/")
    pipe.transformer = as_diffusers_transformer(qm, PixArtTransformer2DModel.load_config(path))

Each call is bound to the model's ``forward`` signature and re-arranged into the exported
structure: arguments exported positionally are passed positionally, those exported by keyword by
keyword. Python constants of the export (``return_dict``, ``None`` entries of
``added_cond_kwargs``) are baked into the program, so the exported values are passed; the output
is then returned as the caller asked: a tuple for ``return_dict=False``, the model's
``Transformer2DModelOutput`` otherwise. Tensor shapes may differ from the export's where the
program's dimensions are dynamic (batch and text length; see ``viditq_compile.graph.capture``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils import _pytree as pytree

__all__ = ["DiffusersTransformer", "as_diffusers_transformer"]

_TENSOR = object()  # marks an input the program takes as a tensor (any value is passed on)


def _export_template(program: torch.export.ExportedProgram):
    """``(args, kwargs)`` as exported: ``_TENSOR`` for tensor inputs, constants by value."""
    from torch.export.graph_signature import ConstantArgument, InputKind

    specs = [s for s in program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    in_spec = program.call_spec.in_spec
    if in_spec is None or in_spec.num_leaves != len(specs):
        return None
    leaves = [s.arg.value if isinstance(s.arg, ConstantArgument) else _TENSOR for s in specs]
    args, kwargs = pytree.tree_unflatten(leaves, in_spec)
    return tuple(args), dict(kwargs)


def _model_class(config: Mapping):
    import diffusers

    name = config.get("_class_name")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    return cls if isinstance(cls, type) and issubclass(cls, torch.nn.Module) else None


class DiffusersTransformer(torch.nn.Module):
    """A ``QuantizedModel`` that a diffusers pipeline can call as its transformer.

    Attributes: ``quantized`` (the wrapped ``QuantizedModel``), ``config`` (the model's
    ``FrozenDict``), ``dtype`` and ``device`` (of the latents the program takes and of its
    tensors).
    """

    def __init__(self, quantized: torch.nn.Module, config: Mapping,
                 signature: inspect.Signature | None = None,
                 dtype: torch.dtype | None = None):
        from diffusers.configuration_utils import FrozenDict

        super().__init__()
        self.quantized = quantized
        self.config = config if isinstance(config, FrozenDict) else FrozenDict(config)
        self._signature = signature
        program = getattr(quantized, "program", None)
        self._template = _export_template(program) if program is not None else None
        self._dtype = dtype or self._input_dtype(program)
        tensors = [t for t in quantized.state_dict().values() if isinstance(t, torch.Tensor)]
        self._device = tensors[0].device if tensors else torch.device("cpu")

    @staticmethod
    def _input_dtype(program) -> torch.dtype:
        """The dtype of the program's first floating-point input (the latents)."""
        if program is not None:
            for name in program.graph_signature.user_inputs:
                node = next((n for n in program.graph.nodes
                             if n.op == "placeholder" and n.name == name), None)
                val = node.meta.get("val") if node is not None else None
                if isinstance(val, torch.Tensor) and val.is_floating_point():
                    return val.dtype
        return torch.float32

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def _arrange(self, args: tuple, kwargs: dict) -> tuple[tuple, dict, bool]:
        """The call re-arranged into the exported structure, and the caller's ``return_dict``.
        ``ValueError`` when the call differs from the export in a constant baked into the
        program (the program itself checks only top-level ones)."""
        assert self._signature is not None and self._template is not None  # forward checks both
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        want_dict = bool(values.pop("return_dict", True))
        t_args, t_kwargs = self._template
        names = list(self._signature.parameters)[:len(t_args)]
        new_args = tuple(values.get(n) for n in names)
        new_kwargs = {k: t_kwargs[k] if k == "return_dict" else values.get(k) for k in t_kwargs}
        given, spec = pytree.tree_flatten((new_args, new_kwargs))
        exported, t_spec = pytree.tree_flatten((t_args, t_kwargs))
        if spec == t_spec:
            for path_value, (g, e) in zip(pytree.tree_flatten_with_path((t_args, t_kwargs))[0],
                                          zip(given, exported)):
                if e is not _TENSOR and (isinstance(g, torch.Tensor) or g != e):
                    where = pytree.keystr(path_value[0])
                    raise ValueError(f"the quantized program was exported with {where} = {e!r} "
                                     f"(a constant baked into it), but is called with "
                                     f"{type(g).__name__ if isinstance(g, torch.Tensor) else repr(g)}; "
                                     f"export it with a call like this one")
        return new_args, new_kwargs, want_dict

    def forward(self, *args, **kwargs):
        if self._signature is None or self._template is None:
            return self.quantized(*args, **kwargs)
        args, kwargs, want_dict = self._arrange(args, kwargs)
        out = self.quantized(*args, **kwargs)
        if want_dict and isinstance(out, (tuple, list)):
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=out[0])
        if not want_dict and hasattr(out, "to_tuple"):
            return out.to_tuple()
        return out


def as_diffusers_transformer(quantized: torch.nn.Module,
                             model_or_config: torch.nn.Module | Mapping[str, Any],
                             dtype: torch.dtype | None = None) -> DiffusersTransformer:
    """Wrap ``quantized`` (a ``QuantizedModel``, e.g. from ``viditq_compile.load``) for a
    diffusers pipeline.

    model_or_config: the diffusers model it was quantized from, or that model's config (a
    mapping such as ``Model.load_config(path)``; its ``_class_name`` names the model class, whose
    ``forward`` signature calls are bound to).
    dtype: what ``.dtype`` reports; by default the dtype of the program's latents input.
    """
    if isinstance(model_or_config, torch.nn.Module):
        config = getattr(model_or_config, "config", None)
        if not isinstance(config, Mapping):
            raise TypeError(f"{type(model_or_config).__name__} has no diffusers config")
        cls = type(model_or_config)
    elif isinstance(model_or_config, Mapping):
        config, cls = model_or_config, _model_class(model_or_config)
    else:
        raise TypeError(f"model_or_config must be a diffusers model or its config, got "
                        f"{type(model_or_config).__name__}")
    signature = None
    if cls is not None:  # forward as the class defines it: drop ``self``
        signature = inspect.signature(cls.forward)
        signature = signature.replace(parameters=list(signature.parameters.values())[1:])
    return DiffusersTransformer(quantized, config, signature, dtype)
