"""OpenSORA 1.2 STDiT3 (OpenSORA's own code, not a diffusers class): spatial and temporal blocks
alternating, each with cross-attention to the caption; adaLN-single modulation from ``t_block``."""

from __future__ import annotations

from viditq_compile.families.base import Family

FAMILY = Family(
    name="opensora",
    title="OpenSORA STDiT3",
    class_names=("STDiT3",),  # the ``architectures`` of its transformers-style config.json
    aliases=("stdit3", "open-sora"),
    # t_embedder.mlp, fps_embedder.mlp, t_block, y_embedder.y_proj (caption MLP), x_embedder
    # (patch conv), final_layer.linear
    keep_fp=("t_embedder", "fps_embedder", "t_block", "y_embedder", "x_embedder"),
    keep_fp_top=("final_layer",),
    timestep_names=("timestep",),
    latent_names=("x", "hidden_states"),
    role_names={"cross_attn": ("cross",), "self_attn": ("attn", "qkv", "[qkv]_linear"),
                "mlp": ("mlp", r"fc\d"), "temporal_attn": ("temp(oral)?",)},
    output_frame_axis=2,  # [B, C, T, H, W]
    inputs_note="STDiT3 is defined by OpenSORA's code, not by diffusers; quantize it with the Python "
                "API (viditq_compile.quantize(model, args, kwargs)) on the inputs its sampler passes",
)
