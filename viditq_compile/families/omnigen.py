"""OmniGen (diffusers ``OmniGenTransformer2DModel``): a Phi-3 decoder over prompt tokens, a
timestep token and image patches, with a causal-plus-image attention mask and RoPE position
ids."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from viditq_compile.families.base import TEXT_TOKENS, Family, config_value, timesteps


def latent_side(config: Mapping[str, Any]) -> int:
    """Latent side of the example inputs: the model's ``sample_size`` (default 128), at most the
    ``pos_embed_max_size`` patches the position embedding covers."""
    p = config_value(config, "patch_size")
    return min(int(config.get("sample_size") or 128), config_value(config, "pos_embed_max_size") * p) // p * p


def example_inputs(config: Mapping[str, Any], batch: int, seed: int) -> dict:
    """As ``OmniGenPipeline`` calls the transformer for text-to-image: square latents
    [B, C, S, S] (``latent_side``), a timestep in [0, 1), prompt token ids, no input images, a
    full attention mask [B, L, L] and position ids over the prompt + time + image tokens."""
    g = torch.Generator().manual_seed(seed)
    side = latent_side(config)
    p = config_value(config, "patch_size")
    seq = TEXT_TOKENS + 1 + (side // p) ** 2
    return {
        "hidden_states": torch.randn(batch, config_value(config, "in_channels"), side, side, generator=g),
        "timestep": timesteps(batch, g, scale=1.0),
        "input_ids": torch.randint(1, config_value(config, "vocab_size"), (batch, TEXT_TOKENS), generator=g),
        "input_img_latents": [],
        "input_image_sizes": {},
        "attention_mask": torch.ones(batch, seq, seq),
        "position_ids": torch.arange(seq)[None].repeat(batch, 1),
        "return_dict": False,
    }


FAMILY = Family(
    name="omnigen",
    title="OmniGen",
    class_names=("OmniGenTransformer2DModel",),
    # time_token, t_embedder, patch_embedding (conv), norm_out.linear
    keep_fp=("time_token", "t_embedder", "patch_embedding", r"norm\w*"),
    keep_fp_top=(r"proj_out\w*",),
    role_names={"self_attn": ("attn", "to_[qkv]", "to_out"), "mlp": ("mlp",)},
    example_inputs=example_inputs,
)
