"""Lumina-Next and Lumina-Image 2.0 (diffusers ``LuminaNextDiT2DModel``,
``Lumina2Transformer2DModel``): Next-DiT, grouped-query attention with qk norm, SwiGLU
feed-forwards, sandwich norms with tanh-gated modulation; Lumina-Next cross-attends to Gemma
captions, Lumina 2 refines caption and image tokens then attends jointly."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from viditq_compile.families.base import TEXT_TOKENS, Family, config_value, latent_hw, text_states, timesteps


def example_inputs(config: Mapping[str, Any], batch: int, seed: int) -> dict:
    """As ``LuminaPipeline`` / ``Lumina2Pipeline`` call the transformer at the model's sample
    size: latents [B, C, H, W], timesteps ``1 - t / 1000`` in [0, 1), caption states with an
    all-ones mask; Lumina-Next also gets the 384 x 384 RoPE table and ``cross_attention_kwargs={}``
    as its pipeline passes them (``None`` crashes)."""
    g = torch.Generator().manual_seed(seed)
    h, w = latent_hw(config)
    kwargs: dict[str, Any] = {
        "hidden_states": torch.randn(batch, config_value(config, "in_channels"), h, w, generator=g),
        "timestep": timesteps(batch, g, scale=1.0),
    }
    if "cap_feat_dim" in config:  # Lumina 2
        kwargs["encoder_hidden_states"] = text_states(batch, config_value(config, "cap_feat_dim"), g)
        kwargs["encoder_attention_mask"] = torch.ones(batch, TEXT_TOKENS, dtype=torch.bool)
    else:
        from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

        head_dim = config_value(config, "hidden_size") // config_value(config, "num_attention_heads")
        kwargs["encoder_hidden_states"] = text_states(batch, config_value(config, "cross_attention_dim"), g)
        kwargs["encoder_mask"] = torch.ones(batch, TEXT_TOKENS, dtype=torch.int64)
        kwargs["image_rotary_emb"] = get_2d_rotary_pos_embed_lumina(
            head_dim, 384, 384, linear_factor=config.get("scaling_factor") or 1.0)
        kwargs["cross_attention_kwargs"] = {}
    kwargs["return_dict"] = False
    return kwargs


FAMILY = Family(
    name="lumina",
    title="Lumina-Next / Lumina-Image 2.0",
    class_names=("LuminaNextDiT2DModel", "Lumina2Transformer2DModel"),
    aliases=("lumina-next", "lumina2"),
    # patch_embedder.proj (Next) / x_embedder (2), time_caption_embed.{timestep_embedder,
    # caption_embedder}, norm1.linear, norm_out.linear_{1,2} (modulation, final projection)
    keep_fp=("patch_embedder", "x_embedder", "time_caption_embed", r"norm\w*"),
    role_names={"cross_attn": ("attn2",), "self_attn": ("attn", "to_[qkv]", "to_out"), "mlp": ("feed_forward",)},
    example_inputs=example_inputs,
)
