"""Tiny seeded diffusers pipelines for tests: the `tests/zoo.py` transformers with a tiny VAE and a
scheduler, and no text encoder (the calls pass `prompt_embeds` the size of the transformer's
caption input instead; no model hub here). Each `build_<name>()` returns `(pipe, call_kwargs)`:
`pipe(**call_kwargs, num_inference_steps=..., output_type="latent")` runs on CPU in well under a
second a step."""

from __future__ import annotations

import torch

from tests import zoo


def _vae(latent_channels: int = 4):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         block_out_channels=(8,), layers_per_block=1, norm_num_groups=8,
                         down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",)).eval()


def build_pixart_sigma(seed: int = 0):
    """PixArtSigmaPipeline over `zoo.build_pixart` (16x16 latent, 8 caption tokens of width 64),
    DPM-Solver++, CFG 4.5; two prompts' embeddings, the second padded after 5 tokens."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    transformer, _ = zoo.build_pixart(seed)
    pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=_vae(), transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed + 7)
    mask = torch.ones(2, 8, dtype=torch.int64)
    mask[1, 5:] = 0
    kwargs = dict(prompt_embeds=torch.randn(2, 8, 64, generator=g), prompt_attention_mask=mask,
                  negative_prompt_embeds=torch.randn(2, 8, 64, generator=g),
                  negative_prompt_attention_mask=torch.ones(2, 8, dtype=torch.int64),
                  negative_prompt=None, height=16, width=16, guidance_scale=4.5, use_resolution_binning=False)
    return pipe, kwargs


def build_dit(seed: int = 0):
    """DiTPipeline over a `zoo.build_dit`-sized DiT with the 1000 ImageNet classes the pipeline's
    null label (1000) assumes, DDIM, CFG 4.0; class labels given by the caller."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    transformer = zoo._seeded(lambda: DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=zoo.NUM_LAYERS,
        sample_size=8, patch_size=2, num_embeds_ada_norm=1000), seed)
    pipe = DiTPipeline(transformer=transformer, vae=_vae(transformer.config.in_channels),
                       scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(guidance_scale=4.0)
