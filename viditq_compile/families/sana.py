"""Sana (diffusers ``SanaTransformer2DModel``): linear self-attention, cross-attention to Gemma
captions, GLUMBConv (convolutional) feed-forwards, PixArt-style adaLN-single."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from viditq_compile.families.base import TEXT_TOKENS, Family, config_value, latent_hw, text_states, timesteps


def example_inputs(config: Mapping[str, Any], batch: int, seed: int) -> dict:
    """As ``SanaPipeline`` calls the transformer at the model's sample size: latents
    [B, C, H, W], caption states with their (all-ones) attention mask, the flow-match timestep
    in [0, 1000)."""
    g = torch.Generator().manual_seed(seed)
    h, w = latent_hw(config)
    return {
        "hidden_states": torch.randn(batch, config_value(config, "in_channels"), h, w, generator=g),
        "encoder_hidden_states": text_states(batch, config_value(config, "caption_channels"), g),
        "encoder_attention_mask": torch.ones(batch, TEXT_TOKENS, dtype=torch.int64),
        "timestep": timesteps(batch, g),
        "return_dict": False,
    }


FAMILY = Family(
    name="sana",
    title="Sana",
    class_names=("SanaTransformer2DModel",),
    # time_embed.{emb.timestep_embedder,linear}, caption_projection, patch_embed (conv)
    keep_fp=("time_embed", "caption_projection", "patch_embed"),
    keep_fp_top=(r"proj_out\w*",),
    role_names={"cross_attn": ("attn2",), "self_attn": ("attn", "to_[qkv]", "to_out")},
    example_inputs=example_inputs,
)
