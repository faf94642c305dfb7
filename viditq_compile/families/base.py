"""``Family``: everything the code knows about one DiT family, as data plus an input builder.

A family module (``families/<name>.py``) defines one ``FAMILY``; ``families.registry`` finds the
modules by name, so a new family is one new module. Nothing here imports the passes, the
mixed-precision search, the CLI or the API: those read the families, never the other way round.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

InputBuilder = Callable[[Mapping[str, Any], int, int], dict]
"""``(config, batch, seed) -> kwargs``: example keyword arguments of one model call, built from the
model's config (a diffusers ``model.config`` or the dict of its ``config.json``), seeded."""

ROLE_NAME_KEYS = ("cross_attn", "self_attn", "temporal_attn", "mlp")
"""The layer roles a family can name module-path fragments for (``Family.role_names``)."""

TEXT_TOKENS = 16
"""Text tokens in example inputs (pipelines pad to 77-512; any length runs)."""


class FamilyConfigError(ValueError):
    """A model config lacks what a family's example-input builder needs; the message names the key."""


@dataclass(frozen=True)
class Family:
    """One DiT family.

    name: the registry key (the module name); aliases: other names ``registry.get`` accepts.
    class_names: the model classes of the family, as a config's ``_class_name`` (diffusers) or
        ``architectures`` (transformers) names them.
    keep_fp: module-name patterns (regex fragments over one path component, no dots) of the
        linears a DiT quantizer keeps in floating point by default: a linear stays FP when any
        component of its module path matches one fully (timestep / text / size embedders, adaLN
        modulation, patch embedding). keep_fp_top: the same for the first component only (the
        final projection). ``keep_fp_regex`` joins them into one ``re.search`` pattern.
    timestep_names / latent_names: the forward arguments holding the timestep and the noisy
        latent.
    role_names: role (one of ``ROLE_NAME_KEYS``) -> module-name fragments that mark it, used by
        ``graph.roles`` only where the graph cannot tell a layer's role.
    output_frame_axis: for video families, the frame axis of the denoiser output (the ``frames``
        metric differences along it); None for image families.
    example_inputs: builds example inputs from a config (``InputBuilder``); None when the family
        has no such builder, with the reason in ``inputs_note``.
    """

    name: str
    title: str
    class_names: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    keep_fp: tuple[str, ...] = ()
    keep_fp_top: tuple[str, ...] = ()
    timestep_names: tuple[str, ...] = ("timestep",)
    latent_names: tuple[str, ...] = ("hidden_states",)
    role_names: Mapping[str, tuple[str, ...]] = field(default_factory=dict, hash=False)
    output_frame_axis: int | None = None
    example_inputs: InputBuilder | None = None
    inputs_note: str = ""

    def __post_init__(self):
        unknown = sorted(set(self.role_names) - set(ROLE_NAME_KEYS))
        if unknown:
            raise ValueError(f"family {self.name!r}: unknown role(s) {unknown} in role_names; "
                             f"roles: {ROLE_NAME_KEYS}")
        for p in self.keep_fp + self.keep_fp_top:
            if "." in p:
                raise ValueError(f"family {self.name!r}: keep-FP pattern {p!r} must match within one "
                                 f"path component (no '.')")

    @property
    def keep_fp_regex(self) -> str:
        """This family's keep-FP names as one ``re.search`` pattern over a linear's module path."""
        return keep_fp_regex(self.keep_fp, self.keep_fp_top)


def keep_fp_regex(anywhere: tuple[str, ...], top: tuple[str, ...]) -> str:
    """``(^|\\.)(a|b)(\\.|$)|^(c|d)(\\.|$)``: some path component is one of ``anywhere``, or the
    first is one of ``top``."""
    parts = []
    if anywhere:
        parts.append(r"(^|\.)(" + "|".join(anywhere) + r")(\.|$)")
    if top:
        parts.append(r"^(" + "|".join(top) + r")(\.|$)")
    return "|".join(parts)


# -- helpers of the input builders --------------------------------------------------------------
def config_value(config: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """``config[key]`` (or ``default``); a missing or null value is a ``FamilyConfigError`` naming
    the key."""
    value = config.get(key, default)
    if value is None:
        cls = config.get("_class_name") or "the model"
        raise FamilyConfigError(f"{cls} config has no {key!r}, which the example inputs need; use "
                                f"the Python API with your own inputs")
    return value


def latent_hw(config: Mapping[str, Any], key: str = "sample_size") -> tuple[int, int]:
    """Latent height and width from ``sample_size`` (an int or an [h, w] pair)."""
    size = config_value(config, key)
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def timesteps(batch: int, g: torch.Generator, scale: float = 1000.0) -> torch.Tensor:
    """[batch] fp32 timesteps spread over [0, scale), one per stratum."""
    return (torch.arange(batch) + torch.rand(batch, generator=g)) * (scale / batch)


def text_states(batch: int, width: int, g: torch.Generator, tokens: int = TEXT_TOKENS) -> torch.Tensor:
    """[batch, tokens, width] text-encoder states."""
    return torch.randn(batch, tokens, int(width), generator=g)
