"""EasyAnimate V5 (diffusers ``EasyAnimateTransformer3DModel``): MM-DiT over video and text
tokens (text-side FFNs), joint modulation per block, 3-D RoPE."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from viditq_compile.families.base import Family, config_value, text_states, timesteps

FRAMES = 2
"""Latent frames of example inputs (the config names none)."""


def example_inputs(config: Mapping[str, Any], batch: int, seed: int) -> dict:
    """As ``EasyAnimatePipeline`` calls the transformer at the model's sample size: video latents
    [B, C, F, H, W] (``sample_height`` x ``sample_width``), Qwen2-VL states (T5 states too for
    models with ``text_embed_dim_t5``), the flow-match timestep in [0, 1000)."""
    g = torch.Generator().manual_seed(seed)
    h, w = config_value(config, "sample_height"), config_value(config, "sample_width")
    kwargs = {
        "hidden_states": torch.randn(batch, config_value(config, "in_channels"), FRAMES, h, w, generator=g),
        "timestep": timesteps(batch, g),
        "encoder_hidden_states": text_states(batch, config_value(config, "text_embed_dim"), g),
        "return_dict": False,
    }
    if config.get("text_embed_dim_t5"):
        kwargs["encoder_hidden_states_t5"] = text_states(batch, config["text_embed_dim_t5"], g)
    return kwargs


FAMILY = Family(
    name="easyanimate",
    title="EasyAnimate",
    class_names=("EasyAnimateTransformer3DModel",),
    # time_embedding, text_proj (and text_proj_t5), patch_embed (conv), norm1 / norm2.linear,
    # norm_out.linear
    keep_fp=("time_embedding", r"text_proj\w*", "patch_embed", r"norm\w*"),
    keep_fp_top=(r"proj_out\w*",),
    role_names={"self_attn": ("attn", "to_[qkv]", "to_out"), "mlp": ("ff",)},
    output_frame_axis=2,  # [B, C, F, H, W]
    example_inputs=example_inputs,
)
