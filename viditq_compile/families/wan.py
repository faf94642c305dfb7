"""Wan 2.1 / 2.2 and SkyReels-V2 (diffusers ``WanTransformer3DModel``,
``SkyReelsV2Transformer3DModel``): self-attention over video tokens, cross-attention to umT5
states (plus CLIP image tokens for image-to-video), one shared time projection giving every
block's modulation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from viditq_compile.families.base import Family, config_value, text_states, timesteps

FRAMES, SIDE = 2, 8
"""Latent frames (times the temporal patch) and side (times the spatial patch) of example inputs
(the config names no sample size)."""
IMAGE_TOKENS = 257
"""CLIP ViT-H image tokens of image-to-video models (``image_dim``)."""


def example_inputs(config: Mapping[str, Any], batch: int, seed: int) -> dict:
    """As ``WanPipeline`` / ``SkyReelsV2Pipeline`` call the transformer: video latents
    [B, C, F, H, W], umT5 states, the flow-match timestep in [0, 1000); CLIP image states for
    image-to-video models (``image_dim``; ``pos_embed_seq_len`` tokens for first-last-frame
    models); ``fps`` for SkyReels models that inject it."""
    g = torch.Generator().manual_seed(seed)
    pt, ph, pw = config_value(config, "patch_size")
    kwargs = {
        "hidden_states": torch.randn(batch, config_value(config, "in_channels"), FRAMES * pt, SIDE * ph, SIDE * pw,
                                     generator=g),
        "timestep": timesteps(batch, g),
        "encoder_hidden_states": text_states(batch, config_value(config, "text_dim"), g),
        "return_dict": False,
    }
    if config.get("image_dim"):
        tokens = config.get("pos_embed_seq_len") or IMAGE_TOKENS
        kwargs["encoder_hidden_states_image"] = torch.randn(batch, tokens, config["image_dim"], generator=g)
    if config.get("inject_sample_info"):
        kwargs["fps"] = torch.full((batch,), 24, dtype=torch.int64)
    return kwargs


FAMILY = Family(
    name="wan",
    title="Wan / SkyReels-V2",
    class_names=("WanTransformer3DModel", "SkyReelsV2Transformer3DModel"),
    aliases=("skyreels", "skyreels-v2", "skyreels_v2", "wan2.1", "wan2.2"),
    # condition_embedder.{time_embedder,time_proj,text_embedder,image_embedder}, patch_embedding
    # (conv); the blocks' modulation is a scale_shift_table parameter
    keep_fp=("condition_embedder", "patch_embedding", "fps_embedding", "fps_projection"),
    keep_fp_top=(r"proj_out\w*",),
    role_names={"cross_attn": ("attn2",), "self_attn": ("attn", "to_[qkv]", "to_out"), "mlp": ("ffn",)},
    output_frame_axis=2,  # [B, C, F, H, W]
    example_inputs=example_inputs,
)
