"""DRAFT"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tests.zoo import _seeded

Size = tuple[int, ...]
BATCH = 2
NUM_LAYERS = 2


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed + 1)


def _flow_t(batch: int, g: torch.Generator) -> torch.Tensor:
    """Flow-matching sigmas in (0.05, 1), float32, one per sample."""
    return 0.05 + 0.95 * torch.rand(batch, generator=g)


def _ids2d(h: int, w: int) -> torch.Tensor:
    """Flux-style 2-D position ids [h * w, 3]: (0, row, col)."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def _mask(batch: int, length: int) -> torch.Tensor:
    """A padded text mask (int64): odd samples have their last 3 tokens padded."""
    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[1::2, length - 3 :] = 0
    return mask


# --------------------------------------------------------------------------------------------
# image models
# --------------------------------------------------------------------------------------------


def build_sd3(seed: int = 0, batch: int = BATCH, size: Size | None = None) -> tuple[nn.Module, dict]:
    """SD3Transformer2DModel (SD3.5-style: qk RMSNorm, dual attention in block 0): hidden 32
    (2 heads x 16), patch 2, 2 joint blocks (the last one `context_pre_only`), 8 text tokens of
    width 32, pooled width 32. Timestep = the flow-match scheduler's t in [0, 1000] (float)."""
    from diffusers import SD3Transformer2DModel

    h, w = size or SIZES["sd3"][0]
    model = _seeded(lambda: SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32, out_channels=4,
        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm"), seed)
    g = _gen(seed)
    return model, {
        "hidden_states": torch.randn(batch, 4, h, w, generator=g),
        "encoder_hidden_states": torch.randn(batch, 8, 32, generator=g),
        "pooled_projections": torch.randn(batch, 32, generator=g),
        "timestep": _flow_t(batch, g) * 1000,
        "return_dict": False,
    }


def build_auraflow(seed: int = 0, batch: int = BATCH, size: Size | None = None) -> tuple[nn.Module, dict]:
    """AuraFlowTransformer2DModel: hidden 32 (2 heads x 16), 1 MMDiT + 1 single DiT block, patch 2,
    8 text tokens of width 32. AuraFlowPipeline passes `t / 1000` (float in [0, 1])."""
    from diffusers import AuraFlowTransformer2DModel

    h, w = size or SIZES["auraflow"][0]
    model = _seeded(lambda: AuraFlowTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
        out_channels=4, pos_embed_max_size=256), seed)
    g = _gen(seed)
    return model, {
        "hidden_states": torch.randn(batch, 4, h, w, generator=g),
        "encoder_hidden_states": torch.randn(batch, 8, 32, generator=g),
        "timestep": _flow_t(batch, g),
        "return_dict": False,
    }


def build_sana(seed: int = 0, batch: int = BATCH, size: Size | None = None) -> tuple[nn.Module, dict]:
    """SanaTransformer2DModel: hidden 32 (2 heads x 16; linear self-attention, GLUMBConv conv FFN),
    2 blocks, patch 1, 8 caption tokens of width 32 with a padded mask. SanaPipeline passes the
    flow-match t in [0, 1000] (float) and `encoder_attention_mask`."""
    from diffusers import SanaTransformer2DModel

    h, w = size or SIZES["sana"][0]
    model = _seeded(lambda: SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=NUM_LAYERS,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=32,
        mlp_ratio=2.5, sample_size=8, patch_size=1), seed)
    g = _gen(seed)
    return model, {
        "hidden_states": torch.randn(batch, 4, h, w, generator=g),
        "encoder_hidden_states": torch.randn(batch, 8, 32, generator=g),
        "encoder_attention_mask": _mask(batch, 8),
        "timestep": _flow_t(batch, g) * 1000,
        "return_dict": False,
    }


def _hunyuan_crop_region(src: tuple[int, int], tgt: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """HunyuanDiTPipeline's `get_resize_crop_region_for_grid` (copied: importing the pipeline module
    needs `transformers`)."""
    h, w = src
    if h / w > 1:
        rh, rw = tgt, int(round(tgt / h * w))
    else:
        rw, rh = tgt, int(round(tgt / w * h))
    top, left = int(round((tgt - rh) / 2.0)), int(round((tgt - rw) / 2.0))
    return (top, left), (top + rh, left + rw)


def build_hunyuandit(seed: int = 0, batch: int = BATCH, size: Size | None = None) -> tuple[nn.Module, dict]:
    """HunyuanDiT2DModel: hidden 32 (2 heads x 16), 4 blocks (block 3 takes the long skip from
    block 0; fewer blocks have no skip), patch 2, learned sigma; CLIP states 8 x 32 and T5 states 8 x 32 (`text_len` /
    `text_len_t5` = 8, the model pins them), image-meta sizes and style as
    HunyuanDiTPipeline passes them, 2-D RoPE from `get_2d_rotary_pos_embed`; timestep: the DDPM
    integer t cast to the latent dtype (float)."""
    from diffusers import HunyuanDiT2DModel
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    h, w = size or SIZES["hunyuandit"][0]
    model = _seeded(lambda: HunyuanDiT2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, patch_size=2, sample_size=8,
        hidden_size=32, num_layers=4, cross_attention_dim=32, cross_attention_dim_t5=32,
        pooled_projection_dim=16, text_len=8, text_len_t5=8), seed)
    g = _gen(seed)
    grid = (h // 2, w // 2)
    rope = get_2d_rotary_pos_embed(16, _hunyuan_crop_region(grid, 4), grid, output_type="pt")
    meta = torch.tensor([[8.0 * h, 8.0 * w, 8.0 * h, 8.0 * w, 0.0, 0.0]]).repeat(batch, 1)
    return model, {
        "hidden_states": torch.randn(batch, 4, h, w, generator=g),
        "timestep": torch.randint(0, 1000, (batch,), generator=g).float(),
        "encoder_hidden_states": torch.randn(batch, 8, 32, generator=g),
        "text_embedding_mask": _mask(batch, 8),
        "encoder_hidden_states_t5": torch.randn(batch, 8, 32, generator=g),
        "text_embedding_mask_t5": _mask(batch, 8),
        "image_meta_size": meta,
        "style": torch.zeros(batch, dtype=torch.int64),
        "image_rotary_emb": rope,
        "return_dict": False,
    }


def build_lumina_next(seed: int = 0, batch: int = BATCH, size: Size | None = None) -> tuple[nn.Module, dict]:
    """LuminaNextDiT2DModel: hidden 32 (2 heads x 16, 1 KV head), 2 blocks, patch 2, learned sigma,
    8 caption tokens of width 32 with a padded mask; LuminaPipeline passes `1 - t / 1000` (float
    in [0, 1]) and the 384 x 384 RoPE table from `get_2d_rotary_pos_embed_lumina`."""
    from diffusers import LuminaNextDiT2DModel
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    h, w = size or SIZES["lumina_next"][0]
    model = _seeded(lambda: LuminaNextDiT2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=NUM_LAYERS, num_attention_heads=2,
        num_kv_heads=1, multiple_of=16, norm_eps=1e-5, learn_sigma=True, qk_norm=True, cross_attention_dim=32,
        scaling_factor=1.0), seed)
    g = _gen(seed)
    return model, {
        "hidden_states": torch.randn(batch, 4, h, w, generator=g),
        "timestep": _flow_t(batch, g),
        "encoder_hidden_states": torch.randn(batch, 8, 32, generator=g),
        "encoder_mask": _mask(batch, 8),
        "image_rotary_emb": get_2d_rotary_pos_embed_lumina(16, 384, 384),
        "cross_attention_kwargs": {},
        "return_dict": False,
    }


def build_lumina2(seed: int = 0, batch: int = BATCH, size: Size | None = None) -> tuple[nn.Module, dict]:
    """Lumina2Transformer2DModel: hidden 32 (2 heads x 16, 1 KV head), 1 noise-refiner +
    1 context-refiner + 2 main blocks, patch 2, 8 caption tokens of width 32 with a padded bool
    mask; Lumina2Pipeline passes `1 - t / 1000` (float in [0, 1])."""
    from diffusers import Lumina2Transformer2DModel

    h, w = size or SIZES["lumina2"][0]
    model = _seeded(lambda: Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=NUM_LAYERS, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(8, 4, 4), axes_lens=(64, 64, 64),
        cap_feat_dim=32), seed)
    g = _gen(seed)
    return model, {
        "hidden_states": torch.randn(batch, 4, h, w, generator=g),
        "timestep": _flow_t(batch, g),
        "encoder_hidden_states": torch.randn(batch, 8, 32, generator=g),
        "encoder_attention_mask": _mask(batch, 8).bool(),
        "return_dict": False,
    }


_HIDREAM_LLAMA = 2  # llama3 hidden-state layers fed to the model (one per block)


def build_hidream(seed: int = 0, batch: int = BATCH, size: Size | None = None) -> tuple[nn.Module, dict]:
    """HiDreamImageTransformer2DModel: hidden 32 (2 heads x 16), 1 double + 1 single block, MoE
    feed-forward (2 routed experts, both active, plus a shared expert), patch 2; T5 states 8 x 16,
    Llama-3 states [2 layers, B, 8, 8], pooled width 16. HiDreamImagePipeline passes the
    flow-match t in [0, 1000] (float) as `timesteps`."""
    from diffusers import HiDreamImageTransformer2DModel

    h, w = size or SIZES["hidream"][0]
    model = _seeded(lambda: HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, caption_channels=[16, 8], text_emb_dim=16, num_routed_experts=2,
        num_activated_experts=2, axes_dims_rope=(8, 4, 4), max_resolution=(16, 16),
        llama_layers=list(range(_HIDREAM_LLAMA)), force_inference_output=True), seed)
    g = _gen(seed)
    return model, {
        "hidden_states": torch.randn(batch, 4, h, w, generator=g),
        "timesteps": _flow_t(batch, g) * 1000,
        "encoder_hidden_states_t5": torch.randn(batch, 8, 16, generator=g),
        "encoder_hidden_states_llama3": torch.randn(_HIDREAM_LLAMA, batch, 8, 8, generator=g),
        "pooled_embeds": torch.randn(batch, 16, generator=g),
        "return_dict": False,
    }


def build_qwenimage(seed: int = 0, batch: int = BATCH, size: Size | None = None) -> tuple[nn.Module, dict]:
    """QwenImageTransformer2DModel: hidden 32 (2 heads x 16, RoPE 8+4+4), 2 MMDiT blocks; an
    (H, W) latent of 4 channels packed 2x2 into H/2 * W/2 tokens of 16 channels, 8 text tokens
    of width 32 with a padded mask, `img_shapes` per sample. QwenImagePipeline passes
    `t / 1000` (float in [0, 1])."""
    from diffusers import QwenImageTransformer2DModel

    h, w = size or SIZES["qwenimage"][0]
    model = _seeded(lambda: QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=NUM_LAYERS, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(8, 4, 4)), seed)
    g = _gen(seed)
    return model, {
        "hidden_states": torch.randn(batch, (h // 2) * (w // 2), 16, generator=g),
        "encoder_hidden_states": torch.randn(batch, 8, 32, generator=g),
        "encoder_hidden_states_mask": _mask(batch, 8),
        "timestep": _flow_t(batch, g),
        "img_shapes": [[(1, h // 2, w // 2)]] * batch,
        "return_dict": False,
    }


def build_chroma(seed: int = 0, batch: int = BATCH, size: Size | None = None) -> tuple[nn.Module, dict]:
    """ChromaTransformer2DModel: hidden 32 (2 heads x 16, RoPE 4+6+6), 1 double + 1 single
    block, distilled-guidance approximator of width 32 (1 layer); an (H, W) latent of 4 channels
    packed 2x2 into tokens of 16 channels, 8 text tokens of width 32. ChromaPipeline passes
    `t / 1000` (float in [0, 1]), 2-D `img_ids` / `txt_ids`, and a bool mask over text + image
    tokens."""
    from diffusers import ChromaTransformer2DModel

    h, w = size or SIZES["chroma"][0]
    model = _seeded(lambda: ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6), approximator_num_channels=16,
        approximator_hidden_dim=32, approximator_layers=1), seed)
    g = _gen(seed)
    tokens = (h // 2) * (w // 2)
    mask = torch.cat([_mask(batch, 8).bool(), torch.ones(batch, tokens, dtype=torch.bool)], dim=1)
    return model, {
        "hidden_states": torch.randn(batch, tokens, 16, generator=g),
        "encoder_hidden_states": torch.randn(batch, 8, 32, generator=g),
        "timestep": _flow_t(batch, g),
        "img_ids": _ids2d(h // 2, w // 2),
        "txt_ids": torch.zeros(8, 3),
        "attention_mask": mask,
        "return_dict": False,
    }


def build_zimage(seed: int = 0, batch: int = BATCH, size: Size | None = None) -> tuple[nn.Module, dict]:
    """ZImageTransformer2DModel: hidden 32 (2 heads x 16, RoPE 8+4+4), 1 noise-refiner +
    1 context-refiner + 2 main blocks, patch 2. Inputs as ZImagePipeline passes them: `x` a list
    of per-sample [C, 1, H, W] latents, `cap_feats` a list of per-sample [L_i, 32] caption states
    (unpadded: 8 and 5 tokens), `t` = `(1000 - t) / 1000` (float in [0, 1]). Output: a list of
    per-sample [C, 1, H, W] tensors."""
    from diffusers import ZImageTransformer2DModel

    h, w = size or SIZES["zimage"][0]
    model = _seeded(lambda: ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=NUM_LAYERS,
        n_refiner_layers=1, n_heads=2, n_kv_heads=2, qk_norm=True, cap_feat_dim=32, axes_dims=[8, 4, 4],
        axes_lens=[256, 32, 32]), seed)
    g = _gen(seed)
    return model, {
        "x": list(torch.randn(batch, 4, 1, h, w, generator=g).unbind(0)),
        "t": _flow_t(batch, g),
        "cap_feats": [torch.randn(8 if i % 2 == 0 else 5, 32, generator=g) for i in range(batch)],
        "return_dict": False,
    }


def build_cogview3plus(seed: int = 0, batch: int = BATCH, size: Size | None = None) -> tuple[nn.Module, dict]:
    """CogView3PlusTransformer2DModel: hidden 32 (2 heads x 16), 2 blocks, patch 2, 8 text tokens
    of width 32, SDXL-style size conditions (`original_size`, `target_size`, `crop_coords`).
    CogView3PlusPipeline (DDIM) passes integer timesteps (int64)."""
    from diffusers import CogView3PlusTransformer2DModel

    h, w = size or SIZES["cogview3plus"][0]
    model = _seeded(lambda: CogView3PlusTransformer2DModel(
        patch_size=2, in_channels=4, num_layers=NUM_LAYERS, attention_head_dim=16, num_attention_heads=2,
        out_channels=4, text_embed_dim=32, time_embed_dim=32, condition_dim=8, pos_embed_max_size=16,
        sample_size=8), seed)
    g = _gen(seed)
    px = torch.tensor([[8.0 * h, 8.0 * w]]).repeat(batch, 1)
    return model, {
        "hidden_states": torch.randn(batch, 4, h, w, generator=g),
        "encoder_hidden_states": torch.randn(batch, 8, 32, generator=g),
        "timestep": torch.randint(0, 1000, (batch,), generator=g),
        "original_size": px,
        "target_size": px.clone(),
        "crop_coords": torch.zeros(batch, 2),
        "return_dict": False,
    }


def build_cogview4(seed: int = 0, batch: int = BATCH, size: Size | None = None) -> tuple[nn.Module, dict]:
    """CogView4Transformer2DModel: hidden 32 (2 heads x 16, 2-D RoPE), 2 blocks, patch 2, 8 text
    tokens of width 32, size conditions; CogView4Pipeline passes the flow-match t in [0, 1000]
    (float)."""
    from diffusers import CogView4Transformer2DModel

    h, w = size or SIZES["cogview4"][0]
    model = _seeded(lambda: CogView4Transformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=NUM_LAYERS, attention_head_dim=16,
        num_attention_heads=2, text_embed_dim=32, time_embed_dim=32, condition_dim=8, pos_embed_max_size=16,
        sample_size=8, rope_axes_dim=(16, 16)), seed)
    g = _gen(seed)
    px = torch.tensor([[8.0 * h, 8.0 * w]]).repeat(batch, 1)
    return model, {
        "hidden_states": torch.randn(batch, 4, h, w, generator=g),
        "encoder_hidden_states": torch.randn(batch, 8, 32, generator=g),
        "timestep": _flow_t(batch, g) * 1000,
        "original_size": px,
        "target_size": px.clone(),
        "crop_coords": torch.zeros(batch, 2),
        "return_dict": False,
    }


def build_omnigen(seed: int = 0, batch: int = BATCH, size: Size | None = None) -> tuple[nn.Module, dict]:
    """OmniGenTransformer2DModel (Phi-3 style decoder): hidden 32 (2 heads x 16), 2 layers, patch 2,
    vocab 100. Inputs as OmniGenPipeline passes them for text-to-image: 8 prompt token ids, no
    input images, a full [B, S, S] attention mask and position ids over the 8 text + 1 time +
    H/2 * W/2 image tokens; timestep in [0, 1] (float)."""
    from diffusers import OmniGenTransformer2DModel

    h, w = size or SIZES["omnigen"][0]
    model = _seeded(lambda: OmniGenTransformer2DModel(
        in_channels=4, patch_size=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=64, num_layers=NUM_LAYERS, pad_token_id=0, vocab_size=100,
        max_position_embeddings=4096, original_max_position_embeddings=4096, pos_embed_max_size=16,
        time_step_dim=32, rope_scaling={"short_factor": [1.0] * 8, "long_factor": [1.5] * 8}), seed)
    g = _gen(seed)
    seq = 8 + 1 + (h // 2) * (w // 2)
    return model, {
        "hidden_states": torch.randn(batch, 4, h, w, generator=g),
        "timestep": _flow_t(batch, g),
        "input_ids": torch.randint(1, 100, (batch, 8), generator=g),
        "input_img_latents": [],
        "input_image_sizes": {},
        "attention_mask": torch.ones(batch, seq, seq),
        "position_ids": torch.arange(seq)[None].repeat(batch, 1),
        "return_dict": False,
    }


# --------------------------------------------------------------------------------------------
# video models
# --------------------------------------------------------------------------------------------


def build_mochi(seed: int = 0, batch: int = BATCH, size: Size | None = None) -> tuple[nn.Module, dict]:
    """MochiTransformer3DModel: hidden 32 (2 heads x 16), 2 blocks (the last `context_pre_only`),
    patch 2, 8 text tokens of width 32 with a padded mask (attention pooler over them), video
    latents [B, C, F, H, W]. MochiPipeline passes the flow-match t in [0, 1000] (float)."""
    from diffusers import MochiTransformer3DModel

    f, h, w = size or SIZES["mochi"][0]
    model = _seeded(lambda: MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=NUM_LAYERS,
        pooled_projection_dim=32, in_channels=4, text_embed_dim=32, time_embed_dim=32, max_sequence_length=8),
        seed)
    g = _gen(seed)
    return model, {
        "hidden_states": torch.randn(batch, 4, f, h, w, generator=g),
        "encoder_hidden_states": torch.randn(batch, 8, 32, generator=g),
        "timestep": _flow_t(batch, g) * 1000,
        "encoder_attention_mask": _mask(batch, 8),
        "return_dict": False,
    }


def build_hunyuanvideo(seed: int = 0, batch: int = BATCH, size: Size | None = None) -> tuple[nn.Module, dict]:
    """HunyuanVideoTransformer3DModel: hidden 32 (2 heads x 16, RoPE 4+6+6), 1 double + 1 single
    block, 1 token-refiner block, patch 1, 8 text tokens of width 32 with a padded mask, pooled
    width 16, guidance embedding. HunyuanVideoPipeline passes the flow-match t in [0, 1000]
    (float) and `guidance = scale * 1000`."""
    from diffusers import HunyuanVideoTransformer3DModel

    f, h, w = size or SIZES["hunyuanvideo"][0]
    model = _seeded(lambda: HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=32, pooled_projection_dim=16, rope_axes_dim=(4, 6, 6)), seed)
    g = _gen(seed)
    return model, {
        "hidden_states": torch.randn(batch, 4, f, h, w, generator=g),
        "timestep": _flow_t(batch, g) * 1000,
        "encoder_hidden_states": torch.randn(batch, 8, 32, generator=g),
        "encoder_attention_mask": _mask(batch, 8),
        "pooled_projections": torch.randn(batch, 16, generator=g),
        "guidance": torch.full((batch,), 6000.0),
        "return_dict": False,
    }


def build_ltxvideo(seed: int = 0, batch: int = BATCH, size: Size | None = None) -> tuple[nn.Module, dict]:
    """LTXVideoTransformer3DModel: hidden 32 (2 heads x 16), 2 blocks, patch 1; video latents
    packed to [B, F*H*W, C], 8 caption tokens of width 32 with a padded mask, `num_frames` /
    `height` / `width` ints and `rope_interpolation_scale` as LTXPipeline passes them (25 fps);
    timestep the flow-match t in [0, 1000] (float)."""
    from diffusers import LTXVideoTransformer3DModel

    f, h, w = size or SIZES["ltxvideo"][0]
    model = _seeded(lambda: LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
        num_layers=NUM_LAYERS, caption_channels=32), seed)
    g = _gen(seed)
    return model, {
        "hidden_states": torch.randn(batch, f * h * w, 4, generator=g),
        "encoder_hidden_states": torch.randn(batch, 8, 32, generator=g),
        "timestep": _flow_t(batch, g) * 1000,
        "encoder_attention_mask": _mask(batch, 8),
        "num_frames": f,
        "height": h,
        "width": w,
        "rope_interpolation_scale": (8 / 25, 32, 32),
        "return_dict": False,
    }


def build_wan(seed: int = 0, batch: int = BATCH, size: Size | None = None) -> tuple[nn.Module, dict]:
    """WanTransformer3DModel (T2V): hidden 32 (2 heads x 16), 2 blocks, patch (1, 2, 2), FFN 64,
    8 text tokens of width 32. WanPipeline passes the flow-match t in [0, 1000] (float)."""
    from diffusers import WanTransformer3DModel

    f, h, w = size or SIZES["wan"][0]
    model = _seeded(lambda: WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=NUM_LAYERS, rope_max_seq_len=32), seed)
    g = _gen(seed)
    return model, {
        "hidden_states": torch.randn(batch, 4, f, h, w, generator=g),
        "timestep": _flow_t(batch, g) * 1000,
        "encoder_hidden_states": torch.randn(batch, 8, 32, generator=g),
        "return_dict": False,
    }


def build_allegro(seed: int = 0, batch: int = BATCH, size: Size | None = None) -> tuple[nn.Module, dict]:
    """AllegroTransformer3DModel: hidden 32 (2 heads x 16, 3-D RoPE computed inside), 2 blocks,
    patch 2, 8 caption tokens of width 32 with a padded mask. AllegroPipeline (EulerAncestral)
    passes float timesteps in [0, 1000]."""
    from diffusers import AllegroTransformer3DModel

    f, h, w = size or SIZES["allegro"][0]
    model = _seeded(lambda: AllegroTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        num_layers=NUM_LAYERS, cross_attention_dim=32, sample_height=8, sample_width=8, sample_frames=4,
        caption_channels=32), seed)
    g = _gen(seed)
    return model, {
        "hidden_states": torch.randn(batch, 4, f, h, w, generator=g),
        "encoder_hidden_states": torch.randn(batch, 8, 32, generator=g),
        "timestep": torch.rand(batch, generator=g) * 1000,
        "encoder_attention_mask": _mask(batch, 8),
        "return_dict": False,
    }


def build_cosmos(seed: int = 0, batch: int = BATCH, size: Size | None = None) -> tuple[nn.Module, dict]:
    """CosmosTransformer3DModel: hidden 32 (2 heads x 16, 3-D RoPE, learnable extra position
    embedding), 2 blocks, AdaLN-LoRA rank 8, patch (1, 2, 2), 8 text tokens of width 32, fps 30.
    `concat_padding_mask=False`: the padding-mask path resizes with torchvision, which this
    environment lacks. Timestep as the EDM scheduler gives it: `0.25 * log(sigma)` (float)."""
    from diffusers import CosmosTransformer3DModel

    f, h, w = size or SIZES["cosmos"][0]
    model = _seeded(lambda: CosmosTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=NUM_LAYERS,
        mlp_ratio=2.0, text_embed_dim=32, adaln_lora_dim=8, max_size=(8, 32, 32), patch_size=(1, 2, 2),
        rope_scale=(2.0, 1.0, 1.0), concat_padding_mask=False, extra_pos_embed_type="learnable"), seed)
    g = _gen(seed)
    sigma = torch.exp(torch.rand(batch, generator=g) * 10.6 - 6.2)  # log-uniform in [0.002, 80]
    return model, {
        "hidden_states": torch.randn(batch, 4, f, h, w, generator=g),
        "timestep": 0.25 * sigma.log(),
        "encoder_hidden_states": torch.randn(batch, 8, 32, generator=g),
        "fps": 30,
        "return_dict": False,
    }


def build_easyanimate(seed: int = 0, batch: int = BATCH, size: Size | None = None) -> tuple[nn.Module, dict]:
    """EasyAnimateTransformer3DModel (V5.1-style MMDiT, 3-D RoPE): hidden 32 (2 heads x 16),
    2 blocks, patch 2, 8 text tokens of width 32. EasyAnimatePipeline passes the flow-match t in
    [0, 1000] cast to the latent dtype (float)."""
    from diffusers import EasyAnimateTransformer3DModel

    f, h, w = size or SIZES["easyanimate"][0]
    model = _seeded(lambda: EasyAnimateTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, patch_size=2,
        sample_width=8, sample_height=8, num_layers=NUM_LAYERS, mmdit_layers=NUM_LAYERS, time_embed_dim=32,
        text_embed_dim=32, time_position_encoding_type="3d_rope"), seed)
    g = _gen(seed)
    return model, {
        "hidden_states": torch.randn(batch, 4, f, h, w, generator=g),
        "timestep": _flow_t(batch, g) * 1000,
        "encoder_hidden_states": torch.randn(batch, 8, 32, generator=g),
        "return_dict": False,
    }


def build_skyreels_v2(seed: int = 0, batch: int = BATCH, size: Size | None = None) -> tuple[nn.Module, dict]:
    """SkyReelsV2Transformer3DModel (T2V, Wan-derived): hidden 32 (2 heads x 16), 2 blocks, patch
    (1, 2, 2), FFN 64, 8 text tokens of width 32. SkyReelsV2Pipeline passes the flow-match t in
    [0, 1000] (float)."""
    from diffusers import SkyReelsV2Transformer3DModel

    f, h, w = size or SIZES["skyreels_v2"][0]
    model = _seeded(lambda: SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=NUM_LAYERS, rope_max_seq_len=32), seed)
    g = _gen(seed)
    return model, {
        "hidden_states": torch.randn(batch, 4, f, h, w, generator=g),
        "timestep": _flow_t(batch, g) * 1000,
        "encoder_hidden_states": torch.randn(batch, 8, 32, generator=g),
        "return_dict": False,
    }


SIZES: dict[str, list[Size]] = {
    "sd3": [(8, 8), (12, 8), (8, 16)],
    "auraflow": [(8, 8), (12, 8), (8, 16)],
    "sana": [(8, 8), (12, 8), (8, 16)],
    "hunyuandit": [(8, 8), (12, 8), (8, 16)],
    "lumina_next": [(8, 8), (12, 8), (8, 16)],
    "lumina2": [(8, 8), (12, 8), (8, 16)],
    "hidream": [(8, 8), (12, 8), (8, 16)],
    "qwenimage": [(8, 8), (12, 8), (8, 16)],
    "chroma": [(8, 8), (12, 8), (8, 16)],
    "zimage": [(8, 8), (12, 8), (8, 16)],
    "cogview3plus": [(8, 8), (12, 8), (8, 16)],
    "cogview4": [(8, 8), (12, 8), (8, 16)],
    "omnigen": [(8, 8), (12, 8), (8, 16)],
    "mochi": [(2, 8, 8), (3, 8, 12), (1, 12, 8)],
    "hunyuanvideo": [(2, 4, 4), (3, 4, 6), (1, 6, 4)],
    "ltxvideo": [(2, 4, 4), (3, 4, 6), (1, 6, 4)],
    "wan": [(2, 8, 8), (3, 8, 12), (1, 12, 8)],
    "allegro": [(2, 8, 8), (3, 8, 12), (1, 12, 8)],
    "cosmos": [(2, 8, 8), (3, 8, 12), (1, 12, 8)],
    "easyanimate": [(2, 8, 8), (3, 8, 12), (1, 12, 8)],
    "skyreels_v2": [(2, 8, 8), (3, 8, 12), (1, 12, 8)],
}

ZOO: dict[str, Callable[..., tuple[nn.Module, dict]]] = {
    name: globals()[f"build_{name}"] for name in SIZES
}
