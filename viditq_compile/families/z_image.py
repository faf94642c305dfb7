"""Z-Image (diffusers ``ZImageTransformer2DModel``): a single-stream DiT over caption + image
tokens after separate noise and context refiners; list inputs (one tensor per sample, captions
unpadded) and a list output."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from viditq_compile.families.base import TEXT_TOKENS, Family, config_value, timesteps

LATENT_SIDE = 8
"""Latent side of example inputs (8 x 8: a 64-pixel image)."""


def example_inputs(config: Mapping[str, Any], batch: int, seed: int) -> dict:
    """As ``ZImagePipeline`` calls the transformer: ``x`` a list of per-sample [C, 1, H, W]
    latents, ``t`` = ``(1000 - t) / 1000`` in [0, 1), ``cap_feats`` a list of per-sample caption
    states [T, cap_feat_dim], and the model's first patch sizes."""
    g = torch.Generator().manual_seed(seed)
    side = LATENT_SIDE
    latents = torch.randn(batch, config_value(config, "in_channels"), 1, side, side, generator=g)
    width = config_value(config, "cap_feat_dim")
    return {
        "x": list(latents.unbind(0)),
        "t": timesteps(batch, g, scale=1.0),
        "cap_feats": [torch.randn(TEXT_TOKENS, width, generator=g) for _ in range(batch)],
        "patch_size": int(config_value(config, "all_patch_size")[0]),
        "f_patch_size": int(config_value(config, "all_f_patch_size")[0]),
        "return_dict": False,
    }


FAMILY = Family(
    name="z_image",
    title="Z-Image",
    class_names=("ZImageTransformer2DModel",),
    aliases=("zimage", "z-image"),
    # all_x_embedder.<p>-<f>, all_final_layer.<p>-<f>.{linear,adaLN_modulation.1}, t_embedder,
    # cap_embedder, adaLN_modulation (blocks)
    keep_fp=("all_x_embedder", "t_embedder", "cap_embedder", "adaLN_modulation"),
    keep_fp_top=("all_final_layer",),
    timestep_names=("t",),
    latent_names=("x",),
    role_names={"self_attn": ("attention", "to_[qkv]", "to_out"), "mlp": ("feed_forward",)},
    example_inputs=example_inputs,
)
