"""The DiT families (``families/<name>.py``, each defining ``FAMILY``), found by module name, and
what the rest of the code reads from them: the default keep-FP regex, the timestep and latent
argument names, the role name fragments, the output frame axis.

Unions keep the first-seen order over the families taken in name order (the order matters only
where a model call binds two of the names: the first wins).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable, Mapping
from typing import Any

from viditq_compile import families as _package
from viditq_compile.families.base import ROLE_NAME_KEYS, Family, keep_fp_regex

_NOT_FAMILIES = {"base", "registry"}


def _discover() -> dict[str, Family]:
    found = {}
    for info in sorted(pkgutil.iter_modules(_package.__path__), key=lambda i: i.name):
        if info.name in _NOT_FAMILIES or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{_package.__name__}.{info.name}")
        family = getattr(module, "FAMILY", None)
        if not isinstance(family, Family) or family.name != info.name:
            raise ImportError(f"families/{info.name}.py must define FAMILY = Family(name={info.name!r}, ...)")
        found[info.name] = family
    return found


FAMILIES: dict[str, Family] = _discover()
"""Family name -> ``Family``, in name order."""


def _union(groups: Iterable[Iterable[str]]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(x for g in groups for x in g))


def get(name: str) -> Family:
    """The family called ``name`` (or one of its aliases), case-insensitive; ``KeyError`` naming
    the known families otherwise."""
    key = name.lower() if isinstance(name, str) else name
    for f in FAMILIES.values():
        if key == f.name or key in f.aliases:
            return f
    raise KeyError(f"unknown model family {name!r}; families: {', '.join(FAMILIES)}")


def for_class_name(class_name: str) -> Family | None:
    """The family of a model class name (a config's ``_class_name``), or None."""
    return next((f for f in FAMILIES.values() if class_name in f.class_names), None)


def for_config(config: Mapping[str, Any]) -> Family | None:
    """The family of a model config: by its ``_class_name`` (diffusers), else by its
    ``architectures`` (transformers-style configs such as OpenSORA's STDiT3); None if unknown."""
    names = [config.get("_class_name")]
    archs = config.get("architectures")
    if isinstance(archs, (list, tuple)):
        names.extend(archs)
    for n in names:
        if isinstance(n, str) and (f := for_class_name(n)) is not None:
            return f
    return None


def for_model(model: Any) -> Family | None:
    """The family of a model object: its class name, or its diffusers config's ``_class_name``."""
    config = getattr(model, "config", None)
    names = [type(model).__name__] + ([config.get("_class_name")] if isinstance(config, Mapping) else [])
    return next((f for n in names if isinstance(n, str) and (f := for_class_name(n)) is not None), None)


def with_example_inputs() -> dict[str, Family]:
    """Class name -> family, for every class whose family builds example inputs from its config."""
    return {c: f for f in FAMILIES.values() if f.example_inputs is not None for c in f.class_names}


KEEP_FP_REGEX = keep_fp_regex(_union(f.keep_fp for f in FAMILIES.values()),
                              _union(f.keep_fp_top for f in FAMILIES.values()))
"""The default ``remain_fp_regex``: the keep-FP names of every family (``Family.keep_fp``)."""

TIMESTEP_NAMES = _union(f.timestep_names for f in FAMILIES.values())
"""Forward arguments read as the timestep of a model call (first bound wins)."""

LATENT_NAMES = _union(f.latent_names for f in FAMILIES.values())
"""Forward arguments read as the noisy latent (first present wins)."""

ROLE_NAMES: dict[str, tuple[str, ...]] = {
    role: _union(f.role_names.get(role, ()) for f in FAMILIES.values()) for role in ROLE_NAME_KEYS}
"""Role -> the module-name fragments of every family that mark it."""

DEFAULT_OUTPUT_FRAME_AXIS: int = FAMILIES["latte"].output_frame_axis  # type: ignore[assignment]  # Latte's is set
"""Frame axis of a video denoiser output when the family is not known: diffusers' video
transformers return [B, C, F, H, W] as Latte does (CogVideoX's [B, F, C, H, W] is the exception;
``metrics.FrameError.for_family`` takes a family's own axis)."""

__all__ = ["FAMILIES", "Family", "get", "for_class_name", "for_config", "for_model", "with_example_inputs",
           "KEEP_FP_REGEX", "TIMESTEP_NAMES", "LATENT_NAMES", "ROLE_NAMES", "DEFAULT_OUTPUT_FRAME_AXIS"]
