"""Cosmos world foundation models (diffusers ``CosmosTransformer3DModel``): video DiT with
self- and cross-attention (T5), AdaLN-LoRA modulation (a low-rank pair per norm), 3-D RoPE plus a
learnable position embedding, EDM preconditioning."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from viditq_compile.families.base import Family, config_value, text_states

FRAMES, SIDE = 2, 8
"""Latent frames (times the temporal patch) and side (times the spatial patch) of example inputs."""
FPS = 30


def example_inputs(config: Mapping[str, Any], batch: int, seed: int) -> dict:
    """As ``CosmosTextToWorldPipeline`` calls the transformer: video latents [B, C, F, H, W], T5
    states, the EDM noise input ``0.25 * log(sigma)`` for sigma log-uniform in [0.002, 80], ``fps``
    30, and the all-zeros pixel padding mask when the model concatenates one
    (``concat_padding_mask``; that path resizes with torchvision)."""
    g = torch.Generator().manual_seed(seed)
    pt, ph, pw = config_value(config, "patch_size")
    h, w = SIDE * ph, SIDE * pw
    sigma = torch.exp(torch.rand(batch, generator=g) * 10.6 - 6.2)
    kwargs: dict[str, Any] = {
        "hidden_states": torch.randn(batch, config_value(config, "in_channels"), FRAMES * pt, h, w, generator=g),
        "timestep": 0.25 * sigma.log(),
        "encoder_hidden_states": text_states(batch, config_value(config, "text_embed_dim"), g),
        "fps": FPS,
        "return_dict": False,
    }
    if config_value(config, "concat_padding_mask", True):
        kwargs["padding_mask"] = torch.zeros(1, 1, 8 * h, 8 * w)
    return kwargs


FAMILY = Family(
    name="cosmos",
    title="Cosmos",
    class_names=("CosmosTransformer3DModel",),
    # patch_embed.proj, time_embed.t_embedder, norm{1,2,3}.linear_{1,2} (AdaLN-LoRA), norm_out
    keep_fp=("patch_embed", "time_embed", "t_embedder", r"norm\w*"),
    keep_fp_top=(r"proj_out\w*",),
    role_names={"cross_attn": ("attn2",), "self_attn": ("attn", "to_[qkv]", "to_out"), "mlp": ("ff",)},
    output_frame_axis=2,  # [B, C, F, H, W]
    example_inputs=example_inputs,
)
