"""Qwen-Image (diffusers ``QwenImageTransformer2DModel``): MM-DiT with per-stream modulation
(``img_mod`` / ``txt_mod``) and MLPs, Qwen2.5-VL text states, 3-D multimodal RoPE over packed
2 x 2 latent patches."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from viditq_compile.families.base import TEXT_TOKENS, Family, config_value, text_states, timesteps

LATENT_SIDE = 8
"""Packed latent tokens per side in example inputs (8 x 8: a 128-pixel image)."""


def example_inputs(config: Mapping[str, Any], batch: int, seed: int) -> dict:
    """As ``QwenImagePipeline`` calls the transformer: packed latent tokens [B, S, in_channels],
    text states with an all-ones mask, timesteps ``t / 1000`` in [0, 1), ``img_shapes`` and the
    guidance scale when the model embeds it. The pipeline passes one (frames, rows, cols) grid per
    sample but the RoPE reads the first only, so ``img_shapes`` holds one grid (a list whose length
    followed the batch would pin the batch of an exported program), or one per sample for
    ``zero_cond_t`` models, whose modulation reads each."""
    g = torch.Generator().manual_seed(seed)
    side = LATENT_SIDE
    kwargs = {
        "hidden_states": torch.randn(batch, side * side, config_value(config, "in_channels"), generator=g),
        "encoder_hidden_states": text_states(batch, config_value(config, "joint_attention_dim"), g),
        "encoder_hidden_states_mask": torch.ones(batch, TEXT_TOKENS, dtype=torch.int64),
        "timestep": timesteps(batch, g, scale=1.0),
        "img_shapes": [[(1, side, side)]] * (batch if config.get("zero_cond_t") else 1),
        "return_dict": False,
    }
    if config.get("guidance_embeds"):
        kwargs["guidance"] = torch.full((batch,), 4.0)
    return kwargs


FAMILY = Family(
    name="qwenimage",
    title="Qwen-Image",
    class_names=("QwenImageTransformer2DModel",),
    aliases=("qwen-image",),
    # time_text_embed.timestep_embedder, img_in, txt_in, {img,txt}_mod.1, norm_out.linear
    keep_fp=("time_text_embed", "timestep_embedder", "img_in", "txt_in", "img_mod", "txt_mod", r"norm\w*"),
    keep_fp_top=(r"proj_out\w*",),
    role_names={"self_attn": ("attn", "to_[qkv]", "to_out"), "mlp": ("mlp",)},
    example_inputs=example_inputs,
)
