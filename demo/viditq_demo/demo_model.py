"""A built-in demo diffusion transformer (pure torch, no diffusers needed).

`DemoDiT` is a PixArt-α/Σ-style text-to-image DiT whose module names, parameter names and
numerics follow diffusers' `PixArtTransformer2DModel` (norm_type="ada_norm_single",
`use_additional_conditions=False`, no attention masks), so one set of layer-name regexes
serves both. Loading a `DemoDiT` state dict into a `PixArtTransformer2DModel` of the same
shape gives the same outputs (up to the float32 vs float64 position-embedding arithmetic).

Layers (per block `transformer_blocks.{i}`):
  `attn1.to_q/to_k/to_v/to_out.0`   self-attention over image tokens
  `attn2.to_q/to_k/to_v/to_out.0`   cross-attention to the projected caption tokens
  `ff.net.0.proj`, `ff.net.2`       MLP with tanh-GELU, width `mlp_ratio * hidden`
  `scale_shift_table` [6, hidden]   adaLN-single modulation table
Conditioning / IO: `pos_embed.proj` (Conv2d patch embedding), `adaln_single.emb.timestep_embedder
.linear_1/linear_2`, `adaln_single.linear`, `caption_projection.linear_1/linear_2`, `norm_out`,
`scale_shift_table` [2, hidden], `proj_out`.

Seeded weights "look trained" (`build_demo_model`): every Linear/Conv weight is drawn from a
Student-t law with 4 degrees of freedom at the default init's standard deviation
(`heavy_tailed_`), and a few hidden channels get a large adaLN scale/shift in every block
(`add_modulation_outliers_`), so the inputs of `attn1.to_*` and `ff.net.0.proj` carry the
10-30x channel outliers that make DiTs hard to quantize, partly timestep-dependent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DEFAULT_OUTLIER_SCALE",
    "DemoConfig",
    "DemoDiT",
    "DemoOutput",
    "add_modulation_outliers_",
    "build_demo_model",
    "demo_inputs",
    "heavy_tailed_",
    "student_t",
]

TIMESTEP_FREQ_DIM = 256  # sinusoidal timestep features, as in PixArt / DiT
_LN_EPS = 1e-6
# Gain applied to the rows of `adaln_single.linear` that produce the outlier channels' scales:
# makes the outliers timestep-dependent (the "dynamic" imbalance ViDiT-Q describes).
_DYNAMIC_OUTLIER_GAIN = 4.0
# `1 + adaLN scale` of the outlier channels: their modulated activations come out 15-30x
# (sometimes more, with the shift and the timestep term) the typical channel's.
DEFAULT_OUTLIER_SCALE = (15.0, 30.0)


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


def _check_positive_int(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}.{name}={value!r} must be a positive int")


@dataclass(frozen=True)
class DemoConfig:
    """Shape of a `DemoDiT`; `hidden_size = num_attention_heads * attention_head_dim`.

    `caption_length` is the number of caption tokens `demo_inputs` makes (the model itself
    accepts any length). `num_outlier_channels` hidden channels get an adaLN scale `s` with
    `1 + s` drawn uniformly from `outlier_scale` in every block (0 disables the outliers).
    """

    num_layers: int = 2
    num_attention_heads: int = 2
    attention_head_dim: int = 32
    in_channels: int = 4
    out_channels: int = 4
    sample_size: int = 16
    patch_size: int = 2
    caption_channels: int = 64
    caption_length: int = 8
    mlp_ratio: int = 4
    num_outlier_channels: int = 2
    outlier_scale: tuple[float, float] = DEFAULT_OUTLIER_SCALE

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for name in (
            "num_layers",
            "num_attention_heads",
            "attention_head_dim",
            "in_channels",
            "out_channels",
            "sample_size",
            "patch_size",
            "caption_channels",
            "caption_length",
            "mlp_ratio",
        ):
            _check_positive_int(owner, name, getattr(self, name))
        if self.sample_size % self.patch_size:
            raise ValueError(
                f"{owner}.sample_size={self.sample_size} is not divisible by patch_size={self.patch_size}"
            )
        if self.hidden_size % 4:
            raise ValueError(
                f"{owner}: hidden_size={self.hidden_size} (num_attention_heads={self.num_attention_heads} x "
                f"attention_head_dim={self.attention_head_dim}) is not divisible by 4, which the 2-D "
                "sin-cos position embedding needs"
            )
        n_out = self.num_outlier_channels
        if isinstance(n_out, bool) or not isinstance(n_out, int) or not 0 <= n_out <= self.hidden_size:
            raise ValueError(
                f"{owner}.num_outlier_channels={n_out!r} must be an int in [0, hidden_size={self.hidden_size}]"
            )
        lo_hi = self.outlier_scale
        if (
            not isinstance(lo_hi, tuple)
            or len(lo_hi) != 2
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in lo_hi)
            or not 1.0 <= lo_hi[0] <= lo_hi[1]
        ):
            raise ValueError(f"{owner}.outlier_scale={lo_hi!r} must be a (low, high) pair with 1 <= low <= high")

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def tiny(cls) -> DemoConfig:
        """2 layers, hidden 64, 8x8 latent patches: a forward takes about a millisecond."""
        return cls()

    @classmethod
    def demo(cls) -> DemoConfig:
        """8 layers, hidden 384 (6 heads x 64), MLP 1536, 32x32 latent = 256 tokens, 32 caption
        tokens: about 20 M parameters, roughly 0.1-0.3 s per batch-2 fp32 eager forward on 2 CPU
        cores."""
        return cls(
            num_layers=8,
            num_attention_heads=6,
            attention_head_dim=64,
            sample_size=32,
            caption_channels=512,
            caption_length=32,
            num_outlier_channels=4,
        )


# --------------------------------------------------------------------------------------------
# seeded "trained-looking" weights
# --------------------------------------------------------------------------------------------


def student_t(shape: tuple[int, ...], df: int, generator: torch.Generator) -> torch.Tensor:
    """Student-t samples with `df` (> 2, integer) degrees of freedom, rescaled to unit variance.

    Drawn only from `generator` (`t = z / sqrt(chi2_df / df)`, with chi2 built from uniforms and
    normals), so results are reproducible and the global RNG is untouched. Returns fp32 on CPU.
    """
    if isinstance(df, bool) or not isinstance(df, int) or df <= 2:
        raise ValueError(f"df={df!r} must be an int > 2 (finite variance)")
    z = torch.randn(shape, generator=generator)
    # chi2 with 2k degrees of freedom = -2 * sum of k log-uniforms; one more z^2 if df is odd.
    u = torch.rand((df // 2, *shape), generator=generator).clamp_(min=1e-12)
    chi2 = -2.0 * u.log().sum(0)
    if df % 2:
        chi2 += torch.randn(shape, generator=generator).square()
    t = z / (chi2 / df).sqrt()
    return t * math.sqrt((df - 2) / df)


def _default_init_std(weight: torch.Tensor) -> float:
    # nn.Linear / nn.ConvNd default: kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    fan_in = weight.shape[1] * math.prod(weight.shape[2:])
    return 1.0 / math.sqrt(3.0 * fan_in)


@torch.no_grad()
def heavy_tailed_(
    module: nn.Module, generator: torch.Generator, *, df: int = 4, bias_std: float = 0.02
) -> nn.Module:
    """Re-draw, in place, every `nn.Linear` / `nn.Conv*` weight in `module` from a Student-t law
    with `df` degrees of freedom at the std of PyTorch's default init for that layer, and every
    such bias from N(0, bias_std^2). Other parameters are left alone. Modules are visited in
    `named_modules()` order, so a given `generator` state always gives the same weights.

    Why: trained checkpoints have heavy-tailed weights; PyTorch's default uniform init has
    none, and on it rotations/quantizers behave unlike on real models. Returns `module`.
    """
    for _, layer in module.named_modules():
        if not isinstance(layer, (nn.Linear, nn.modules.conv._ConvNd)):
            continue
        w = layer.weight
        std = _default_init_std(w)
        w.copy_((student_t(tuple(w.shape), df, generator) * std).to(w.dtype))
        if layer.bias is not None:
            b = layer.bias
            b.copy_((torch.randn(tuple(b.shape), generator=generator) * bias_std).to(b.dtype))
    return module


@torch.no_grad()
def add_modulation_outliers_(
    model: nn.Module,
    generator: torch.Generator,
    *,
    num_channels: int,
    scale_range: tuple[float, float] = DEFAULT_OUTLIER_SCALE,
    timestep_linear: nn.Linear | None = None,
    dynamic_gain: float = _DYNAMIC_OUTLIER_GAIN,
) -> torch.Tensor:
    """Give `num_channels` hidden channels large adaLN modulation in every block, in place.

    Applies to every parameter of `model` named `*scale_shift_table` with shape [6, hidden]
    (PixArt / Latte / OpenSORA layout: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp,
    gate_mlp). For each chosen channel c and block, `1 + scale_{msa,mlp}[c]` is drawn from
    U(scale_range) and `shift_{msa,mlp}[c]` from U(-hi/4, hi/4), so the modulated inputs of the
    q/k/v and first MLP linears have a few channels 10-30x larger than the rest (static
    imbalance). If `timestep_linear` (the Linear producing the 6*hidden modulation from the
    timestep embedding, e.g. `adaln_single.linear` or `t_block.1`) is given, its rows feeding
    those channels' scales are multiplied by `dynamic_gain`, making the imbalance timestep
    dependent (dynamic imbalance). Returns the chosen channel indices (sorted, int64).
    """
    tables = [
        p
        for name, p in model.named_parameters()
        if name.rsplit(".", 1)[-1] == "scale_shift_table" and p.dim() == 2 and p.shape[0] == 6
    ]
    if not tables:
        raise ValueError("model has no [6, hidden] `scale_shift_table` parameter to modulate")
    hidden = tables[0].shape[1]
    if not 0 <= num_channels <= hidden:
        raise ValueError(f"num_channels={num_channels} must be in [0, hidden={hidden}]")
    lo, hi = scale_range
    if not 1.0 <= lo <= hi:
        raise ValueError(f"scale_range={scale_range!r} must satisfy 1 <= low <= high")
    channels = torch.randperm(hidden, generator=generator)[:num_channels].sort().values
    if num_channels == 0:
        return channels
    for table in tables:
        for scale_row, shift_row in ((1, 0), (4, 3)):
            amp = lo + (hi - lo) * torch.rand(num_channels, generator=generator)
            shift = (torch.rand(num_channels, generator=generator) * 2 - 1) * (hi / 4)
            table[scale_row, channels] = (amp - 1).to(table.dtype)
            table[shift_row, channels] = shift.to(table.dtype)
    if timestep_linear is not None:
        if timestep_linear.out_features != 6 * hidden:
            raise ValueError(
                f"timestep_linear.out_features={timestep_linear.out_features} != 6 * hidden ({6 * hidden})"
            )
        for scale_row in (1, 4):
            timestep_linear.weight[scale_row * hidden + channels] *= dynamic_gain
    return channels


# --------------------------------------------------------------------------------------------
# modules (names mirror diffusers)
# --------------------------------------------------------------------------------------------


def _sincos_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, embed_dim] (sin | cos), as diffusers' get_1d_sincos_pos_embed_from_grid."""
    omega = torch.arange(embed_dim // 2, device=pos.device, dtype=torch.float32) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d_pos_embed(
    embed_dim: int, height, width, base_size: int, interpolation_scale: float, device: torch.device
) -> torch.Tensor:
    """[1, height*width, embed_dim] fp32 2-D sin-cos position embedding, row-major tokens.

    Same values as diffusers' `get_2d_sincos_pos_embed(embed_dim, (height, width), base_size,
    interpolation_scale)` (which computes in float64), written with tensor ops only so that
    `height`/`width` may be symbolic under torch.export.
    """
    grid_h = torch.arange(height, device=device, dtype=torch.float32) / (height / base_size) / interpolation_scale
    grid_w = torch.arange(width, device=device, dtype=torch.float32) / (width / base_size) / interpolation_scale
    grid = torch.stack(torch.meshgrid(grid_w, grid_h, indexing="xy"), dim=0).reshape(2, -1)
    # diffusers names the first half "emb_h" but feeds it grid[0], the column coordinate
    emb = torch.cat([_sincos_1d(embed_dim // 2, grid[0]), _sincos_1d(embed_dim // 2, grid[1])], dim=1)
    return emb.unsqueeze(0)


def timestep_features(timesteps: torch.Tensor, dim: int = TIMESTEP_FREQ_DIM) -> torch.Tensor:
    """[B] timesteps (float or int) -> [B, dim] fp32 (cos | sin) features, as diffusers'
    `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    emb = timesteps[:, None].float() * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(emb), torch.sin(emb)], dim=-1)


class PatchEmbed(nn.Module):
    """[B, C, H, W] -> [B, (H/p)*(W/p), D] patch tokens + 2-D sin-cos position embedding."""

    def __init__(self, sample_size: int, patch_size: int, in_channels: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.base_size = sample_size // patch_size
        self.interpolation_scale = max(sample_size // 64, 1)
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        height, width = latent.shape[-2] // self.patch_size, latent.shape[-1] // self.patch_size
        x = self.proj(latent).flatten(2).transpose(1, 2)
        pos = sincos_2d_pos_embed(
            x.shape[-1], height, width, self.base_size, self.interpolation_scale, latent.device
        )
        return (x + pos).to(x.dtype)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class CombinedTimestepEmbeddings(nn.Module):
    """diffusers' PixArtAlphaCombinedTimestepSizeEmbeddings without the size conditions."""

    def __init__(self, embedding_dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(TIMESTEP_FREQ_DIM, embedding_dim)

    def forward(self, timestep: torch.Tensor, hidden_dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(timestep_features(timestep).to(hidden_dtype))


class AdaLayerNormSingle(nn.Module):
    """timestep [B] -> (modulation [B, 6*D], embedded timestep [B, D])."""

    def __init__(self, embedding_dim: int):
        super().__init__()
        self.emb = CombinedTimestepEmbeddings(embedding_dim)
        self.silu = nn.SiLU()
        self.linear = nn.Linear(embedding_dim, 6 * embedding_dim)

    def forward(self, timestep: torch.Tensor, hidden_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        embedded_timestep = self.emb(timestep, hidden_dtype)
        return self.linear(self.silu(embedded_timestep)), embedded_timestep


class TextProjection(nn.Module):
    """diffusers' PixArtAlphaTextProjection: Linear -> tanh-GELU -> Linear."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size)
        self.act_1 = nn.GELU(approximate="tanh")
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act_1(self.linear_1(caption)))


class Attention(nn.Module):
    """Multi-head attention with diffusers' layer names; cross-attention when `context` is given."""

    def __init__(self, query_dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner)
        self.to_k = nn.Linear(query_dim, inner)
        self.to_v = nn.Linear(query_dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        batch = x.shape[0]
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (t.reshape(batch, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, dim_head]
        out = out.transpose(1, 2).reshape(batch, -1, q.shape[1] * q.shape[-1])
        return self.to_out[1](self.to_out[0](out))


class GELU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.net = nn.ModuleList([GELU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """diffusers' BasicTransformerBlock with norm_type="ada_norm_single" (PixArt)."""

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_LN_EPS, elementwise_affine=False)
        self.attn1 = Attention(dim, heads, dim_head)
        self.norm2 = nn.LayerNorm(dim, eps=_LN_EPS, elementwise_affine=False)
        self.attn2 = Attention(dim, heads, dim_head)
        self.ff = FeedForward(dim, mlp_ratio)
        self.scale_shift_table = nn.Parameter(torch.empty(6, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + timestep.reshape(x.shape[0], 6, -1)
        ).chunk(6, dim=1)
        x = x + gate_msa * self.attn1(self.norm1(x) * (1 + scale_msa) + shift_msa)
        x = x + self.attn2(x, context)  # PixArt: cross-attention on the un-normalized stream
        x = x + gate_mlp * self.ff(self.norm2(x) * (1 + scale_mlp) + shift_mlp)
        return x


@dataclass(frozen=True)
class DemoOutput:
    sample: torch.Tensor


class DemoDiT(nn.Module):
    """PixArt-style DiT: forward(hidden_states [B, C, H, W], encoder_hidden_states [B, L,
    caption_channels], timestep [B] float or int) -> sample [B, out_channels, H, W].

    H and W must be multiples of `patch_size`; batch, caption length, H and W are free (no
    data-dependent Python branches), so all four can be dynamic under torch.export.
    Build seeded instances with `build_demo_model`; the constructor leaves weights uninitialized
    (meta-friendly).
    """

    def __init__(self, config: DemoConfig):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        # registration order mirrors diffusers' PixArtTransformer2DModel (same state_dict order)
        self.pos_embed = PatchEmbed(config.sample_size, config.patch_size, config.in_channels, dim)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(dim, config.num_attention_heads, config.attention_head_dim, config.mlp_ratio)
            for _ in range(config.num_layers)
        )
        self.norm_out = nn.LayerNorm(dim, eps=_LN_EPS, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.empty(2, dim))
        self.proj_out = nn.Linear(dim, config.patch_size * config.patch_size * config.out_channels)
        self.adaln_single = AdaLayerNormSingle(dim)
        self.caption_projection = TextProjection(config.caption_channels, dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        return_dict: bool = True,
    ) -> DemoOutput | tuple[torch.Tensor]:
        p, c_out = self.config.patch_size, self.config.out_channels
        batch = hidden_states.shape[0]
        height, width = hidden_states.shape[-2] // p, hidden_states.shape[-1] // p

        x = self.pos_embed(hidden_states)
        t_mod, embedded_timestep = self.adaln_single(timestep, x.dtype)
        context = self.caption_projection(encoder_hidden_states)
        for block in self.transformer_blocks:
            x = block(x, context, t_mod)

        shift, scale = (self.scale_shift_table[None] + embedded_timestep[:, None]).chunk(2, dim=1)
        x = self.norm_out(x) * (1 + scale) + shift
        x = self.proj_out(x)
        x = x.reshape(batch, height, width, p, p, c_out)
        x = torch.einsum("nhwpqc->nchpwq", x)
        sample = x.reshape(batch, c_out, height * p, width * p)
        if not return_dict:
            return (sample,)
        return DemoOutput(sample=sample)


# --------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def _init_weights_(model: DemoDiT, generator: torch.Generator) -> None:
    cfg = model.config
    dim = cfg.hidden_size
    heavy_tailed_(model, generator)
    for block in model.transformer_blocks:
        block.scale_shift_table.copy_(torch.randn(6, dim, generator=generator) / dim**0.5)  # type: ignore[operator]  # ModuleList yields plain Modules
    model.scale_shift_table.copy_(torch.randn(2, dim, generator=generator) / dim**0.5)
    add_modulation_outliers_(
        model,
        generator,
        num_channels=cfg.num_outlier_channels,
        scale_range=cfg.outlier_scale,
        timestep_linear=model.adaln_single.linear,
    )


def build_demo_model(config: DemoConfig | None = None, seed: int = 0) -> DemoDiT:
    """A `DemoDiT` (default `DemoConfig.demo()`) in eval mode, fp32 on CPU, with weights drawn
    only from `torch.Generator().manual_seed(seed)`: the same seed always gives the same model,
    and the global RNG is not touched."""
    config = DemoConfig.demo() if config is None else config
    if not isinstance(config, DemoConfig):
        raise ValueError(f"config={config!r} must be a DemoConfig or None")
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = DemoDiT(config)
    model.to_empty(device="cpu")
    _init_weights_(model, generator)
    return model.eval()


def demo_inputs(
    config: DemoConfig, batch: int = 2, seed: int = 0, caption_length: int | None = None
) -> dict:
    """Keyword arguments for `DemoDiT.forward`: `hidden_states` [batch, in_channels, S, S]
    (S = sample_size), `encoder_hidden_states` [batch, caption_length, caption_channels]
    (default length `config.caption_length`), `timestep` [batch] fp32 spread over [0, 1000)
    (one value per stratum of width 1000/batch), and `return_dict=False`."""
    _check_positive_int("demo_inputs", "batch", batch)
    length = config.caption_length if caption_length is None else caption_length
    _check_positive_int("demo_inputs", "caption_length", length)
    g = torch.Generator().manual_seed(seed)
    s = config.sample_size
    return {
        "hidden_states": torch.randn(batch, config.in_channels, s, s, generator=g),
        "encoder_hidden_states": torch.randn(batch, length, config.caption_channels, generator=g),
        "timestep": (torch.arange(batch) + torch.rand(batch, generator=g)) * (1000.0 / batch),
        "return_dict": False,
    }
