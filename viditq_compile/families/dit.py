"""DiT (diffusers ``DiTTransformer2DModel``): class-conditional, adaLN-Zero in every block."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from viditq_compile.families.base import Family, config_value, latent_hw, timesteps


def example_inputs(config: Mapping[str, Any], batch: int, seed: int) -> dict:
    """As ``DiTPipeline`` calls the transformer: latents [B, C, H, W], timesteps, class labels."""
    g = torch.Generator().manual_seed(seed)
    h, w = latent_hw(config)
    num_classes = config_value(config, "num_embeds_ada_norm")
    return {
        "hidden_states": torch.randn(batch, config_value(config, "in_channels"), h, w, generator=g),
        "timestep": timesteps(batch, g),
        "class_labels": torch.randint(0, num_classes, (batch,), generator=g),
        "return_dict": False,
    }


FAMILY = Family(
    name="dit",
    title="DiT",
    class_names=("DiTTransformer2DModel",),
    # norm1.emb (timestep + class embedders) and norm1.linear (adaLN-Zero), proj_out_1 / _2
    keep_fp=("emb", "timestep_embedder", "class_embedder", r"norm\w*", "pos_embed"),
    keep_fp_top=(r"proj_out\w*",),
    role_names={"self_attn": ("attn", "to_[qkv]", "to_out"), "mlp": ("ff",)},
    example_inputs=example_inputs,
)
