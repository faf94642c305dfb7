"""HunyuanVideo (diffusers ``HunyuanVideoTransformer3DModel``): Flux-style double- then
single-stream blocks over video tokens, the text refined first by a token refiner (its own
attention blocks, under ``context_embedder``), guidance-distilled."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from viditq_compile.families.base import TEXT_TOKENS, Family, config_value, text_states, timesteps

FRAMES, SIDE = 2, 8
"""Latent frames (times ``patch_size_t``) and side (times ``patch_size``) of example inputs (the
config names no sample size)."""


def example_inputs(config: Mapping[str, Any], batch: int, seed: int) -> dict:
    """As ``HunyuanVideoPipeline`` calls the transformer: video latents [B, C, F, H, W], Llama
    states with an all-ones mask, the pooled CLIP projection, the flow-match timestep in
    [0, 1000), and ``guidance = scale * 1000`` when the model embeds it."""
    g = torch.Generator().manual_seed(seed)
    f = FRAMES * config_value(config, "patch_size_t", 1)
    side = SIDE * config_value(config, "patch_size", 1)
    kwargs = {
        "hidden_states": torch.randn(batch, config_value(config, "in_channels"), f, side, side, generator=g),
        "timestep": timesteps(batch, g),
        "encoder_hidden_states": text_states(batch, config_value(config, "text_embed_dim"), g),
        "encoder_attention_mask": torch.ones(batch, TEXT_TOKENS, dtype=torch.int64),
        "pooled_projections": torch.randn(batch, config_value(config, "pooled_projection_dim"), generator=g),
        "return_dict": False,
    }
    if config.get("guidance_embeds"):
        kwargs["guidance"] = torch.full((batch,), 6000.0)
    return kwargs


FAMILY = Family(
    name="hunyuan_video",
    title="HunyuanVideo",
    class_names=("HunyuanVideoTransformer3DModel",),
    aliases=("hunyuanvideo",),
    # time_text_embed.{timestep,text,guidance}_embedder (also under context_embedder),
    # context_embedder.proj_in, x_embedder (conv), norm1(_context).linear, norm.linear, norm_out.linear
    # (refiner blocks' too). Not context_embedder as a whole: its token refiner's attention and FFN
    # compute (but Flux's "context_embedder" in the union keeps them FP where the graph cannot decide)
    keep_fp=("time_text_embed", "timestep_embedder", "text_embedder", "guidance_embedder", "proj_in", "x_embedder",
             r"norm\w*"),
    keep_fp_top=(r"proj_out\w*",),
    role_names={"self_attn": ("attn", "to_[qkv]", "to_out"), "mlp": ("ff",)},
    output_frame_axis=2,  # [B, C, F, H, W]
    example_inputs=example_inputs,
)
