"""HiDream-I1 (diffusers ``HiDreamImageTransformer2DModel``): Flux-like double- then single-stream
blocks with mixture-of-experts feed-forwards, conditioned on T5 and per-block Llama-3 hidden
states."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from viditq_compile.families.base import Family, config_value, text_states, timesteps


def latent_side(config: Mapping[str, Any]) -> int:
    """Latent side of the example inputs: half the model's ``max_resolution`` (a 512-pixel image for
    HiDream-I1's 128), square (non-square latents are padded to ``max_resolution``), a multiple of
    the patch size."""
    res = config_value(config, "max_resolution")
    p = config_value(config, "patch_size")
    return max(p, int(min(res)) // 2 // p * p)


def example_inputs(config: Mapping[str, Any], batch: int, seed: int) -> dict:
    """As ``HiDreamImagePipeline`` calls the transformer: square latents [B, C, S, S]
    (``latent_side``), the flow-match ``timesteps`` in [0, 1000), T5 states, the stacked Llama-3
    hidden states [layers, B, T, D] (as many layers as ``llama_layers`` indexes), the pooled CLIP
    embedding."""
    g = torch.Generator().manual_seed(seed)
    side = latent_side(config)
    t5_dim, llama_dim = config_value(config, "caption_channels")
    layers = max(config_value(config, "llama_layers")) + 1
    llama = torch.stack([text_states(batch, llama_dim, g) for _ in range(layers)])
    return {
        "hidden_states": torch.randn(batch, config_value(config, "in_channels"), side, side, generator=g),
        "timesteps": timesteps(batch, g),
        "encoder_hidden_states_t5": text_states(batch, t5_dim, g),
        "encoder_hidden_states_llama3": llama,
        "pooled_embeds": torch.randn(batch, config_value(config, "text_emb_dim"), generator=g),
        "return_dict": False,
    }


FAMILY = Family(
    name="hidream",
    title="HiDream-I1",
    class_names=("HiDreamImageTransformer2DModel",),
    # t_embedder, p_embedder (pooled), x_embedder, caption_projection.{i}, adaLN_modulation,
    # final_layer.{linear,adaLN_modulation}; the MoE router is a parameter, not a linear
    keep_fp=("t_embedder", "p_embedder", "x_embedder", "caption_projection", "adaLN_modulation"),
    keep_fp_top=("final_layer",),
    timestep_names=("timesteps",),
    role_names={"self_attn": ("attn", "to_[qkv]", "to_out"), "mlp": ("ff",)},
    example_inputs=example_inputs,
)
