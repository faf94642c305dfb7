"""Latte (diffusers ``LatteTransformer3DModel``): text-to-video, spatial and temporal blocks
alternating, PixArt-style adaLN-single."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from viditq_compile.families.base import Family, config_value, latent_hw, text_states, timesteps


def example_inputs(config: Mapping[str, Any], batch: int, seed: int) -> dict:
    """As ``LattePipeline`` calls the transformer: video latents [B, C, F, H, W] with F =
    ``video_length`` (the temporal position embedding pins the frame count), caption states,
    timesteps."""
    g = torch.Generator().manual_seed(seed)
    h, w = latent_hw(config)
    frames = config_value(config, "video_length")
    return {
        "hidden_states": torch.randn(batch, config_value(config, "in_channels"), frames, h, w, generator=g),
        "encoder_hidden_states": text_states(
            batch, config.get("caption_channels") or config_value(config, "cross_attention_dim"), g),
        "timestep": timesteps(batch, g),
        "enable_temporal_attentions": True,
        "return_dict": False,
    }


FAMILY = Family(
    name="latte",
    title="Latte",
    class_names=("LatteTransformer3DModel",),
    keep_fp=("adaln_single", "caption_projection", "pos_embed"),
    keep_fp_top=(r"proj_out\w*",),
    role_names={"cross_attn": ("attn2",), "self_attn": ("attn", "to_[qkv]", "to_out"), "mlp": ("ff",),
                "temporal_attn": ("temp(oral)?",)},
    output_frame_axis=2,  # [B, C, F, H, W]
    example_inputs=example_inputs,
)
