"""Models of no family here: the conventions of the original research code (facebookresearch/DiT,
whose module names OpenSORA and Latte's own code reuse: ``x_embedder``, ``t_embedder``,
``y_embedder``, ``adaLN_modulation``, ``final_layer``, ``forward(x, t, y)``), of UNets
(``sample``) and of common transformer code (``attention``, ``ffn``, ``feed_forward``). No model
class is found to be of this family; its names widen the defaults every model gets."""

from __future__ import annotations

from viditq_compile.families.base import Family

FAMILY = Family(
    name="generic",
    title="research-code conventions",
    keep_fp=("t_embedder", "y_embedder", "x_embedder", "adaLN_modulation"),
    keep_fp_top=("final_layer",),
    timestep_names=("timestep", "timesteps", "t"),
    latent_names=("x", "sample", "latent", "latents"),
    role_names={"self_attn": ("attention", "qkv", "[qkv]_proj"), "mlp": ("mlp", "ffn", "feed_forward", r"fc\d")},
)
