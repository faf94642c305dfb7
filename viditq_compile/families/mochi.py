"""Mochi 1 (diffusers ``MochiTransformer3DModel``): asymmetric MM-DiT over video and T5 tokens,
the conditioning an attention-pooled caption plus the timestep, 3-D RoPE."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from viditq_compile.families.base import TEXT_TOKENS, Family, config_value, text_states, timesteps

FRAMES, SIDE = 2, 8
"""Latent frames and side of example inputs (Mochi's config names no sample size)."""


def example_inputs(config: Mapping[str, Any], batch: int, seed: int) -> dict:
    """As ``MochiPipeline`` calls the transformer: video latents [B, C, F, H, W]
    (``FRAMES`` x ``SIDE`` x ``SIDE``), T5 states (at most ``max_sequence_length`` tokens) with an
    all-ones mask, the flow-match timestep in [0, 1000)."""
    g = torch.Generator().manual_seed(seed)
    tokens = min(TEXT_TOKENS, config_value(config, "max_sequence_length"))
    return {
        "hidden_states": torch.randn(batch, config_value(config, "in_channels"), FRAMES, SIDE, SIDE, generator=g),
        "encoder_hidden_states": text_states(batch, config_value(config, "text_embed_dim"), g, tokens),
        "timestep": timesteps(batch, g),
        "encoder_attention_mask": torch.ones(batch, tokens, dtype=torch.int64),
        "return_dict": False,
    }


FAMILY = Family(
    name="mochi",
    title="Mochi 1",
    class_names=("MochiTransformer3DModel",),
    # time_embed.{timestep_embedder,pooler,caption_proj}, patch_embed (conv), norm1(_context).linear(_1),
    # norm_out.linear
    keep_fp=("time_embed", "patch_embed", r"norm\w*"),
    keep_fp_top=(r"proj_out\w*",),
    role_names={"self_attn": ("attn", "to_[qkv]", "to_out"), "mlp": ("ff",)},
    output_frame_axis=2,  # [B, C, F, H, W]
    example_inputs=example_inputs,
)
