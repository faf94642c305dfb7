"""The models ``viditq quantize --model demo|tiny|digits`` runs, found by the library by name.

``demo/pyproject.toml`` declares each function here in the entry-point group
``viditq_compile.models`` (``demo``, ``tiny``, ``digits``); ``viditq_compile.cli`` looks the
name up with ``importlib.metadata.entry_points`` and never imports this package. A provider
takes the seed of ``--seed`` and returns a ``viditq_compile.cli.ModelSpec``.
"""

from __future__ import annotations

import torch

from viditq_compile.cli import ModelSpec
from viditq_demo.demo_model import DemoConfig, build_demo_model, demo_inputs


def _builtin(name: str, config: DemoConfig, seed: int) -> ModelSpec:
    model = build_demo_model(config, seed=seed)
    return ModelSpec(name, model, lambda batch, s: demo_inputs(config, batch=batch, seed=s))


def demo(seed: int) -> ModelSpec:
    """The ~20 M-parameter PixArt-style demo DiT (``DemoConfig.demo()``), weights from ``seed``."""
    return _builtin("demo", DemoConfig.demo(), seed)


def tiny(seed: int) -> ModelSpec:
    """The 2-layer demo DiT (``DemoConfig.tiny()``, hidden 64), weights from ``seed``."""
    return _builtin("tiny", DemoConfig.tiny(), seed)


def digits_inputs(batch: int, seed: int) -> dict:
    """Inputs of the digits DiT as its sampler passes them (``digits.sample``'s four keywords)."""
    from viditq_demo import digits

    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 1, digits.DEFAULT_SIZE, digits.DEFAULT_SIZE, generator=g),
            "timestep": torch.randint(0, 1000, (batch,), generator=g),
            "class_labels": torch.randint(0, digits.NULL_CLASS + 1, (batch,), generator=g),
            "return_dict": False}


def digits(seed: int) -> ModelSpec:
    """The trained digits DiT (its weights are the assets'; ``seed`` is unused); ``--calibration N``
    records N samples' sampler trajectories."""
    from viditq_demo import digits as d

    return ModelSpec("digits", d.load_demo_dit(), digits_inputs,
                     calibration_calls=lambda n: d.calibration_calls(n=n))
