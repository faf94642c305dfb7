"""Tiny seeded instances of real DiT model classes, for tests.

Each builder returns `(model, kwargs)`: an eval-mode fp32 CPU model small enough for a forward
in milliseconds, and the keyword arguments its diffusers pipeline passes (batch 2,
`return_dict=False`, so `model(**kwargs)[0]` is the denoiser output). Construction runs under a
forked, seeded global RNG (diffusers draws `scale_shift_table` and embedding tables from it),
then every Linear/Conv weight is re-drawn heavy-tailed from a `torch.Generator`
(`heavy_tailed_`): the same seed always gives the same model and inputs, and the caller's RNG
state is left as it was.

`KEEP_FP[name]` / `QUANTIZE[name]` list, for the builder's config, the FQNs of every
`nn.Linear` a DiT quantizer should keep in floating point (timestep / guidance / text
embedders, adaLN and norm modulation linears, caption projection, patch embedding, final
projection) or quantize (attention projections, MLPs, Flux single-block `proj_mlp` /
`proj_out`). Together they cover every `nn.Linear` exactly once. Conv patch embeddings
(`pos_embed.proj`) are not linears and are in neither list. (The ViDiT-Q reference PixArt
config also keeps `attn2.to_[kv]`, the caption-token side of cross-attention, in FP; that is a
recipe choice and those layers are listed under QUANTIZE here.)

Export (`torch.export.export(model, (), kwargs)`, non-strict, torch 2.13, diffusers 0.42.1):
all five export with static shapes, outputs equal to eager. Quirks:
- PixArt / Latte: `PatchEmbed` only recomputes its position embedding when H/W differ from
  `sample_size`, and diffusers' `get_2d_sincos_pos_embed` reshapes to [2, 1, W, H]; both pin
  H/W under dynamic shapes. Batch and text length
  can be dynamic.
- DiT: `height = width = int(hidden_states.shape[1] ** 0.5)` in the unpatchify assumes square
  inputs and specializes H/W. Batch can be dynamic. The final modulation calls
  `transformer_blocks.0.norm1.emb` a second time, so that block's timestep-embedder linears
  appear twice in the graph (two `aten.linear` nodes sharing one weight).
- Latte: `temp_pos_embed` has `video_length` frames and is added to the temporal tokens, so
  the frame count must equal `video_length` (4 here); `enable_temporal_attentions` is a Python
  bool and is baked into the program.
- Flux: the RoPE tables are computed in float64 from `img_ids` / `txt_ids` inside the graph
  (`FluxPosEmbed`); the program therefore contains float64 ops. Batch, image-token and
  text-token counts can be dynamic.
- All: input dtypes are baked in. A program exported with int64 timesteps rejects float ones
  (and vice versa) with an `_assert_tensor_metadata` error; export with the dtype you call with.
(Checked: static export of every builder, and Dim.AUTO on batch (+ text / token dims) with a
batch-3 call matching eager.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from viditq_demo.demo_model import heavy_tailed_, timestep_features

__all__ = [
    "ALL_BUILDERS",
    "KEEP_FP",
    "QUANTIZE",
    "ZOO",
    "build_dit",
    "build_flux",
    "build_latte",
    "build_pixart",
    "build_stdit3_block",
]

BATCH = 2
NUM_LAYERS = 2  # every builder uses 2 transformer layers (Flux: 2 double + 2 single blocks)


def _seeded(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory()
    heavy_tailed_(model, torch.Generator().manual_seed(seed))
    return model.eval()


def _fqns(prefix: str, n: int, names: tuple[str, ...]) -> list[str]:
    return [f"{prefix}.{i}.{name}" for i in range(n) for name in names]


_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
_FF = ("ff.net.0.proj", "ff.net.2")
_TIMESTEP = ("linear_1", "linear_2")


# --------------------------------------------------------------------------------------------
# PixArt-α/Σ
# --------------------------------------------------------------------------------------------


def build_pixart(seed: int = 0, batch: int = BATCH) -> tuple[nn.Module, dict]:
    """PixArtTransformer2DModel: hidden 128 (4 heads x 32), 16x16 latent (64 tokens), 8 caption
    tokens of width 64, learned-sigma output (8 channels). Inputs as PixArtSigmaPipeline passes
    them, including a padded caption mask (sample 1 has 5 real tokens) and
    `added_cond_kwargs={"resolution": None, "aspect_ratio": None}`."""
    from diffusers import PixArtTransformer2DModel

    model = _seeded(
        lambda: PixArtTransformer2DModel(
            num_attention_heads=4,
            attention_head_dim=32,
            in_channels=4,
            out_channels=8,
            num_layers=NUM_LAYERS,
            cross_attention_dim=128,
            sample_size=16,
            patch_size=2,
            caption_channels=64,
            use_additional_conditions=False,
            norm_elementwise_affine=False,
            norm_eps=1e-6,
        ),
        seed,
    )
    g = torch.Generator().manual_seed(seed + 1)
    length = 8
    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[1::2, 5:] = 0
    kwargs = {
        "hidden_states": torch.randn(batch, 4, 16, 16, generator=g),
        "encoder_hidden_states": torch.randn(batch, length, 64, generator=g),
        "encoder_attention_mask": mask,
        "timestep": torch.randint(0, 1000, (batch,), generator=g),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        "return_dict": False,
    }
    return model, kwargs


_PIXART_KEEP = [
    "adaln_single.emb.timestep_embedder.linear_1",
    "adaln_single.emb.timestep_embedder.linear_2",
    "adaln_single.linear",
    "caption_projection.linear_1",
    "caption_projection.linear_2",
    "proj_out",
]
_PIXART_QUANT = _fqns(
    "transformer_blocks", NUM_LAYERS, tuple(f"attn1.{n}" for n in _ATTN) + tuple(f"attn2.{n}" for n in _ATTN) + _FF
)


# --------------------------------------------------------------------------------------------
# DiT (class-conditional)
# --------------------------------------------------------------------------------------------

_DIT_CLASSES = 10


def build_dit(seed: int = 0, batch: int = BATCH) -> tuple[nn.Module, dict]:
    """DiTTransformer2DModel: hidden 64 (2 heads x 32), 8x8 latent (16 tokens), 10 classes plus
    the null class 10, learned-sigma output (8 channels). As DiTPipeline calls it with guidance:
    the second half of the batch carries the null label."""
    from diffusers import DiTTransformer2DModel

    model = _seeded(
        lambda: DiTTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=32,
            in_channels=4,
            out_channels=8,
            num_layers=NUM_LAYERS,
            sample_size=8,
            patch_size=2,
            num_embeds_ada_norm=_DIT_CLASSES,
        ),
        seed,
    )
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, _DIT_CLASSES, (batch,), generator=g)
    labels[batch // 2 :] = _DIT_CLASSES  # null class (classifier-free guidance)
    kwargs = {
        "hidden_states": torch.randn(batch, 4, 8, 8, generator=g),
        "timestep": torch.randint(0, 1000, (batch,), generator=g),
        "class_labels": labels,
        "return_dict": False,
    }
    return model, kwargs


_DIT_KEEP = _fqns(
    "transformer_blocks",
    NUM_LAYERS,
    ("norm1.emb.timestep_embedder.linear_1", "norm1.emb.timestep_embedder.linear_2", "norm1.linear"),
) + ["proj_out_1", "proj_out_2"]
_DIT_QUANT = _fqns("transformer_blocks", NUM_LAYERS, tuple(f"attn1.{n}" for n in _ATTN) + _FF)


# --------------------------------------------------------------------------------------------
# Latte (text-to-video)
# --------------------------------------------------------------------------------------------

_LATTE_FRAMES = 4


def build_latte(seed: int = 0, batch: int = BATCH) -> tuple[nn.Module, dict]:
    """LatteTransformer3DModel: hidden 64 (2 heads x 32), 4 frames of 8x8 latents (16 tokens
    each), 8 caption tokens of width 32, learned-sigma output; `video_length` = 4 frames.
    Inputs as LattePipeline passes them: video latents [B, C, F, H, W]."""
    from diffusers import LatteTransformer3DModel

    model = _seeded(
        lambda: LatteTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=32,
            in_channels=4,
            out_channels=8,
            num_layers=NUM_LAYERS,
            cross_attention_dim=64,
            attention_bias=True,
            sample_size=8,
            patch_size=2,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
            caption_channels=32,
            video_length=_LATTE_FRAMES,
        ),
        seed,
    )
    g = torch.Generator().manual_seed(seed + 1)
    kwargs = {
        "hidden_states": torch.randn(batch, 4, _LATTE_FRAMES, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(batch, 8, 32, generator=g),
        "timestep": torch.randint(0, 1000, (batch,), generator=g),
        "enable_temporal_attentions": True,
        "return_dict": False,
    }
    return model, kwargs


_LATTE_KEEP = list(_PIXART_KEEP)
_LATTE_QUANT = _fqns(
    "transformer_blocks", NUM_LAYERS, tuple(f"attn1.{n}" for n in _ATTN) + tuple(f"attn2.{n}" for n in _ATTN) + _FF
) + _fqns("temporal_transformer_blocks", NUM_LAYERS, tuple(f"attn1.{n}" for n in _ATTN) + _FF)


# --------------------------------------------------------------------------------------------
# Flux (MM-DiT, guidance-distilled like FLUX.1-dev)
# --------------------------------------------------------------------------------------------


def build_flux(seed: int = 0, batch: int = BATCH) -> tuple[nn.Module, dict]:
    """FluxTransformer2DModel: hidden 64 (2 heads x 32, RoPE axes 8+12+12), 2 double-stream +
    2 single-stream blocks, an 8x8 latent of 4 channels packed 2x2 into 16 tokens of 16
    channels, 8 text tokens of width 32, pooled text width 32, guidance embedding. Inputs as
    FluxPipeline passes them: timestep in [0, 1] (sigma), 2-D `img_ids` / `txt_ids`."""
    from diffusers import FluxTransformer2DModel

    model = _seeded(
        lambda: FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=NUM_LAYERS,
            num_single_layers=NUM_LAYERS,
            attention_head_dim=32,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(8, 12, 12),
        ),
        seed,
    )
    g = torch.Generator().manual_seed(seed + 1)
    side, length = 4, 8  # 4x4 packed latent tokens
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    kwargs = {
        "hidden_states": torch.randn(batch, side * side, 16, generator=g),
        "encoder_hidden_states": torch.randn(batch, length, 32, generator=g),
        "pooled_projections": torch.randn(batch, 32, generator=g),
        "timestep": torch.rand(batch, generator=g),
        "img_ids": img_ids.reshape(side * side, 3),
        "txt_ids": torch.zeros(length, 3),
        "guidance": torch.full((batch,), 3.5),
        "return_dict": False,
    }
    return model, kwargs


_FLUX_KEEP = (
    ["x_embedder", "context_embedder"]
    + [f"time_text_embed.{e}.{n}"
       for e in ("timestep_embedder", "guidance_embedder", "text_embedder") for n in _TIMESTEP]
    + _fqns("transformer_blocks", NUM_LAYERS, ("norm1.linear", "norm1_context.linear"))
    + _fqns("single_transformer_blocks", NUM_LAYERS, ("norm.linear",))
    + ["norm_out.linear", "proj_out"]
)
_FLUX_QUANT = _fqns(
    "transformer_blocks",
    NUM_LAYERS,
    tuple(f"attn.{n}" for n in _ATTN)
    + ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
    + _FF
    + ("ff_context.net.0.proj", "ff_context.net.2"),
) + _fqns("single_transformer_blocks", NUM_LAYERS, ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out"))


# --------------------------------------------------------------------------------------------
# OpenSORA STDiT3-style blocks (pure torch, OpenSORA module names)
# --------------------------------------------------------------------------------------------


class _RMSNorm(nn.Module):
    """OpenSORA's LlamaRMSNorm (qk-norm), computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = _RMSNorm(dim // num_heads)
        self.k_norm = _RMSNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = nn.functional.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class _CrossAttention(nn.Module):
    """OpenSORA's MultiHeadCrossAttention, batched (OpenSORA packs all captions into one
    masked sequence for xformers; a dense per-sample attention is equivalent without padding)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h, d = self.num_heads, c // self.num_heads
        q = self.q_linear(x).reshape(b, n, h, d).transpose(1, 2)
        k, v = self.kv_linear(cond).reshape(b, -1, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class STDiT3Block(nn.Module):
    """OpenSORA 1.2 STDiT3Block: adaLN-single modulation from a shared `t_block` output, self
    attention over space (or over time when `temporal`), cross-attention to the caption on the
    un-normalized stream, MLP. Temporal RoPE and drop-path are left out."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = 4, temporal: bool = False):
        super().__init__()
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.attn = _SelfAttention(dim, num_heads)
        self.cross_attn = _CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.mlp = _Mlp(dim, dim * mlp_ratio)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, y: torch.Tensor, t_mod: torch.Tensor, frames: int, space: int) -> torch.Tensor:
        b, _, c = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t_mod.reshape(b, 6, -1)
        ).chunk(6, dim=1)
        x_m = self.norm1(x) * (1 + scale_msa) + shift_msa
        if self.temporal:  # B (T S) C -> (B S) T C
            x_m = x_m.reshape(b, frames, space, c).transpose(1, 2).reshape(b * space, frames, c)
            x_m = self.attn(x_m).reshape(b, space, frames, c).transpose(1, 2).reshape(b, frames * space, c)
        else:  # B (T S) C -> (B T) S C
            x_m = self.attn(x_m.reshape(b * frames, space, c)).reshape(b, frames * space, c)
        x = x + gate_msa * x_m
        x = x + self.cross_attn(x, y)
        x = x + gate_mlp * self.mlp(self.norm2(x) * (1 + scale_mlp) + shift_mlp)
        return x


class _TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t, self.freq_dim))


class STDiT3Stack(nn.Module):
    """`depth` pairs of (spatial, temporal) STDiT3 blocks fed by OpenSORA's `t_embedder` ->
    `t_block` modulation. forward(hidden_states [B, T, S, C] patch tokens, encoder_hidden_states
    [B, L, C] projected caption, timestep [B]) -> ([B, T, S, C],)."""

    def __init__(self, dim: int, num_heads: int, depth: int):
        super().__init__()
        self.t_embedder = _TimestepEmbedder(dim)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.spatial_blocks = nn.ModuleList(STDiT3Block(dim, num_heads) for _ in range(depth))
        self.temporal_blocks = nn.ModuleList(STDiT3Block(dim, num_heads, temporal=True) for _ in range(depth))

    def forward(
        self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep: torch.Tensor
    ) -> tuple[torch.Tensor]:
        b, frames, space, c = hidden_states.shape
        t_mod = self.t_block(self.t_embedder(timestep).to(hidden_states.dtype))
        x = hidden_states.reshape(b, frames * space, c)
        for spatial, temporal in zip(self.spatial_blocks, self.temporal_blocks):
            x = spatial(x, encoder_hidden_states, t_mod, frames, space)
            x = temporal(x, encoder_hidden_states, t_mod, frames, space)
        return (x.reshape(b, frames, space, c),)


def build_stdit3_block(seed: int = 0, batch: int = BATCH, depth: int = 1) -> tuple[nn.Module, dict]:
    """An `STDiT3Stack` with `depth` spatial + `depth` temporal blocks, hidden 64 (2 heads x 32),
    4 frames x 16 tokens, 8 caption tokens. Layer names as in OpenSORA: `spatial_blocks.{i}.` /
    `temporal_blocks.{i}.` + `attn.qkv`, `attn.proj`, `cross_attn.q_linear`,
    `cross_attn.kv_linear`, `cross_attn.proj`, `mlp.fc1`, `mlp.fc2`; `t_embedder.mlp.{0,2}`,
    `t_block.1`."""
    dim = 64
    model = _seeded(lambda: STDiT3Stack(dim, num_heads=2, depth=depth), seed)
    g = torch.Generator().manual_seed(seed + 1)
    kwargs = {
        "hidden_states": torch.randn(batch, 4, 16, dim, generator=g),
        "encoder_hidden_states": torch.randn(batch, 8, dim, generator=g),
        "timestep": torch.randint(0, 1000, (batch,), generator=g).float(),
    }
    return model, kwargs


def stdit3_keep_fp() -> list[str]:
    return ["t_embedder.mlp.0", "t_embedder.mlp.2", "t_block.1"]


def stdit3_quantize(depth: int = 1) -> list[str]:
    names = ("attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj",
             "mlp.fc1", "mlp.fc2")
    return _fqns("spatial_blocks", depth, names) + _fqns("temporal_blocks", depth, names)


# --------------------------------------------------------------------------------------------
# Outlier models: the activation statistics that make DiTs hard to quantize
# --------------------------------------------------------------------------------------------

TRAJECTORY = (999, 800, 600, 400, 200, 20)
"""Timesteps of the short sampling trajectory the outlier tests calibrate and evaluate on."""


def build_outlier_pixart(seed: int = 0, batch: int = BATCH, channels: int = 4,
                         scale_range: tuple[float, float] = (10.0, 100.0)) -> tuple[nn.Module, dict]:
    """``build_pixart`` with ``channels`` hidden channels 10-100x larger than the rest through
    every block's adaLN scale/shift table (static imbalance), and the rows of
    ``adaln_single.linear`` that feed those channels' scales amplified (dynamic imbalance: the
    outliers change with the timestep)."""
    from viditq_demo.demo_model import add_modulation_outliers_

    model, kwargs = build_pixart(seed, batch)
    add_modulation_outliers_(model, torch.Generator().manual_seed(seed + 7), num_channels=channels,
                             scale_range=scale_range, timestep_linear=model.adaln_single.linear)
    return model, kwargs


def trajectory_calls(kwargs: dict, seed: int, timesteps=TRAJECTORY) -> list[tuple[tuple, dict]]:
    """``(args, kwargs)`` model calls along a sampling trajectory: one per timestep, a fresh latent
    and caption each (``seed`` keeps calibration and evaluation data apart)."""
    g = torch.Generator().manual_seed(seed)
    calls = []
    for t in timesteps:
        kw = dict(kwargs)
        kw["hidden_states"] = torch.randn(kwargs["hidden_states"].shape, generator=g)
        kw["encoder_hidden_states"] = torch.randn(kwargs["encoder_hidden_states"].shape, generator=g)
        kw["timestep"] = torch.full_like(kwargs["timestep"], t)
        calls.append(((), kw))
    return calls


def cfg_trajectory_calls(kwargs: dict, seed: int, timesteps=TRAJECTORY) -> list[tuple[tuple, dict]]:
    """Calls as a classifier-free-guidance pipeline makes them: per timestep one latent, twice,
    with the unconditional caption in the first half of the batch and the prompt in the second
    (``torch.cat([negative, positive])``), so ``out[1] - out[0]`` is the guidance direction."""
    g = torch.Generator().manual_seed(seed)
    h, c = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
    calls = []
    for t in timesteps:
        kw = dict(kwargs)
        latent = torch.randn((1, *h.shape[1:]), generator=g)
        kw["hidden_states"] = latent.expand(2, *h.shape[1:]).contiguous()
        kw["encoder_hidden_states"] = torch.randn((2, *c.shape[1:]), generator=g)
        kw["timestep"] = torch.full((2,), t, dtype=kwargs["timestep"].dtype)
        if kw.get("encoder_attention_mask") is not None:
            kw["encoder_attention_mask"] = torch.ones_like(kw["encoder_attention_mask"][:2])
        calls.append(((), kw))
    return calls


class EarlyOutlierMLP(nn.Module):
    """Residual MLP blocks over tokens (``blocks.i.fc1`` / ``fc2``) whose input has ``channels``
    hidden channels amplified by ``1 + gain * (t / 1000)^2``, channels the first layer of every
    block barely weighs. At early (high-noise, large t) steps the activation energy sits where the
    weights are weak, so quantization noise swamps the signal; late steps are easy. The output is
    the sum of the block updates (the amplified input is not passed through)."""

    def __init__(self, dim: int = 64, depth: int = 3, channels: int = 4, gain: float = 40.0,
                 seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            blk = nn.Module()
            blk.fc1, blk.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
            self.blocks.append(blk)
        heavy_tailed_(self, g)
        idx = torch.randperm(dim, generator=g)[:channels]
        mask = torch.zeros(dim)
        mask[idx] = 1.0
        self.register_buffer("outlier_mask", mask)
        self.gain = gain
        with torch.no_grad():
            for blk in self.blocks:
                blk.fc1.weight[:, idx] *= 0.05
        self.eval()

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        amp = 1 + self.gain * (timestep.to(hidden_states.dtype) / 1000) ** 2
        x = hidden_states * (1 + self.outlier_mask * (amp[:, None, None] - 1))
        x0 = x
        for blk in self.blocks:
            x = x + blk.fc2(torch.nn.functional.gelu(blk.fc1(x)))
        return x - x0


def early_outlier_calls(seed: int, timesteps=TRAJECTORY, batch: int = BATCH, tokens: int = 16,
                        dim: int = 64) -> list[tuple[tuple, dict]]:
    """Calls of ``EarlyOutlierMLP`` along a trajectory (fresh inputs per step)."""
    g = torch.Generator().manual_seed(seed)
    return [((), {"hidden_states": torch.randn(batch, tokens, dim, generator=g),
                  "timestep": torch.full((batch,), float(t))}) for t in timesteps]


# --------------------------------------------------------------------------------------------
# CogVideoX (3D full attention over text + video tokens, rotary embeddings); not in ZOO: used
# where a test needs one more model class (its keep-FP rules are not pinned here)
# --------------------------------------------------------------------------------------------


def build_cogvideox(seed: int = 0, batch: int = BATCH, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, dict]:
    """CogVideoXTransformer3DModel: hidden 64 (2 heads x 32), 2 latent frames of 8x8 (4 channels,
    patch 2: 32 video tokens), 8 text tokens of width 32, 3D rotary embeddings as CogVideoX-5B's
    pipeline passes them."""
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    model = _seeded(
        lambda: CogVideoXTransformer3DModel(
            num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
            time_embed_dim=64, text_embed_dim=32, num_layers=NUM_LAYERS, sample_width=8,
            sample_height=8, sample_frames=5, patch_size=2, max_text_seq_length=8,
            temporal_compression_ratio=4, use_rotary_positional_embeddings=True),
        seed,
    ).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    cos, sin = get_3d_rotary_pos_embed(32, ((0, 0), (4, 4)), (4, 4), 2)
    kwargs = {
        "hidden_states": torch.randn(batch, 2, 4, 8, 8, generator=g).to(dtype),
        "encoder_hidden_states": torch.randn(batch, 8, 32, generator=g).to(dtype),
        "timestep": torch.randint(0, 1000, (batch,), generator=g),
        "image_rotary_emb": (cos, sin),
        "return_dict": False,
    }
    return model, kwargs


# --------------------------------------------------------------------------------------------
# registries
# --------------------------------------------------------------------------------------------

ZOO: dict[str, Callable[..., tuple[nn.Module, dict]]] = {
    "pixart": build_pixart,
    "dit": build_dit,
    "latte": build_latte,
    "flux": build_flux,
}
ALL_BUILDERS: dict[str, Callable[..., tuple[nn.Module, dict]]] = {**ZOO, "stdit3": build_stdit3_block}

KEEP_FP: dict[str, list[str]] = {
    "pixart": _PIXART_KEEP,
    "dit": _DIT_KEEP,
    "latte": _LATTE_KEEP,
    "flux": _FLUX_KEEP,
    "stdit3": stdit3_keep_fp(),
}
QUANTIZE: dict[str, list[str]] = {
    "pixart": _PIXART_QUANT,
    "dit": _DIT_QUANT,
    "latte": _LATTE_QUANT,
    "flux": _FLUX_QUANT,
    "stdit3": stdit3_quantize(),
}
