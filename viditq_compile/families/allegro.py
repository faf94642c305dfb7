"""Allegro (diffusers ``AllegroTransformer3DModel``): PixArt-style video DiT (adaLN-single,
cross-attention to T5), 3-D RoPE computed inside."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from viditq_compile.families.base import TEXT_TOKENS, Family, config_value, text_states, timesteps


def example_inputs(config: Mapping[str, Any], batch: int, seed: int) -> dict:
    """As ``AllegroPipeline`` calls the transformer at the model's sample size: video latents
    [B, C, F, H, W] (``sample_frames`` x ``sample_height`` x ``sample_width``), T5 states with an
    all-ones mask, float timesteps in [0, 1000)."""
    g = torch.Generator().manual_seed(seed)
    f, h, w = (config_value(config, k) for k in ("sample_frames", "sample_height", "sample_width"))
    return {
        "hidden_states": torch.randn(batch, config_value(config, "in_channels"), f, h, w, generator=g),
        "encoder_hidden_states": text_states(batch, config_value(config, "caption_channels"), g),
        "timestep": timesteps(batch, g),
        "encoder_attention_mask": torch.ones(batch, TEXT_TOKENS, dtype=torch.int64),
        "return_dict": False,
    }


FAMILY = Family(
    name="allegro",
    title="Allegro",
    class_names=("AllegroTransformer3DModel",),
    # adaln_single.{emb.timestep_embedder,linear}, caption_projection, pos_embed (conv)
    keep_fp=("adaln_single", "caption_projection", "pos_embed"),
    keep_fp_top=(r"proj_out\w*",),
    role_names={"cross_attn": ("attn2",), "self_attn": ("attn", "to_[qkv]", "to_out"), "mlp": ("ff",)},
    output_frame_axis=2,  # [B, C, F, H, W]
    example_inputs=example_inputs,
)
