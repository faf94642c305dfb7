"""Hunyuan-DiT (diffusers ``HunyuanDiT2DModel``): U-ViT-style long skips, cross-attention to
bilingual CLIP and mT5 states, the timestep embedding fused with an attention-pooled mT5 vector,
image-meta sizes and a style id; 2-D RoPE."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from viditq_compile.families.base import Family, config_value, latent_hw, timesteps


def crop_region(grid: tuple[int, int], base: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``HunyuanDiTPipeline``'s ``get_resize_crop_region_for_grid`` (its module imports
    ``transformers``)."""
    h, w = grid
    if h / w > 1:
        rh, rw = base, int(round(base / h * w))
    else:
        rw, rh = base, int(round(base / w * h))
    top, left = int(round((base - rh) / 2.0)), int(round((base - rw) / 2.0))
    return (top, left), (top + rh, left + rw)


def example_inputs(config: Mapping[str, Any], batch: int, seed: int) -> dict:
    """As ``HunyuanDiTPipeline`` calls the transformer at the model's sample size: latents
    [B, C, H, W], CLIP states of ``text_len`` and mT5 states of ``text_len_t5`` tokens (the model
    pins both lengths) with all-ones masks, image-meta sizes (pixels, VAE factor 8), style 0, the
    2-D RoPE tables, and integer DDPM timesteps as floats."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    g = torch.Generator().manual_seed(seed)
    h, w = latent_hw(config)
    p = config_value(config, "patch_size")
    heads = config_value(config, "num_attention_heads")
    text_len, text_len_t5 = config_value(config, "text_len"), config_value(config, "text_len_t5")
    grid = (h // p, w // p)
    rope = get_2d_rotary_pos_embed(config_value(config, "hidden_size") // heads, crop_region(grid, 512 // 8 // p),
                                   grid, output_type="pt")
    meta = torch.tensor([[8.0 * h, 8.0 * w, 8.0 * h, 8.0 * w, 0.0, 0.0]]).repeat(batch, 1)
    return {
        "hidden_states": torch.randn(batch, config_value(config, "in_channels"), h, w, generator=g),
        "timestep": timesteps(batch, g).floor(),
        "encoder_hidden_states": torch.randn(batch, text_len, config_value(config, "cross_attention_dim"), generator=g),
        "text_embedding_mask": torch.ones(batch, text_len, dtype=torch.int64),
        "encoder_hidden_states_t5": torch.randn(batch, text_len_t5, config_value(config, "cross_attention_dim_t5"),
                                                generator=g),
        "text_embedding_mask_t5": torch.ones(batch, text_len_t5, dtype=torch.int64),
        "image_meta_size": meta,
        "style": torch.zeros(batch, dtype=torch.int64),
        "image_rotary_emb": rope,
        "return_dict": False,
    }


FAMILY = Family(
    name="hunyuan_dit",
    title="Hunyuan-DiT",
    class_names=("HunyuanDiT2DModel",),
    aliases=("hunyuandit",),
    # text_embedder (mT5 projection), time_extra_emb.{timestep_embedder,pooler,extra_embedder},
    # pos_embed (conv), norm1.linear, norm_out.linear; the long-skip skip_linear is compute
    keep_fp=("text_embedder", "time_extra_emb", "pos_embed", r"norm\w*"),
    keep_fp_top=(r"proj_out\w*",),
    role_names={"cross_attn": ("attn2",), "self_attn": ("attn", "to_[qkv]", "to_out"), "mlp": ("ff",)},
    example_inputs=example_inputs,
)
