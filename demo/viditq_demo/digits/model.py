"""The demo DiT's configuration, noise schedule and asset loading."""

from __future__ import annotations

import json
import os

import torch

from viditq_demo.digits.classifier import DigitClassifier
from viditq_demo.digits.data import ASSETS, DEFAULT_SIZE, NUM_CLASSES

DIT_WEIGHTS = "dit.safetensors"
DIT_CONFIG_FILE = "dit_config.json"
CLASSIFIER_WEIGHTS = "classifier.safetensors"

# diffusers DiTTransformer2DModel keyword arguments (written to assets/dit_config.json)
DIT_CONFIG = {
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 4,
    "sample_size": DEFAULT_SIZE,
    "patch_size": 4,
    "num_embeds_ada_norm": NUM_CLASSES,
    "activation_fn": "gelu-approximate",
    "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False,
    "norm_num_groups": 32,
    "attention_bias": True,
    "dropout": 0.0,
}

# the training noise schedule (DDPM, epsilon prediction); samplers are made from it
SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "clip_sample": True,
    "clip_sample_range": 1.0,
}


def build_dit(config: dict | None = None):
    """A freshly initialised ``DiTTransformer2DModel`` (fp32) of the demo's (or the given) config."""
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(**(DIT_CONFIG if config is None else config))


def _asset(name: str) -> str:
    path = os.path.join(ASSETS, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing asset {path} (run scripts/train_digits.py --out {ASSETS})")
    return path


def load_demo_dit():
    """The trained demo ``DiTTransformer2DModel``: eval mode, fp32, CPU, weights from the assets.

    Call it as ``model(hidden_states=x [B, 1, 16, 16], timestep=t [B] int64, class_labels=y [B]
    int64, return_dict=False)``; label 10 is the null (unconditional) class. It predicts epsilon.
    """
    from safetensors.torch import load_file

    with open(_asset(DIT_CONFIG_FILE)) as f:
        config = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    model = build_dit(config)
    state = {k: v.float() for k, v in load_file(_asset(DIT_WEIGHTS)).items()}
    model.load_state_dict(state, strict=True)
    return model.float().eval()


def load_classifier() -> DigitClassifier:
    """The trained digit classifier (eval mode, fp32): input [B, 1, 16, 16] in [-1, 1];
    ``forward`` -> [B, 10] logits, ``features`` -> [B, 128]."""
    from safetensors.torch import load_file

    model = DigitClassifier(DEFAULT_SIZE)
    model.load_state_dict({k: v.float() for k, v in load_file(_asset(CLASSIFIER_WEIGHTS)).items()}, strict=True)
    return model.eval()


@torch.no_grad()
def classifier_accuracy(classifier: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                        batch_size: int = 512) -> float:
    """Fraction of ``images`` the classifier labels as ``labels``."""
    hits = 0
    for i in range(0, len(images), batch_size):
        hits += int((classifier(images[i:i + batch_size]).argmax(-1) == labels[i:i + batch_size]).sum())
    return hits / max(len(images), 1)
