"""AuraFlow (diffusers ``AuraFlowTransformer2DModel``): MM-DiT blocks, then single-stream DiT
blocks; the patch embedding is a linear over flattened patches; SwiGLU feed-forwards."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from viditq_compile.families.base import Family, config_value, latent_hw, text_states, timesteps


def example_inputs(config: Mapping[str, Any], batch: int, seed: int) -> dict:
    """As ``AuraFlowPipeline`` calls the transformer at the model's sample size: latents
    [B, C, H, W], Pile-T5 states, timesteps ``t / 1000`` in [0, 1)."""
    g = torch.Generator().manual_seed(seed)
    h, w = latent_hw(config)
    return {
        "hidden_states": torch.randn(batch, config_value(config, "in_channels"), h, w, generator=g),
        "encoder_hidden_states": text_states(batch, config_value(config, "joint_attention_dim"), g),
        "timestep": timesteps(batch, g, scale=1.0),
        "return_dict": False,
    }


FAMILY = Family(
    name="auraflow",
    title="AuraFlow",
    class_names=("AuraFlowTransformer2DModel",),
    # pos_embed.proj (linear patch embedding), context_embedder, time_step_proj.linear_{1,2},
    # norm1(_context).linear, norm_out.linear
    keep_fp=("pos_embed", "context_embedder", "time_step_proj", r"norm\w*"),
    keep_fp_top=(r"proj_out\w*",),
    role_names={"self_attn": ("attn", "to_[qkv]", "to_out"), "mlp": ("ff",)},
    example_inputs=example_inputs,
)
