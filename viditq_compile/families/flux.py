"""Flux (diffusers ``FluxTransformer2DModel``): MM-DiT, joint text + image attention in double-
stream blocks, then single-stream blocks; RoPE from token ids; guidance-distilled variants."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from viditq_compile.families.base import TEXT_TOKENS, Family, config_value, text_states, timesteps

LATENT_SIDE = 8
"""Packed latent tokens per side in example inputs (8 x 8: a 128-pixel image)."""


def example_inputs(config: Mapping[str, Any], batch: int, seed: int) -> dict:
    """As ``FluxPipeline`` calls the transformer: packed latent tokens [B, S, in_channels], T5
    states, the pooled CLIP projection, timesteps in [0, 1] (sigma), 2-D ``img_ids`` / ``txt_ids``,
    and the guidance scale when the model embeds it (FLUX.1-dev)."""
    g = torch.Generator().manual_seed(seed)
    side = LATENT_SIDE
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    kwargs = {
        "hidden_states": torch.randn(batch, side * side, config_value(config, "in_channels"), generator=g),
        "encoder_hidden_states": text_states(batch, config_value(config, "joint_attention_dim"), g),
        "pooled_projections": torch.randn(batch, config_value(config, "pooled_projection_dim"), generator=g),
        "timestep": timesteps(batch, g, scale=1.0),
        "img_ids": img_ids.reshape(side * side, 3),
        "txt_ids": torch.zeros(TEXT_TOKENS, 3),
        "return_dict": False,
    }
    if config.get("guidance_embeds"):
        kwargs["guidance"] = torch.full((batch,), 3.5)
    return kwargs


FAMILY = Family(
    name="flux",
    title="Flux",
    class_names=("FluxTransformer2DModel",),
    # time_text_embed.{timestep,guidance,text}_embedder, context_embedder, x_embedder,
    # norm1(_context).linear, norm.linear, norm_out.linear
    keep_fp=("time_text_embed", "timestep_embedder", "text_embedder", "context_embedder", "x_embedder",
             r"norm\w*"),
    keep_fp_top=(r"proj_out\w*",),
    role_names={"self_attn": ("attn", "to_[qkv]", "to_out", "[qkv]_proj"), "mlp": ("ff", "mlp")},
    example_inputs=example_inputs,
)
