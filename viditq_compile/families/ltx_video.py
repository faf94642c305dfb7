"""LTX-Video (diffusers ``LTXVideoTransformer3DModel``): PixArt-style blocks (adaLN-single,
cross-attention to T5) over packed video tokens, 3-D RoPE from the grid sizes passed as ints."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from viditq_compile.families.base import TEXT_TOKENS, Family, config_value, text_states, timesteps

FRAMES, SIDE = 2, 8
"""Latent frames and side of example inputs, in patches (the config names no sample size)."""
VAE_TEMPORAL, VAE_SPATIAL, FPS = 8, 32, 25
"""LTX-Video's VAE compression and the pipeline's default frame rate (``rope_interpolation_scale``)."""


def example_inputs(config: Mapping[str, Any], batch: int, seed: int) -> dict:
    """As ``LTXPipeline`` calls the transformer: packed video tokens [B, F*H*W, in_channels], T5
    states with an all-ones mask, the flow-match timestep in [0, 1000), the grid (``num_frames``,
    ``height``, ``width``: Python ints, baked into an exported program) and
    ``rope_interpolation_scale`` (VAE compression over 25 fps)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, FRAMES * SIDE * SIDE, config_value(config, "in_channels"), generator=g),
        "encoder_hidden_states": text_states(batch, config_value(config, "caption_channels"), g),
        "timestep": timesteps(batch, g),
        "encoder_attention_mask": torch.ones(batch, TEXT_TOKENS, dtype=torch.int64),
        "num_frames": FRAMES,
        "height": SIDE,
        "width": SIDE,
        "rope_interpolation_scale": (VAE_TEMPORAL / FPS, VAE_SPATIAL, VAE_SPATIAL),
        "return_dict": False,
    }


FAMILY = Family(
    name="ltx_video",
    title="LTX-Video",
    class_names=("LTXVideoTransformer3DModel",),
    aliases=("ltx", "ltxvideo", "ltx-video"),
    # time_embed.{emb.timestep_embedder,linear}, caption_projection; proj_in (patch embedding) and
    # proj_out at the top
    keep_fp=("time_embed", "caption_projection"),
    keep_fp_top=("proj_in", r"proj_out\w*"),
    role_names={"cross_attn": ("attn2",), "self_attn": ("attn", "to_[qkv]", "to_out"), "mlp": ("ff",)},
    output_frame_axis=None,  # packed tokens [B, F*H*W, C]: no frame axis
    example_inputs=example_inputs,
)
