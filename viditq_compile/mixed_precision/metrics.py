"""Damage metrics of the sensitivity analysis: how far a quantized model output is from the
floating-point one, by the property each layer role is responsible for.

ViDiT-Q's metric-decoupled mixed precision scores each group of layers by the metric of what it
affects. Here each metric is a noise-to-signal ratio (``|ref - approx|^2 / |ref|^2``, 0 = exact,
``10^(-SQNR/10)``), so the damages of different roles are on one scale and add up:

- ``output``: the whole denoiser output (visual quality: self/spatial attention, MLP);
- ``cfg``: the classifier-free-guidance direction ``cond - uncond`` (text alignment:
  cross-attention). The sampler multiplies it by the guidance scale, and it is small next to the
  output, so damage that output SQNR hardly sees can still erase the prompt;
- ``frames``: the frame-to-frame differences along the frame axis of a video output (temporal
  consistency: temporal attention).

A metric is any callable ``metric(reference, approx) -> float`` (or
``metric(reference, approx, call)``, with ``call`` the ``(args, kwargs)`` of the model call) that
returns a damage >= 0, smaller is better; e.g. one minus a CLIP score computed with the user's own
model.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

from torch import Tensor

from viditq_compile.families import registry as families
from viditq_compile.numerics.quant import noise_to_signal

MetricFn = Callable[..., float]


class MetricError(ValueError):
    """A metric cannot score this output (wrong shape for it, or it returned a bad value)."""


def output_error(reference: Tensor, approx: Tensor) -> float:
    """Noise-to-signal ratio of the whole output."""
    return noise_to_signal(reference, approx)


def cfg_direction(out: Tensor) -> Tensor:
    """``cond - uncond`` of a batch laid out as diffusers pipelines do: the unconditional half
    first, then the conditional half (``torch.cat([negative, positive])``)."""
    b = out.shape[0] if out.dim() else 0
    if b < 2 or b % 2:
        raise MetricError(f"the cfg metric needs a batch of unconditional + conditional halves, "
                          f"got an output of shape {tuple(out.shape)}")
    return out[b // 2:] - out[:b // 2]


def cfg_error(reference: Tensor, approx: Tensor) -> float:
    """Noise-to-signal ratio of the guidance direction ``cond - uncond``."""
    return noise_to_signal(cfg_direction(reference), cfg_direction(approx))


def frame_differences(out: Tensor, frame_dim: int) -> Tensor:
    """``out[..., f+1, ...] - out[..., f, ...]`` along ``frame_dim``."""
    if not -out.dim() <= frame_dim < out.dim() or out.shape[frame_dim] < 2:
        raise MetricError(f"the frames metric needs >= 2 frames along dim {frame_dim}, got an "
                          f"output of shape {tuple(out.shape)}")
    n = out.shape[frame_dim]
    return out.narrow(frame_dim, 1, n - 1) - out.narrow(frame_dim, 0, n - 1)


class FrameError:
    """Noise-to-signal ratio of the frame-to-frame differences along ``frame_dim`` (default
    ``families.DEFAULT_OUTPUT_FRAME_AXIS``, 2: diffusers video transformers return
    ``[B, C, F, H, W]``; ``FrameError.for_family`` takes a family's own axis)."""

    def __init__(self, frame_dim: int = families.DEFAULT_OUTPUT_FRAME_AXIS):
        if isinstance(frame_dim, bool) or not isinstance(frame_dim, int):
            raise TypeError(f"frame_dim must be an int, got {frame_dim!r}")
        self.frame_dim = frame_dim
        self.__name__ = f"frames(dim={frame_dim})"

    @classmethod
    def for_family(cls, family: str) -> FrameError:
        """The frames metric along the output frame axis of a video family (``families``), e.g.
        ``FrameError.for_family("cogvideox")`` for its ``[B, F, C, H, W]`` outputs."""
        axis = families.get(family).output_frame_axis
        if axis is None:
            raise ValueError(f"family {family!r} is not a video family: its outputs have no frame axis")
        return cls(axis)

    def __call__(self, reference: Tensor, approx: Tensor) -> float:
        return noise_to_signal(frame_differences(reference, self.frame_dim),
                               frame_differences(approx, self.frame_dim))


BUILTIN: dict[str, MetricFn] = {"output": output_error, "cfg": cfg_error, "frames": FrameError()}
"""Metrics by name."""

ROLE_METRIC = {"cross_attn": "cfg", "temporal_attn": "frames", "self_attn": "output",
               "mlp": "output", "other": "output"}
"""The metric each layer role is scored by unless the user says otherwise."""


def metric_name(metric: Any) -> str:
    for name, fn in BUILTIN.items():
        if metric is fn:
            return name
    return getattr(metric, "__name__", type(metric).__name__)


def resolve_metric(metric: str | MetricFn, what: str) -> MetricFn:
    """A built-in name or a callable; ``what`` names the setting in errors."""
    if isinstance(metric, str):
        if metric not in BUILTIN:
            raise ValueError(f"{what}: unknown metric {metric!r}; built-in metrics: {sorted(BUILTIN)} "
                             f"(or pass a callable metric(reference, approx) -> damage)")
        return BUILTIN[metric]
    if not callable(metric):
        raise TypeError(f"{what}: a metric must be a name or a callable, got {type(metric).__name__}")
    return metric


def _takes_call(fn: MetricFn) -> bool:
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        var = any(p.kind is p.VAR_POSITIONAL for p in inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    return var or len(params) >= 3


def score(metric: MetricFn, reference: Tensor, approx: Tensor, call: Any) -> float:
    """Run ``metric`` and check that it returned a damage (a float >= 0, inf allowed)."""
    value = metric(reference, approx, call) if _takes_call(metric) else metric(reference, approx)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise MetricError(f"metric {metric_name(metric)} returned {value!r}, not a number") from None
    if math.isnan(value) or value < 0:
        raise MetricError(f"metric {metric_name(metric)} returned {value!r}; a damage is a number "
                          f">= 0 (smaller is better)")
    return value
