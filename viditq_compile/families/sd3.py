"""Stable Diffusion 3 / 3.5 (diffusers ``SD3Transformer2DModel``): MM-DiT, joint text + image
attention with a separate weight set per stream, adaLN-Zero modulation from the timestep and
the pooled CLIP projection; SD3.5 adds a second image self-attention (``attn2``) in early
blocks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from viditq_compile.families.base import Family, config_value, latent_hw, text_states, timesteps


def example_inputs(config: Mapping[str, Any], batch: int, seed: int) -> dict:
    """As ``StableDiffusion3Pipeline`` calls the transformer at the model's sample size: latents
    [B, C, H, W], joint CLIP + T5 states, the pooled CLIP projection, the flow-match timestep
    in [0, 1000)."""
    g = torch.Generator().manual_seed(seed)
    h, w = latent_hw(config)
    return {
        "hidden_states": torch.randn(batch, config_value(config, "in_channels"), h, w, generator=g),
        "encoder_hidden_states": text_states(batch, config_value(config, "joint_attention_dim"), g),
        "pooled_projections": torch.randn(batch, config_value(config, "pooled_projection_dim"), generator=g),
        "timestep": timesteps(batch, g),
        "return_dict": False,
    }


FAMILY = Family(
    name="sd3",
    title="Stable Diffusion 3 / 3.5",
    class_names=("SD3Transformer2DModel",),
    aliases=("stable-diffusion-3", "sd3.5"),
    # time_text_embed.{timestep,text}_embedder, context_embedder, pos_embed (conv), norm1(_context).linear,
    # norm_out.linear
    keep_fp=("time_text_embed", "timestep_embedder", "text_embedder", "context_embedder", "pos_embed", r"norm\w*"),
    keep_fp_top=(r"proj_out\w*",),
    # attn2 is SD3.5's second *self*-attention; the graph places it (it reads no text)
    role_names={"self_attn": ("attn", "to_[qkv]", "to_out"), "mlp": ("ff",)},
    example_inputs=example_inputs,
)
