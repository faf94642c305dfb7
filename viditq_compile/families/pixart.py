"""PixArt-α / PixArt-Σ (diffusers ``PixArtTransformer2DModel``): adaLN-single, cross-attention to
T5 captions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from viditq_compile.families.base import Family, config_value, latent_hw, text_states, timesteps


def example_inputs(config: Mapping[str, Any], batch: int, seed: int) -> dict:
    """As ``PixArtSigmaPipeline`` calls the transformer: latents [B, C, H, W], caption states,
    timesteps; the image-size conditions of PixArt-α 1024 when the model uses them."""
    g = torch.Generator().manual_seed(seed)
    h, w = latent_hw(config)
    kwargs = {
        "hidden_states": torch.randn(batch, config_value(config, "in_channels"), h, w, generator=g),
        "encoder_hidden_states": text_states(
            batch, config.get("caption_channels") or config_value(config, "cross_attention_dim"), g),
        "timestep": timesteps(batch, g),
        "return_dict": False,
    }
    use_conditions = config.get("use_additional_conditions")
    if use_conditions is None:  # as the model decides it
        use_conditions = config.get("sample_size") == 128
    if use_conditions:  # image size in pixels (VAE factor 8) and aspect ratio
        kwargs["added_cond_kwargs"] = {
            "resolution": torch.tensor([[8.0 * h, 8.0 * w]]).repeat(batch, 1),
            "aspect_ratio": torch.full((batch, 1), h / w),
        }
    return kwargs


FAMILY = Family(
    name="pixart",
    title="PixArt-α / PixArt-Σ",
    class_names=("PixArtTransformer2DModel",),
    aliases=("pixart-alpha", "pixart-sigma"),
    keep_fp=("adaln_single", "caption_projection", "pos_embed"),
    keep_fp_top=(r"proj_out\w*",),
    role_names={"cross_attn": ("attn2",), "self_attn": ("attn", "to_[qkv]", "to_out"), "mlp": ("ff",)},
    example_inputs=example_inputs,
)
