"""CogVideoX (diffusers ``CogVideoXTransformer3DModel``): full 3D attention over text + video
tokens, expert adaLN for each stream, 3D rotary embeddings (5B) or learned positions (2B)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from viditq_compile.families.base import Family, config_value, timesteps


def latent_frames(config: Mapping[str, Any]) -> int:
    """Latent frames of a ``sample_frames`` video (the VAE compresses time by
    ``temporal_compression_ratio``), padded to a multiple of ``patch_size_t`` (CogVideoX 1.5)."""
    frames = (config_value(config, "sample_frames") - 1) // config_value(config, "temporal_compression_ratio") + 1
    p_t = config.get("patch_size_t")
    return frames + (-frames) % p_t if p_t else frames


def rotary_embedding(config: Mapping[str, Any], frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (cos, sin) tables ``CogVideoXPipeline._prepare_rotary_positional_embeddings`` gives a
    video of the model's sample size."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    p = config_value(config, "patch_size")
    gh, gw = config_value(config, "sample_height") // p, config_value(config, "sample_width") // p
    dim = config_value(config, "attention_head_dim")
    p_t = config.get("patch_size_t")
    if p_t is None:  # CogVideoX 1.0: at the base size the crop region is the whole grid
        return get_3d_rotary_pos_embed(dim, ((0, 0), (gh, gw)), (gh, gw), frames)  # type: ignore[return-value]  # (cos, sin): use_real
    return get_3d_rotary_pos_embed(dim, None, (gh, gw), (frames + p_t - 1) // p_t, grid_type="slice",  # type: ignore[return-value]
                                   max_size=(gh, gw))


def example_inputs(config: Mapping[str, Any], batch: int, seed: int) -> dict:
    """As ``CogVideoXPipeline`` calls the transformer at the model's sample size: latents
    [B, F, C, H, W], T5 states of ``max_text_seq_length`` tokens, timesteps, the rotary tables
    when the model uses them, and ``ofs`` for models with an ofs embedding (1.5 image-to-video)."""
    g = torch.Generator().manual_seed(seed)
    frames = latent_frames(config)
    h, w = config_value(config, "sample_height"), config_value(config, "sample_width")
    kwargs = {
        "hidden_states": torch.randn(batch, frames, config_value(config, "in_channels"), h, w, generator=g),
        "encoder_hidden_states": torch.randn(batch, config_value(config, "max_text_seq_length"),
                                             config_value(config, "text_embed_dim"), generator=g),
        "timestep": timesteps(batch, g),
        "return_dict": False,
    }
    if config.get("use_rotary_positional_embeddings"):
        kwargs["image_rotary_emb"] = rotary_embedding(config, frames)
    if config.get("ofs_embed_dim"):
        kwargs["ofs"] = torch.full((1,), 2.0)
    return kwargs


FAMILY = Family(
    name="cogvideox",
    title="CogVideoX",
    class_names=("CogVideoXTransformer3DModel",),
    # time_embedding, ofs_embedding (1.5), patch_embed (incl. its text_proj), norm1/norm2.linear,
    # norm_out.linear
    keep_fp=("time_embedding", "ofs_embedding", "patch_embed", r"norm\w*"),
    keep_fp_top=(r"proj_out\w*",),
    role_names={"self_attn": ("attn", "to_[qkv]", "to_out"), "mlp": ("ff",)},
    output_frame_axis=1,  # [B, F, C, H, W]
    example_inputs=example_inputs,
)
