"""Tiny seeded diffusers pipelines for tests. Each `build_<name>()` returns `(pipe, call_kwargs)`:
`pipe(**call_kwargs, num_inference_steps=..., output_type="latent")` runs on CPU in well under a
second a step.

PixArt-Σ and DiT: the `tests/zoo.py` transformers with a tiny VAE and a scheduler, and no text
encoder (PixArt's calls pass `prompt_embeds` the size of the transformer's caption input).
Flux, SD3, Sana and Wan: the pipeline whole, text encoders included, as tiny randomly initialised
transformers models (CLIP, T5, Gemma2, UMT5) built from small configs, with tokenizers built in
memory from a character vocabulary (no model hub, no network); their call kwargs hold no prompt
(pass `prompt=` / `prompts=`, e.g. `PROMPTS`) and keep the text short (`max_sequence_length`)."""

from __future__ import annotations

import string

import torch

from tests import zoo

PROMPTS = ["a red cat", "two dogs"]
"""Prompts for the text pipelines (any text tokenizes: unknown characters become the unknown token)."""

TEXT_TOKENS = 16
"""Tokens per prompt of every tiny tokenizer (CLIP's model_max_length, the T5 / Gemma / UMT5
pipelines' max_sequence_length)."""

_CHARS = list(string.ascii_lowercase + string.digits + ".,!?'-")


def _clip_tokenizer():
    """A CLIP BPE tokenizer over single characters (no merges), `TEXT_TOKENS` with start and end."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TEXT_TOKENS)


def _t5_tokenizer():
    """A T5 (Unigram) tokenizer over single characters; also Wan's (UMT5) tokenizer."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in _CHARS] + [("\u2581" + c, -2.5) for c in _CHARS]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=TEXT_TOKENS)


def _gemma_tokenizer():
    """A Gemma BPE tokenizer over single characters (no merges)."""
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "\u2581": 5}
    vocab.update({c: len(vocab) + i for i, c in enumerate(_CHARS)})
    return GemmaTokenizer(vocab=vocab, merges=[], model_max_length=TEXT_TOKENS)


def _vocab_size(tokenizer) -> int:
    return len(tokenizer.get_vocab())


def _seeded_encoder(factory, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory().eval()


def _clip(tokenizer, hidden: int, projection: int | None, seed: int):
    """CLIPTextModel (or ...WithProjection when ``projection``): 2 layers, 2 heads."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=_vocab_size(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=2 * TEXT_TOKENS,
                            projection_dim=projection or hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return _seeded_encoder(lambda: cls(config), seed)


def _t5(tokenizer, d_model: int, seed: int, umt5: bool = False):
    """T5EncoderModel (UMT5EncoderModel with ``umt5``): 2 layers, 2 heads of 8."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_cls, cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_cls(vocab_size=_vocab_size(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model,
                        num_layers=2, num_heads=2, relative_attention_num_buckets=8, pad_token_id=0,
                        eos_token_id=1, decoder_start_token_id=0)
    return _seeded_encoder(lambda: cls(config), seed)


def _vae(latent_channels: int = 4):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         block_out_channels=(8,), layers_per_block=1, norm_num_groups=8,
                         down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",)).eval()


def build_pixart_sigma(seed: int = 0, text_encoder: bool = False):
    """PixArtSigmaPipeline over `zoo.build_pixart` (16x16 latent, caption width 64), DPM-Solver++,
    CFG 4.5. Without ``text_encoder``: two prompts' embeddings of 8 tokens, the second padded after
    5. With it: a T5 encoder (d_model 64) and tokenizer, the call kwargs hold no prompt (pass
    `prompt=`), `TEXT_TOKENS` tokens, no resolution binning (the table has no 16-pixel sizes)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    transformer, _ = zoo.build_pixart(seed)
    tokenizer = _t5_tokenizer() if text_encoder else None
    encoder = _t5(tokenizer, 64, seed + 11) if text_encoder else None
    pipe = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=_vae(), transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    if text_encoder:
        return pipe, dict(height=16, width=16, guidance_scale=4.5, use_resolution_binning=False,
                          max_sequence_length=TEXT_TOKENS)
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


def _flow_vae(latent_channels: int = 4):
    """``_vae`` with the shift factor the flow pipelines (Flux, SD3) decode with."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         block_out_channels=(8,), layers_per_block=1, norm_num_groups=8, shift_factor=0.0,
                         down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",)).eval()


def build_flux(seed: int = 0):
    """FluxPipeline: `zoo.build_flux`'s transformer (hidden 64, 2 double + 2 single blocks, guidance
    embedding: no CFG batch) over CLIP (hidden 32: the pooled projection) and T5 (d_model 32: the
    joint attention width) text encoders, an 8x8 image (16 packed latent tokens), 3 steps of
    flow-matching Euler, guidance 3.5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    transformer, _ = zoo.build_flux(seed)
    tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_flow_vae(4),
                        text_encoder=_clip(tokenizer, 32, None, seed + 11), tokenizer=tokenizer,
                        text_encoder_2=_t5(tokenizer_2, 32, seed + 12), tokenizer_2=tokenizer_2,
                        transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(height=8, width=8, guidance_scale=3.5, max_sequence_length=TEXT_TOKENS)


def build_sd3(seed: int = 0):
    """StableDiffusion3Pipeline: the `tests/diffusers_zoo.py` SD3 transformer (hidden 32, qk
    RMSNorm, dual attention in block 0; joint width 32, pooled 32) over two CLIP-with-projection
    encoders (hidden 16, projection 16 each: pooled 16 + 16) and a T5 (d_model 32), an 8x8 image,
    flow-matching Euler, CFG 5.0 (both halves in one batch)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from tests import diffusers_zoo

    transformer, _ = diffusers_zoo.build_sd3(seed)
    tokenizer, tokenizer_2, tokenizer_3 = _clip_tokenizer(), _clip_tokenizer(), _t5_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_flow_vae(4),
        text_encoder=_clip(tokenizer, 16, 16, seed + 11), tokenizer=tokenizer,
        text_encoder_2=_clip(tokenizer_2, 16, 16, seed + 12), tokenizer_2=tokenizer_2,
        text_encoder_3=_t5(tokenizer_3, 32, seed + 13), tokenizer_3=tokenizer_3)
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(height=8, width=8, guidance_scale=5.0, max_sequence_length=TEXT_TOKENS)


def _dc_vae():
    """AutoencoderDC (Sana's deep-compression VAE): 3 stages of 8 channels, 4 latent channels,
    spatial factor 4."""
    from diffusers import AutoencoderDC

    torch.manual_seed(0)
    return AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                         encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                         decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                         encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
                         encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
                         encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
                         downsample_block_type="conv", upsample_block_type="interpolate",
                         decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407).eval()


def build_sana(seed: int = 0):
    """SanaPipeline: the `tests/diffusers_zoo.py` Sana transformer (hidden 32, linear attention,
    caption width 32) over a Gemma2 encoder (hidden 32), a tiny AutoencoderDC, a 32x32 image (8x8
    latent: Sana takes sizes in multiples of 32), flow-matching Euler, CFG 4.5 (one batch); no
    resolution binning, no caption cleaning, no complex human instruction (the tiny vocabulary
    would spell it out a character a token)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline
    from transformers import Gemma2Config, Gemma2Model

    from tests import diffusers_zoo

    transformer, _ = diffusers_zoo.build_sana(seed)
    tokenizer = _gemma_tokenizer()
    config = Gemma2Config(vocab_size=_vocab_size(tokenizer), hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                          max_position_embeddings=4 * TEXT_TOKENS, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=_seeded_encoder(lambda: Gemma2Model(config), seed + 11),
                        vae=_dc_vae(), transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(height=32, width=32, guidance_scale=4.5, max_sequence_length=TEXT_TOKENS,
                      use_resolution_binning=False, clean_caption=False, complex_human_instruction=None)


def _wan_vae():
    """AutoencoderKLWan: base width 3, 4 latent channels, spatial factor 8, temporal factor 4."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                            latents_std=[1.0] * 4).eval()


def build_wan(seed: int = 0):
    """WanPipeline (T2V): the `tests/diffusers_zoo.py` Wan transformer (hidden 32, patch (1, 2, 2),
    text width 32) over a UMT5 encoder (d_model 32), a tiny AutoencoderKLWan, 5 frames of 32x32
    (2 latent frames of 4x4: 8 tokens), flow-matching Euler, CFG 5.0 as two transformer calls a
    step (conditional, then unconditional)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    from tests import diffusers_zoo

    transformer, _ = diffusers_zoo.build_wan(seed)
    tokenizer = _t5_tokenizer()
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=_t5(tokenizer, 32, seed + 11, umt5=True), vae=_wan_vae(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(height=32, width=32, num_frames=5, guidance_scale=5.0, max_sequence_length=TEXT_TOKENS)


BUILDERS = {"pixart_sigma": build_pixart_sigma, "dit": build_dit, "flux": build_flux, "sd3": build_sd3,
            "sana": build_sana, "wan": build_wan}
"""Name -> builder, for tests over every tiny pipeline."""
