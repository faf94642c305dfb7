"""Tiny seeded instances of 21 diffusers DiT classes (diffusers 0.42.1), for tests.

Same conventions as `tests/zoo.py` (whose `_seeded` builds them): each `build_<short>(seed,
batch, size)` returns `(model, kwargs)`, an eval-mode fp32 CPU model (hidden width 32, 1-2
blocks of each kind, a forward well under 0.5 s on CPU) and the keyword arguments its diffusers
pipeline passes (`return_dict=False`, so `model(**kwargs)[0]` is the denoiser output).
Construction runs under a forked, seeded global RNG and every Linear/Conv weight is re-drawn
heavy-tailed; inputs come from a `torch.Generator(seed + 1)`, never the global RNG. `size` is the
latent (H, W) for image models and (F, H, W) for video models; `SIZES[short]` lists three that
run in eager (the first is the default). Timesteps have the dtype and scale the pipeline uses
(documented per builder).

`KEEP_FP[short]` / `QUANTIZE[short]` split every `nn.Linear` FQN of the builder's config, read
off the model code: KEEP_FP = timestep / guidance / pooled-text / size-condition embedders,
attention poolers, projections of the raw text states before the blocks, modulation linears
(adaLN, `img_mod` / `txt_mod`, `adaLN_modulation`, AdaLN-LoRA pairs, the Chroma approximator),
the latent patch embedding and the final projection; QUANTIZE = attention projections and
block FFN / MLP linears (text-side, refiner and MoE-expert ones included, Flux-style single-block
`proj_mlp` / `proj_out`). Conv patch embeddings and conv FFNs are not linears and are in
neither list. Judgement calls are commented next to each class's lists.

Per class (torch 2.13, `torch.export.export(model, (), kwargs, strict=False)` with static
shapes; "ok" = exports and the program's output equals eager; every output is finite):
- sd3 (SD3Transformer2DModel): export ok.
- auraflow (AuraFlowTransformer2DModel): export ok.
- sana (SanaTransformer2DModel): export ok.
- hunyuandit (HunyuanDiT2DModel): export ok. `text_len` / `text_len_t5` pin the CLIP / T5
  lengths (8 / 8); fewer than 4 blocks have no long-skip block. Slowest forward here (~0.3 s:
  30 LayerNorm calls, ~6 ms each on this CPU build).
- lumina_next (LuminaNextDiT2DModel): export ok. Needs `cross_attention_kwargs={}` (None
  crashes: `**None`), as the pipeline passes it. Its `pad_token` parameter is left as
  uninitialized `torch.empty` memory by diffusers; the builder fills it from the seed.
- lumina2 (Lumina2Transformer2DModel): export fails: `TypeError: unhashable type: non-nested
  SymInt` (per-sample caption lengths from the mask feed `set(seq_lengths)`).
- hidream (HiDreamImageTransformer2DModel): export fails: `RuntimeError: .numpy() is not
  supported for tensor subclasses.` (eval-mode MoE `moe_infer`). Non-square latents are padded to
  `max_resolution` patches (16 x 16 latent here).
- qwenimage (QwenImageTransformer2DModel): export ok.
- chroma (ChromaTransformer2DModel): export ok.
- zimage (ZImageTransformer2DModel): export ok once the lazily built RoPE table exists (the
  builder builds it; otherwise exporting first leaves eager off by ~0.4). List inputs and a list
  output (per-sample [C, 1, H, W]).
- cogview3plus (CogView3PlusTransformer2DModel): export ok.
- cogview4 (CogView4Transformer2DModel): export ok.
- omnigen (OmniGenTransformer2DModel): export fails: `GuardOnDataDependentSymNode: Could not
  guard on data-dependent expression Eq(u0, 1)` (RoPE: `torch.max(position_ids) + 1` compared
  with `original_max_position_embeddings` in Python). `rope_scaling` is required (None crashes).
- mochi (MochiTransformer3DModel): export ok. Its RoPE warns on CPU that autocast to float32 is
  unsupported (harmless: autocast is disabled and the op runs in fp32).
- hunyuanvideo (HunyuanVideoTransformer3DModel): export ok.
- ltxvideo (LTXVideoTransformer3DModel): export ok; `num_frames` / `height` / `width` are Python
  ints and are baked into the program.
- wan (WanTransformer3DModel): export ok.
- allegro (AllegroTransformer3DModel): export ok.
- cosmos (CosmosTransformer3DModel): export ok. Built with `concat_padding_mask=False`: the
  padding-mask path calls torchvision's resize and torchvision is not installed (the default
  True config cannot run here).
- easyanimate (EasyAnimateTransformer3DModel): export ok.
- skyreels_v2 (SkyReelsV2Transformer3DModel): export ok.
No class was left out: all 21 build and run on CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tests.zoo import _seeded

__all__ = ["CLASS_NAMES", "EXPORT_ERRORS", "KEEP_FP", "QUANTIZE", "SIZES", "VIDEO", "ZOO"] + [f"build_{n}" for n in (
    "sd3", "auraflow", "sana", "hunyuandit", "lumina_next", "lumina2", "hidream", "qwenimage", "chroma", "zimage",
    "cogview3plus", "cogview4", "omnigen", "mochi", "hunyuanvideo", "ltxvideo", "wan", "allegro", "cosmos",
    "easyanimate", "skyreels_v2")]

Size = tuple[int, ...]
BATCH = 2
NUM_LAYERS = 2


def denoiser_output(out) -> torch.Tensor:
    """The denoiser output of a ``return_dict=False`` call: its first element, per-sample lists
    (Z-Image) stacked."""
    out = out[0] if isinstance(out, tuple) else out
    return torch.stack(out) if isinstance(out, list) else out


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


def build_hunyuandit(seed: int = 0, batch: int = BATCH, size: Size | None = None) -> tuple[nn.Module, dict]:
    """HunyuanDiT2DModel: hidden 32 (2 heads x 16), 4 blocks (block 3 takes the long skip from
    block 0; fewer blocks have no skip), patch 2, learned sigma; CLIP states 8 x 32 and T5 states 8 x 32 (`text_len` /
    `text_len_t5` = 8, the model pins them), image-meta sizes and style as
    HunyuanDiTPipeline passes them, 2-D RoPE from `get_2d_rotary_pos_embed`; timestep: the DDPM
    integer t cast to the latent dtype (float)."""
    from diffusers import HunyuanDiT2DModel
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    from viditq_compile.families.hunyuan_dit import crop_region  # the pipeline's, copied

    h, w = size or SIZES["hunyuandit"][0]
    model = _seeded(lambda: HunyuanDiT2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, patch_size=2, sample_size=8,
        hidden_size=32, num_layers=4, cross_attention_dim=32, cross_attention_dim_t5=32,
        pooled_projection_dim=16, text_len=8, text_len_t5=8), seed)
    g = _gen(seed)
    grid = (h // 2, w // 2)
    rope = get_2d_rotary_pos_embed(16, crop_region(grid, 4), grid, output_type="pt")
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
    with torch.no_grad():  # `pad_token` is an uninitialized `torch.empty` (unused by forward)
        model.pad_token.copy_(torch.randn(32, generator=torch.Generator().manual_seed(seed)) * 0.02)
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
    # The RoPE table is built lazily on the first call; built during `torch.export` it leaves the
    # eager model with a wrong table (eager after export differs by ~0.4), so build it here.
    rope = model.rope_embedder
    rope.freqs_cis = rope.precompute_freqs_cis(rope.axes_dims, rope.axes_lens, theta=rope.theta)
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


def _flow_video_call(seed: int, batch: int, size: tuple[int, int, int]) -> dict:
    """A flow-matching video pipeline's call: [B, 4, F, H, W] latents, t in [0, 1000] (float), 8
    text tokens of width 32."""
    g = _gen(seed)
    return {
        "hidden_states": torch.randn(batch, 4, *size, generator=g),
        "timestep": _flow_t(batch, g) * 1000,
        "encoder_hidden_states": torch.randn(batch, 8, 32, generator=g),
        "return_dict": False,
    }


def _wan_like(cls_name: str, short: str, seed: int, batch: int, size: Size | None) -> tuple[nn.Module, dict]:
    """Wan and its derivatives: hidden 32 (2 heads x 16), 2 blocks, patch (1, 2, 2), FFN 64, 8 text
    tokens of width 32; their pipelines pass the flow-match t in [0, 1000] (float)."""
    import diffusers

    f, h, w = size or SIZES[short][0]
    model = _seeded(lambda: getattr(diffusers, cls_name)(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=NUM_LAYERS, rope_max_seq_len=32), seed)
    return model, _flow_video_call(seed, batch, (f, h, w))


def build_wan(seed: int = 0, batch: int = BATCH, size: Size | None = None) -> tuple[nn.Module, dict]:
    """WanTransformer3DModel (T2V), as ``_wan_like``."""
    return _wan_like("WanTransformer3DModel", "wan", seed, batch, size)


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
    return model, _flow_video_call(seed, batch, (f, h, w))


def build_skyreels_v2(seed: int = 0, batch: int = BATCH, size: Size | None = None) -> tuple[nn.Module, dict]:
    """SkyReelsV2Transformer3DModel (T2V, Wan-derived), as ``_wan_like``."""
    return _wan_like("SkyReelsV2Transformer3DModel", "skyreels_v2", seed, batch, size)


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

CLASS_NAMES: dict[str, str] = {
    "sd3": "SD3Transformer2DModel",
    "auraflow": "AuraFlowTransformer2DModel",
    "sana": "SanaTransformer2DModel",
    "hunyuandit": "HunyuanDiT2DModel",
    "lumina_next": "LuminaNextDiT2DModel",
    "lumina2": "Lumina2Transformer2DModel",
    "hidream": "HiDreamImageTransformer2DModel",
    "qwenimage": "QwenImageTransformer2DModel",
    "chroma": "ChromaTransformer2DModel",
    "zimage": "ZImageTransformer2DModel",
    "cogview3plus": "CogView3PlusTransformer2DModel",
    "cogview4": "CogView4Transformer2DModel",
    "omnigen": "OmniGenTransformer2DModel",
    "mochi": "MochiTransformer3DModel",
    "hunyuanvideo": "HunyuanVideoTransformer3DModel",
    "ltxvideo": "LTXVideoTransformer3DModel",
    "wan": "WanTransformer3DModel",
    "allegro": "AllegroTransformer3DModel",
    "cosmos": "CosmosTransformer3DModel",
    "easyanimate": "EasyAnimateTransformer3DModel",
    "skyreels_v2": "SkyReelsV2Transformer3DModel",
}

VIDEO = frozenset({"mochi", "hunyuanvideo", "ltxvideo", "wan", "allegro", "cosmos", "easyanimate", "skyreels_v2"})
"""Short names whose `size` is (F, H, W); the others take (H, W)."""

ZOO: dict[str, Callable[..., tuple[nn.Module, dict]]] = {name: globals()[f"build_{name}"] for name in CLASS_NAMES}

EXPORT_ERRORS: dict[str, str] = {
    "lumina2": "unhashable type: non-nested SymInt",
    "hidream": ".numpy() is not supported for tensor subclasses.",
    "omnigen": "Could not guard on data-dependent expression",
}
"""Classes whose static non-strict `torch.export` fails (torch 2.13), with the start of the error
message; every other builder exports and its program matches eager."""


# --------------------------------------------------------------------------------------------
# layer lists (read off the model code for the configs above)
# --------------------------------------------------------------------------------------------


def _fqns(prefix: str, idx: int | range, names: tuple[str, ...]) -> list[str]:
    idx = range(idx) if isinstance(idx, int) else idx
    return [f"{prefix}.{i}.{name}" for i in idx for name in names]


_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
_ADDED = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
_FF = ("ff.net.0.proj", "ff.net.2")
_FF_CTX = ("ff_context.net.0.proj", "ff_context.net.2")
_T = ("linear_1", "linear_2")  # TimestepEmbedding / PixArtAlphaTextProjection


def _sub(prefix: str, names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f"{prefix}.{n}" for n in names)


def _emb(prefix: str) -> list[str]:
    return [f"{prefix}.{n}" for n in _T]


KEEP_FP: dict[str, list[str]] = {}
QUANTIZE: dict[str, list[str]] = {}

# SD3: the last joint block is `context_pre_only` (norm1_context is an AdaLayerNormContinuous,
# still `.linear`; no to_add_out / ff_context); SD3.5 dual attention `attn2` is compute.
KEEP_FP["sd3"] = (
    _emb("time_text_embed.timestep_embedder") + _emb("time_text_embed.text_embedder") + ["context_embedder"]
    + _fqns("transformer_blocks", 2, ("norm1.linear", "norm1_context.linear")) + ["norm_out.linear", "proj_out"]
)
QUANTIZE["sd3"] = (
    _fqns("transformer_blocks", 1, _sub("attn", _ATTN + _ADDED) + _sub("attn2", _ATTN) + _FF + _FF_CTX)
    + _fqns("transformer_blocks", range(1, 2), _sub("attn", _ATTN + _ADDED[:3]) + _FF)
)

# AuraFlow: the patch embedding `pos_embed.proj` is an nn.Linear on flattened patches (keep);
# its FFN is a SwiGLU (`linear_1`, `linear_2` -> `out_projection`).
_AURA_FF = ("linear_1", "linear_2", "out_projection")
KEEP_FP["auraflow"] = (
    ["pos_embed.proj", "context_embedder"] + _emb("time_step_proj")
    + _fqns("joint_transformer_blocks", 1, ("norm1.linear", "norm1_context.linear"))
    + _fqns("single_transformer_blocks", 1, ("norm1.linear",)) + ["norm_out.linear", "proj_out"]
)
QUANTIZE["auraflow"] = _fqns(
    "joint_transformer_blocks", 1, _sub("attn", _ATTN + _ADDED) + _sub("ff", _AURA_FF) + _sub("ff_context", _AURA_FF)
) + _fqns("single_transformer_blocks", 1, _sub("attn", _ATTN) + _sub("ff", _AURA_FF))

# Sana: the GLUMBConv feed-forward is three Conv2d: the 1x1 `conv_inverted` / `conv_point` are
# linears (quantized; passes.conv_as_linear), the 3x3 depthwise `conv_depth` stays a convolution
# (FP, listed in the report: `KEPT_CONV`); the patch embedding is a 1x1 Conv2d at patch size 1, a
# linear kept FP as the patch embedding; modulation is a per-block `scale_shift_table` plus the
# shared `time_embed.linear`.
KEEP_FP["sana"] = (
    ["patch_embed.proj"] + _emb("time_embed.emb.timestep_embedder") + ["time_embed.linear"]
    + _emb("caption_projection") + ["proj_out"]
)
QUANTIZE["sana"] = _fqns("transformer_blocks", NUM_LAYERS, _sub("attn1", _ATTN) + _sub("attn2", _ATTN)
                         + ("ff.conv_inverted", "ff.conv_point"))
KEPT_CONV = {"sana": _fqns("transformer_blocks", NUM_LAYERS, ("ff.conv_depth",))}
"""Convolutions that are not linears (k×k, depthwise, strided), kept FP and listed in the report."""

# HunyuanDiT: `text_embedder` projects the raw T5 states (caption projection, keep); the
# attention pooler over T5 (`time_extra_emb.pooler.*`) and the pooled+meta+style
# `extra_embedder` feed the timestep embedding (keep). Judgement: the long-skip `skip_linear`
# (concat(skip, x) -> x on the residual stream) is compute and is quantized.
KEEP_FP["hunyuandit"] = (
    _emb("text_embedder") + _emb("time_extra_emb.timestep_embedder")
    + [f"time_extra_emb.pooler.{n}" for n in ("k_proj", "q_proj", "v_proj", "c_proj")]
    + _emb("time_extra_emb.extra_embedder") + _fqns("blocks", 4, ("norm1.linear",)) + ["norm_out.linear", "proj_out"]
)
QUANTIZE["hunyuandit"] = (
    _fqns("blocks", 4, _sub("attn1", _ATTN) + _sub("attn2", _ATTN) + _FF) + ["blocks.3.skip_linear"]
)

# Lumina-Next: `caption_embedder` embeds the mask-pooled caption into the conditioning (keep);
# the raw caption goes straight into attn2's k/v. attn1 has no output projection of its own
# (`to_out` is Identity): attn2.to_out.0 projects the gated sum of both attentions.
# `norm_out.linear_1` is modulation, `norm_out.linear_2` the final projection.
_LUMINA_FF = ("feed_forward.linear_1", "feed_forward.linear_2", "feed_forward.linear_3")
KEEP_FP["lumina_next"] = (
    ["patch_embedder.proj"] + _emb("time_caption_embed.timestep_embedder") + ["time_caption_embed.caption_embedder.1"]
    + _fqns("layers", NUM_LAYERS, ("norm1.linear",)) + ["norm_out.linear_1", "norm_out.linear_2"]
)
QUANTIZE["lumina_next"] = _fqns(
    "layers", NUM_LAYERS, _sub("attn1", ("to_q", "to_k", "to_v")) + _sub("attn2", _ATTN) + _LUMINA_FF
)

# Lumina2: `caption_embedder.1` projects the raw caption sequence (keep); the context refiner
# has no modulation; noise-refiner and context-refiner attention/FFN are compute.
KEEP_FP["lumina2"] = (
    ["x_embedder"] + _emb("time_caption_embed.timestep_embedder") + ["time_caption_embed.caption_embedder.1"]
    + _fqns("noise_refiner", 1, ("norm1.linear",)) + _fqns("layers", NUM_LAYERS, ("norm1.linear",))
    + ["norm_out.linear_1", "norm_out.linear_2"]
)
QUANTIZE["lumina2"] = (
    _fqns("noise_refiner", 1, _sub("attn", _ATTN) + _LUMINA_FF)
    + _fqns("context_refiner", 1, _sub("attn", _ATTN) + _LUMINA_FF)
    + _fqns("layers", NUM_LAYERS, _sub("attn", _ATTN) + _LUMINA_FF)
)

# HiDream: the MoE router (`MoEGate`) is an nn.Parameter used with F.linear, not an nn.Linear,
# so there is no router linear to list; routed experts, the shared expert and the dense text
# FFN `ff_t` are compute. `caption_projection.{i}.linear` embed the raw Llama/T5 states (keep).
_SWIGLU = ("w1", "w2", "w3")
_HIDREAM_MOE = _sub("ff_i.shared_experts", _SWIGLU) + _sub("ff_i.experts.0", _SWIGLU) + _sub("ff_i.experts.1", _SWIGLU)
KEEP_FP["hidream"] = (
    _emb("t_embedder.timestep_embedder") + _emb("p_embedder.pooled_embedder") + ["x_embedder.proj"]
    + ["double_stream_blocks.0.block.adaLN_modulation.1", "single_stream_blocks.0.block.adaLN_modulation.1"]
    + ["final_layer.linear", "final_layer.adaLN_modulation.1"]
    + [f"caption_projection.{i}.linear" for i in range(_HIDREAM_LLAMA + 1)]
)
QUANTIZE["hidream"] = _fqns(
    "double_stream_blocks", 1,
    _sub("block.attn1", ("to_q", "to_k", "to_v", "to_out", "to_q_t", "to_k_t", "to_v_t", "to_out_t"))
    + _sub("block", _HIDREAM_MOE + _sub("ff_t", _SWIGLU)),
) + _fqns(
    "single_stream_blocks", 1, _sub("block.attn1", ("to_q", "to_k", "to_v", "to_out")) + _sub("block", _HIDREAM_MOE)
)

# QwenImage: `img_mod.1` / `txt_mod.1` are the per-stream modulation linears (keep); `txt_in`
# projects the (RMS-normed) raw text states (keep).
KEEP_FP["qwenimage"] = (
    _emb("time_text_embed.timestep_embedder") + ["img_in", "txt_in"]
    + _fqns("transformer_blocks", NUM_LAYERS, ("img_mod.1", "txt_mod.1")) + ["norm_out.linear", "proj_out"]
)
QUANTIZE["qwenimage"] = _fqns(
    "transformer_blocks", NUM_LAYERS,
    _sub("attn", _ATTN + _ADDED) + ("img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"),
)

# Chroma: blocks have no modulation linears (pruned AdaLN reads slices of one shared vector);
# all modulation comes from the `distilled_guidance_layer` approximator (keep).
KEEP_FP["chroma"] = (
    ["distilled_guidance_layer.in_proj", "distilled_guidance_layer.layers.0.linear_1",
     "distilled_guidance_layer.layers.0.linear_2", "distilled_guidance_layer.out_proj"]
    + ["context_embedder", "x_embedder", "proj_out"]
)
QUANTIZE["chroma"] = _fqns("transformer_blocks", 1, _sub("attn", _ATTN + _ADDED) + _FF + _FF_CTX) + _fqns(
    "single_transformer_blocks", 1, ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")
)

# Z-Image: the patch embedder / final layer live in ModuleDicts keyed "<patch>-<f_patch>"
# (`all_x_embedder.2-1`); `adaLN_modulation.0` (blocks) vs `.1` (final layer) are both
# modulation; `cap_embedder.1` projects the raw caption (keep).
_ZFF = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
_ZATTN = _sub("attention", _ATTN)
KEEP_FP["zimage"] = (
    ["all_x_embedder.2-1", "all_final_layer.2-1.linear", "all_final_layer.2-1.adaLN_modulation.1"]
    + ["t_embedder.mlp.0", "t_embedder.mlp.2", "cap_embedder.1"]
    + _fqns("noise_refiner", 1, ("adaLN_modulation.0",)) + _fqns("layers", NUM_LAYERS, ("adaLN_modulation.0",))
)
QUANTIZE["zimage"] = (
    _fqns("noise_refiner", 1, _ZATTN + _ZFF) + _fqns("context_refiner", 1, _ZATTN + _ZFF)
    + _fqns("layers", NUM_LAYERS, _ZATTN + _ZFF)
)

# CogView3Plus / CogView4: `patch_embed.proj` (latent patches) and `patch_embed.text_proj`
# (raw text states) are both linears inside the patch embedder (keep); `condition_embedder`
# embeds the size conditions (keep).
for _name in ("cogview3plus", "cogview4"):
    KEEP_FP[_name] = (
        ["patch_embed.proj", "patch_embed.text_proj"] + _emb("time_condition_embed.timestep_embedder")
        + _emb("time_condition_embed.condition_embedder") + _fqns("transformer_blocks", NUM_LAYERS, ("norm1.linear",))
        + ["norm_out.linear", "proj_out"]
    )
    QUANTIZE[_name] = _fqns("transformer_blocks", NUM_LAYERS, _sub("attn1", _ATTN) + _FF)

# OmniGen: `time_token` embeds the timestep into a token that joins the sequence (keep, like
# the timestep embedder); the patch embedding is a Conv2d; the MLP fuses gate and up.
KEEP_FP["omnigen"] = _emb("time_token") + _emb("t_embedder") + ["norm_out.linear", "proj_out"]
QUANTIZE["omnigen"] = _fqns("layers", NUM_LAYERS, _sub("self_attn", _ATTN) + ("mlp.gate_up_proj", "mlp.down_proj"))

# Mochi: the attention pooler (`time_embed.pooler.*`) and `time_embed.caption_proj` (projects the
# raw text states before the blocks) are keep; the last block is `context_pre_only`, its
# `norm1_context` is a LuminaLayerNormContinuous (`linear_1`).
KEEP_FP["mochi"] = (
    _emb("time_embed.timestep_embedder")
    + [f"time_embed.pooler.{n}" for n in ("to_kv", "to_q", "to_out")] + ["time_embed.caption_proj"]
    + ["transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1_context.linear"]
    + ["transformer_blocks.1.norm1.linear", "transformer_blocks.1.norm1_context.linear_1"]
    + ["norm_out.linear", "proj_out"]
)
QUANTIZE["mochi"] = (
    _fqns("transformer_blocks", 1, _sub("attn1", _ATTN + _ADDED) + _FF + _FF_CTX)
    + _fqns("transformer_blocks", range(1, 2), _sub("attn1", _ATTN + _ADDED[:3]) + _FF)
)

# HunyuanVideo: the text side runs through `context_embedder` (a token refiner): its own
# timestep / pooled-text embedders, `proj_in` (raw text -> hidden) and the refiner blocks'
# AdaNorm `norm_out.linear` are keep; the refiner blocks' attention / FFN are compute.
_HV_REF = "context_embedder.token_refiner.refiner_blocks"
KEEP_FP["hunyuanvideo"] = (
    ["x_embedder.proj"]  # a Conv3d with patch 1x1x1 in this config: a linear, the patch embedding
    + _emb("context_embedder.time_text_embed.timestep_embedder")
    + _emb("context_embedder.time_text_embed.text_embedder")
    + ["context_embedder.proj_in", f"{_HV_REF}.0.norm_out.linear"]
    + _emb("time_text_embed.timestep_embedder") + _emb("time_text_embed.text_embedder")
    + _emb("time_text_embed.guidance_embedder")
    + ["transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1_context.linear"]
    + ["single_transformer_blocks.0.norm.linear", "norm_out.linear", "proj_out"]
)
QUANTIZE["hunyuanvideo"] = (
    _fqns(_HV_REF, 1, _sub("attn", _ATTN) + _FF)
    + _fqns("transformer_blocks", 1, _sub("attn", _ATTN + _ADDED) + _FF + _FF_CTX)
    + _fqns("single_transformer_blocks", 1, ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out"))
)

# LTX-Video: PixArt-like (adaLN-single `time_embed.linear`, per-block scale_shift_table).
KEEP_FP["ltxvideo"] = (
    ["proj_in"] + _emb("time_embed.emb.timestep_embedder") + ["time_embed.linear"] + _emb("caption_projection")
    + ["proj_out"]
)
QUANTIZE["ltxvideo"] = _fqns("transformer_blocks", NUM_LAYERS, _sub("attn1", _ATTN) + _sub("attn2", _ATTN) + _FF)

# Wan / SkyReels-V2: `condition_embedder.time_proj` produces the 6 x hidden modulation shared by
# all blocks (keep); `condition_embedder.text_embedder` projects the raw text states (keep).
for _name in ("wan", "skyreels_v2"):
    KEEP_FP[_name] = (
        _emb("condition_embedder.time_embedder") + ["condition_embedder.time_proj"]
        + _emb("condition_embedder.text_embedder") + ["proj_out"]
    )
    QUANTIZE[_name] = _fqns(
        "blocks", NUM_LAYERS, _sub("attn1", _ATTN) + _sub("attn2", _ATTN) + ("ffn.net.0.proj", "ffn.net.2")
    )

# Allegro: PixArt-like; the patch embedding is a Conv2d.
KEEP_FP["allegro"] = (
    _emb("adaln_single.emb.timestep_embedder") + ["adaln_single.linear"] + _emb("caption_projection") + ["proj_out"]
)
QUANTIZE["allegro"] = _fqns("transformer_blocks", NUM_LAYERS, _sub("attn1", _ATTN) + _sub("attn2", _ATTN) + _FF)

# Cosmos: AdaLN-LoRA: every norm has a low-rank modulation pair `linear_1` -> `linear_2`
# (keep, 3 per block); no text projection (the raw text goes into attn2's k/v).
KEEP_FP["cosmos"] = (
    ["patch_embed.proj"] + _emb("time_embed.t_embedder")
    + _fqns("transformer_blocks", NUM_LAYERS, tuple(f"norm{i}.{n}" for i in (1, 2, 3) for n in _T))
    + ["norm_out.linear_1", "norm_out.linear_2", "proj_out"]
)
QUANTIZE["cosmos"] = _fqns("transformer_blocks", NUM_LAYERS, _sub("attn1", _ATTN) + _sub("attn2", _ATTN) + _FF)

# EasyAnimate: `text_proj` projects the raw text states (keep); norm1 / norm2 are the joint
# (image + text) modulation linears; `txt_ff` is the text-side FFN (compute).
KEEP_FP["easyanimate"] = (
    _emb("time_embedding") + ["text_proj"] + _fqns("transformer_blocks", NUM_LAYERS, ("norm1.linear", "norm2.linear"))
    + ["norm_out.linear", "proj_out"]
)
QUANTIZE["easyanimate"] = _fqns(
    "transformer_blocks", NUM_LAYERS, _sub("attn1", _ATTN + _ADDED) + _FF + ("txt_ff.net.0.proj", "txt_ff.net.2")
)
