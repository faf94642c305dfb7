"""Chroma (diffusers ``ChromaTransformer2DModel``): a pruned Flux, with the per-block modulation
linears replaced by one distilled-guidance approximator whose output every block slices."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from viditq_compile.families.base import TEXT_TOKENS, Family, config_value, text_states, timesteps

LATENT_SIDE = 8
"""Packed latent tokens per side in example inputs (8 x 8: a 128-pixel image)."""


def example_inputs(config: Mapping[str, Any], batch: int, seed: int) -> dict:
    """As ``ChromaPipeline`` calls the transformer: packed latent tokens [B, S, in_channels], T5
    states, timesteps ``t / 1000`` in [0, 1), 2-D ``img_ids`` / ``txt_ids`` and the all-ones bool
    attention mask over text + image tokens."""
    g = torch.Generator().manual_seed(seed)
    side = LATENT_SIDE
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    return {
        "hidden_states": torch.randn(batch, side * side, config_value(config, "in_channels"), generator=g),
        "encoder_hidden_states": text_states(batch, config_value(config, "joint_attention_dim"), g),
        "timestep": timesteps(batch, g, scale=1.0),
        "img_ids": img_ids.reshape(side * side, 3),
        "txt_ids": torch.zeros(TEXT_TOKENS, 3),
        "attention_mask": torch.ones(batch, TEXT_TOKENS + side * side, dtype=torch.bool),
        "return_dict": False,
    }


FAMILY = Family(
    name="chroma",
    title="Chroma",
    class_names=("ChromaTransformer2DModel",),
    # distilled_guidance_layer (the approximator: all modulation), context_embedder, x_embedder;
    # proj_out only at the top (single blocks' proj_out is compute)
    keep_fp=("distilled_guidance_layer", "context_embedder", "x_embedder", r"norm\w*"),
    keep_fp_top=(r"proj_out\w*",),
    role_names={"self_attn": ("attn", "to_[qkv]", "to_out"), "mlp": ("ff",)},
    example_inputs=example_inputs,
)
