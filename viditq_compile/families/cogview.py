"""CogView3-Plus and CogView4 (diffusers ``CogView3PlusTransformer2DModel``,
``CogView4Transformer2DModel``): full attention over text + image tokens with expert adaLN per
stream (as CogVideoX), SDXL-style size conditions; CogView4 adds 2-D RoPE and flow matching."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from viditq_compile.families.base import Family, config_value, latent_hw, text_states, timesteps


def example_inputs(config: Mapping[str, Any], batch: int, seed: int) -> dict:
    """As ``CogView3PlusPipeline`` / ``CogView4Pipeline`` call the transformer at the model's
    sample size: latents [B, C, H, W], GLM / T5 states, the size conditions (``original_size`` =
    ``target_size`` in pixels, VAE factor 8; ``crop_coords`` 0); integer DDIM timesteps (CogView3)
    or the flow-match t in [0, 1000) (CogView4, the config with ``rope_axes_dim``)."""
    g = torch.Generator().manual_seed(seed)
    h, w = latent_hw(config)
    t = timesteps(batch, g)
    px = torch.tensor([[8.0 * h, 8.0 * w]]).repeat(batch, 1)
    return {
        "hidden_states": torch.randn(batch, config_value(config, "in_channels"), h, w, generator=g),
        "encoder_hidden_states": text_states(batch, config_value(config, "text_embed_dim"), g),
        "timestep": t if "rope_axes_dim" in config else t.long(),
        "original_size": px,
        "target_size": px.clone(),
        "crop_coords": torch.zeros(batch, 2),
        "return_dict": False,
    }


FAMILY = Family(
    name="cogview",
    title="CogView3-Plus / CogView4",
    class_names=("CogView3PlusTransformer2DModel", "CogView4Transformer2DModel"),
    aliases=("cogview3", "cogview3plus", "cogview4"),
    # patch_embed.{proj,text_proj}, time_condition_embed.{timestep,condition}_embedder,
    # norm1.linear, norm_out.linear
    keep_fp=("patch_embed", "time_condition_embed", r"norm\w*"),
    keep_fp_top=(r"proj_out\w*",),
    role_names={"self_attn": ("attn", "to_[qkv]", "to_out"), "mlp": ("ff",)},
    example_inputs=example_inputs,
)
