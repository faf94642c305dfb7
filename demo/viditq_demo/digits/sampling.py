"""Sampling the demo DiT with classifier-free guidance, and recorded calls for quantization."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from viditq_demo.digits.data import DEFAULT_SIZE, NULL_CLASS, NUM_CLASSES
from viditq_demo.digits.model import SCHEDULE

DEFAULT_NUM_STEPS = 25
DEFAULT_GUIDANCE = 2.0
MAX_STEPS: int = SCHEDULE["num_train_timesteps"]  # type: ignore[assignment]  # an int


def _check_int(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {value!r}")
    return value


def make_scheduler(num_steps: int = DEFAULT_NUM_STEPS):
    """The sampler: diffusers ``DDIMScheduler`` (eta 0, deterministic) on the training schedule,
    "trailing" timestep spacing (the first step is t=999), ``set_timesteps(num_steps)`` done."""
    from diffusers import DDIMScheduler

    num_steps = _check_int("num_steps", num_steps, 1, MAX_STEPS)
    scheduler = DDIMScheduler(**SCHEDULE, timestep_spacing="trailing", set_alpha_to_one=True)
    scheduler.set_timesteps(num_steps)  # type: ignore[attr-defined]  # mypy sees the no-torch dummy
    return scheduler


def _model_output(out: Any) -> Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, Tensor) and hasattr(out, "sample"):
        out = out.sample
    if not isinstance(out, Tensor):
        raise TypeError(f"the transformer returned {type(out).__name__}, expected a tensor, a tuple/list "
                        f"whose first item is one, or an object with .sample")
    return out


def _check_labels(labels) -> Tensor:
    if not isinstance(labels, Tensor):
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"labels must be a 1-D int64 tensor, got {labels!r}") from e
    if labels.dim() != 1 or labels.numel() == 0 or labels.dtype.is_floating_point or labels.dtype.is_complex \
            or labels.dtype == torch.bool:
        raise ValueError(f"labels must be a non-empty 1-D integer tensor, got {labels.dtype} of shape "
                         f"{tuple(labels.shape)}")
    bad = labels[(labels < 0) | (labels > NULL_CLASS)]
    if bad.numel():
        raise ValueError(f"labels must lie in 0..{NUM_CLASSES - 1} (or {NULL_CLASS}, unconditional), got "
                         f"{bad[0].item()}")
    return labels.to(torch.int64)


def _check_seeds(seeds, n: int) -> list[int]:
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence):
        raise ValueError(f"seeds must be a list of {n} ints, got {seeds!r}")
    if len(seeds) != n:
        raise ValueError(f"len(seeds) must equal len(labels) = {n}, got {len(seeds)}")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**63:
            raise ValueError(f"seeds must be ints in [0, 2**63), got {s!r}")
    return list(seeds)


def initial_noise(seeds: Sequence[int], size: int = DEFAULT_SIZE) -> Tensor:
    """[B, 1, size, size]: sample i's noise is ``torch.randn(1, size, size, generator=
    torch.Generator().manual_seed(seeds[i]))``, so it does not depend on the rest of the batch."""
    return torch.stack([torch.randn(1, size, size, generator=torch.Generator().manual_seed(s)) for s in seeds])


@torch.no_grad()
def sample(transformer, labels, seeds, *, num_steps: int = DEFAULT_NUM_STEPS,
           guidance_scale: float = DEFAULT_GUIDANCE, scheduler=None) -> Tensor:
    """Generate one 16x16 digit per label: [B, 1, 16, 16] float32 in [-1, 1].

    transformer: any callable taken as ``transformer(hidden_states=x, timestep=t, class_labels=y,
        return_dict=False)`` (always these four keywords): the diffusers model, ``torch.compile`` of
        it, or a ``viditq_compile.quantize`` result exported with ``example_call()``. Its output may
        be a tensor, a tuple/list (item 0 is used) or have ``.sample``; it must predict epsilon.
    labels: [B] integers in 0..9 (10 = the null class: an unconditional sample).
    seeds: B ints; sample i starts from ``initial_noise([seeds[i]])``.
    guidance_scale: classifier-free guidance ``eps = uncond + g * (cond - uncond)``; unless it is
        1, each call holds the batch [unconditional half (label 10); conditional half], 2B rows,
        with ``timestep`` an int64 [2B] tensor. g = 1: B rows, conditional only (B = 1 runs as
        two identical rows, so that every call has a batch >= 2).
    scheduler: a diffusers scheduler to use instead of ``make_scheduler`` (its ``set_timesteps
        (num_steps)`` is called here, which resets its state).
    All B samples run as one batch.
    """
    labels = _check_labels(labels)
    seeds = _check_seeds(seeds, len(labels))
    num_steps = _check_int("num_steps", num_steps, 1, MAX_STEPS)
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
            or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
    if scheduler is None:
        scheduler = make_scheduler(num_steps)
    else:
        scheduler.set_timesteps(num_steps)
    x = initial_noise(seeds) * scheduler.init_noise_sigma
    cfg = guidance_scale != 1
    class_labels = torch.cat([torch.full_like(labels, NULL_CLASS), labels]) if cfg else labels
    # a single row (one label, no guidance) runs as two identical rows: programs exported with
    # a dynamic batch (torch.export specializes sizes 0 and 1) take batches >= 2 only
    pad = class_labels.shape[0] == 1
    if pad:
        class_labels = class_labels.repeat(2)
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(torch.cat([x, x]) if cfg or pad else x, t)
        timestep = torch.full((inp.shape[0],), int(t), dtype=torch.int64)
        out = _model_output(transformer(hidden_states=inp, timestep=timestep, class_labels=class_labels,
                                        return_dict=False)).float()
        if out.shape != inp.shape:
            raise ValueError(f"the transformer output has shape {tuple(out.shape)}, expected {tuple(inp.shape)}")
        if pad:
            out = out[:1]
        if cfg:
            uncond, cond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        x = scheduler.step(out, t, x).prev_sample
    return x.clamp(-1.0, 1.0)


def balanced_labels(per_class: int) -> Tensor:
    """[10 * per_class] int64: 0, 1, ..., 9, 0, 1, ... (each digit ``per_class`` times)."""
    _check_int("per_class", per_class, 1, 10**6)
    return torch.arange(NUM_CLASSES).repeat(per_class)


def calibration_calls(n: int = 4, seed: int = 0, *, num_steps: int = DEFAULT_NUM_STEPS,
                      guidance_scale: float = DEFAULT_GUIDANCE, transformer=None) -> list[tuple[tuple, dict]]:
    """The demo DiT's calls along one sampling trajectory: ``num_steps`` ``(args, kwargs)`` pairs
    (args ``()``, kwargs ``hidden_states`` [2n, 1, 16, 16], ``timestep`` [2n], ``class_labels``
    [2n], ``return_dict=False``), for ``viditq_compile.calibrate`` / ``quantize(calibration=...)``
    / ``search``. n samples of n distinct-as-possible digits (a seeded permutation of 0..9) from
    seeded noise; transformer: the model to record (default ``load_demo_dit()``)."""
    from viditq_compile.calibration.observe import record_calls
    from viditq_demo.digits.model import load_demo_dit

    n = _check_int("n", n, 1, 4096)
    seed = _check_int("seed", seed, 0, 2**63 - 1)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randperm(NUM_CLASSES, generator=g).repeat(-(-n // NUM_CLASSES))[:n]
    seeds = [int(s) for s in torch.randint(0, 2**31 - 1, (n,), generator=g)]
    model = load_demo_dit() if transformer is None else transformer
    return record_calls(model, lambda m: sample(m, labels, seeds, num_steps=num_steps,
                                                guidance_scale=guidance_scale))


def example_call(batch: int = 4, seed: int = 0) -> tuple[tuple, dict]:
    """One representative call ``(args, kwargs)`` for ``viditq_compile.quantize(model, args,
    kwargs)``: a CFG batch (first half label 10, second half digits) at mixed timesteps, with the
    keywords ``sample`` uses. batch: an even int >= 2 (4 keeps the batch dimension dynamic)."""
    batch = _check_int("batch", batch, 2, 4096)
    if batch % 2:
        raise ValueError(f"batch must be even (unconditional + conditional halves), got {batch}")
    g = torch.Generator().manual_seed(seed)
    half = batch // 2
    labels = torch.randint(0, NUM_CLASSES, (half,), generator=g)
    t = torch.randint(0, MAX_STEPS, (half,), generator=g)
    kwargs = {
        "hidden_states": torch.randn(batch, 1, DEFAULT_SIZE, DEFAULT_SIZE, generator=g),
        "timestep": torch.cat([t, t]),
        "class_labels": torch.cat([torch.full_like(labels, NULL_CLASS), labels]),
        "return_dict": False,
    }
    return (), kwargs
