"""Diffusers pipelines end to end, through their own sampling loops.

A tiny ``PixArtSigmaPipeline`` (prompt embeddings passed directly: no tokenizer, no text encoder)
and a tiny ``DiTPipeline``, seeded, 4 DPM-Solver++ steps with classifier-free guidance (the
transformer sees the CFG batch of 2), decoded by a seeded ``AutoencoderKL``. Each generates:

a. in floating point: the reference;
b. with ``pipe.transformer = torch.compile(transformer, backend="viditq")`` (W8A8);
c. with a ``vq.quantize``-d transformer saved, loaded with ``vq.load`` and plugged in through
   ``viditq_compile.io.diffusers_adapter.as_diffusers_transformer``, also at another batch size;
d. with regional compilation: each ``transformer_blocks[i].compile(backend="viditq")``.

Closeness to floating point is the SQNR of the final latents (what the sampler produces, read at
the VAE's input) and the PSNR of the decoded images ([0, 1]). Measured on this machine (torch 2.13
CPU, 2 cores):

    vs fp, latents SQNR / image PSNR (dB)   b compiled    c loaded      c batch 4     d regional
    PixArt-Σ                                49.5 / 67.8   49.5 / 67.8   47.7 / 64.9   49.5 / 67.8
    DiT                                     45.3 / 60.0   45.2 / 60.0   44.8 / 60.2   45.3 / 60.0

The three quantized paths agree with each other to 85.9 dB or more (the same W8A8 numerics; only
float rounding differs between Inductor's kernels and eager). One W8A8 call on these heavy-tailed
random weights is 35-40 dB from fp (``tests/test_backend.py``); the latents score higher because
the initial noise, which quantization does not touch, is most of their energy after 4 steps.
Floors: latents >= 40 dB (about 5 dB under the lowest measurement), images >= 50 dB, paths
agreeing >= 60 dB. A block running another block's quantized weights (what regional compilation
did before the backend took quantized weights as graph inputs) scores 17.6 / 32.5 dB (PixArt)
and 11.6 / 25.7 dB (DiT), far below them.

Under regional compilation block 0 gets a graph of its own (its input, the patch embedding's
output, is strided) and blocks 1 and 2 share one, each with its own quantized weights.

The PixArt-Σ cases need ``transformers`` (``diffusers`` imports its pipeline module only then)
and skip without it; the DiT cases need only ``diffusers`` (about 75 s with a cold Inductor cache
on 2 busy cores). PixArt-Σ's whole-model compile is marked slow (about 40 s).
Compile times: ``benchmarks/compile_times.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

import viditq_compile as vq
from tests.zoo import _seeded as zoo_seeded
from viditq_compile import backend
from viditq_compile.numerics.quant import sqnr_db

diffusers = pytest.importorskip("diffusers")

NUM_BLOCKS = 3  # under regional compilation blocks 1 and 2 share a compiled graph
STEPS = 4
SQNR_FLOOR_DB = 40.0  # latents vs fp; measured 44.8-49.5 dB (see the module docstring)
PSNR_FLOOR_DB = 50.0  # images in [0, 1] vs fp; measured 60.0-67.8 dB
AGREE_DB = 60.0  # latents of the quantized paths vs each other; measured >= 85.9 dB

_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
_FF = ("ff.net.0.proj", "ff.net.2")
BLOCK_QUANTIZED = {
    "pixart": tuple(f"attn1.{n}" for n in _ATTN) + tuple(f"attn2.{n}" for n in _ATTN) + _FF,
    "dit": tuple(f"attn1.{n}" for n in _ATTN) + _FF,
}
BLOCK_FP = {  # linears inside a block that stay fp: adaLN's timestep/class embedder + modulation
    "pixart": (),
    "dit": ("norm1.emb.timestep_embedder.linear_1", "norm1.emb.timestep_embedder.linear_2",
            "norm1.linear"),
}
MODEL_FP = {  # outside the blocks: embedders, caption projection, final projection
    "pixart": ("adaln_single.emb.timestep_embedder.linear_1",
               "adaln_single.emb.timestep_embedder.linear_2", "adaln_single.linear",
               "caption_projection.linear_1", "caption_projection.linear_2", "proj_out"),
    "dit": ("proj_out_1", "proj_out_2"),
}


def _blocks(kind: str, names) -> list[str]:
    return [f"transformer_blocks.{i}.{n}" for i in range(NUM_BLOCKS) for n in names]


# --------------------------------------------------------------------------------------------
# tiny seeded pipelines
# --------------------------------------------------------------------------------------------


def _seeded(factory, seed: int):
    return zoo_seeded(factory, seed).requires_grad_(False)


def _vae():
    from diffusers import AutoencoderKL

    return _seeded(lambda: AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
        layers_per_block=1, sample_size=32), seed=7)


def build_transformer(kind: str):
    """The PixArt config of ``tests/zoo.build_pixart`` (hidden 128, 16x16 latent, captions of
    width 64) and the DiT config of ``build_dit`` (hidden 64, 8x8 latent) with ``NUM_BLOCKS``
    blocks; DiT has 1000 classes because ``DiTPipeline`` uses label 1000 as the null class."""
    if kind == "pixart":
        from diffusers import PixArtTransformer2DModel

        return _seeded(lambda: PixArtTransformer2DModel(
            num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=8,
            num_layers=NUM_BLOCKS, cross_attention_dim=128, sample_size=16, patch_size=2,
            caption_channels=64, use_additional_conditions=False, norm_elementwise_affine=False,
            norm_eps=1e-6), seed=0)
    from diffusers import DiTTransformer2DModel

    return _seeded(lambda: DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8,
        num_layers=NUM_BLOCKS, sample_size=8, patch_size=2, num_embeds_ada_norm=1000), seed=0)


def _needs(kind: str) -> None:
    if kind == "pixart" and not diffusers.utils.is_transformers_available():
        pytest.skip("PixArtSigmaPipeline needs the transformers package (pip install transformers)")


def build_pipeline(kind: str, transformer):
    from diffusers import DPMSolverMultistepScheduler

    if kind == "pixart":
        from diffusers import PixArtSigmaPipeline

        pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=_vae(),
                                   transformer=transformer, scheduler=DPMSolverMultistepScheduler())
    else:
        from diffusers import DiTPipeline

        pipe = DiTPipeline(transformer=transformer, vae=_vae(), scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _prompts(n: int):
    """Caption embeddings for ``n`` prompts and the negative prompt, with padded masks."""
    g = torch.Generator().manual_seed(3)
    emb, neg = torch.randn(n, 8, 64, generator=g), torch.randn(n, 8, 64, generator=g)
    mask, nmask = torch.ones(n, 8, dtype=torch.int64), torch.ones(n, 8, dtype=torch.int64)
    mask[:, 6:] = 0
    nmask[:, 3:] = 0
    return dict(prompt_embeds=emb, prompt_attention_mask=mask, negative_prompt_embeds=neg,
                negative_prompt_attention_mask=nmask)


def generate(kind: str, pipe, prompts: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(latents, images)``: the sampler's final latents as the VAE receives them, and the
    decoded images ([N, 3, 32, 32] for PixArt, [N, 3, 16, 16] for DiT, in [0, 1])."""
    seen = []
    hook = pipe.vae.post_quant_conv.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        generator = torch.Generator().manual_seed(0)
        if kind == "pixart":
            images = pipe(negative_prompt=None, **_prompts(prompts), num_inference_steps=STEPS,
                          guidance_scale=4.5, generator=generator, output_type="pt",
                          use_resolution_binning=False).images
        else:
            images = pipe(class_labels=[1, 207, 360, 999][:prompts], num_inference_steps=STEPS,
                          guidance_scale=4.0, generator=generator, output_type="pt").images
    finally:
        hook.remove()
    return seen[-1], images


def psnr_db(reference: torch.Tensor, images: torch.Tensor) -> float:
    mse = float(((reference.double() - images.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def assert_close_to(reference, result, floor_db: float, what: str) -> None:
    (ref_latents, ref_images), (latents, images) = reference, result
    assert torch.isfinite(latents).all() and torch.isfinite(images).all()
    s, p = sqnr_db(ref_latents, latents), psnr_db(ref_images, images)
    assert s >= floor_db, f"{what}: latents SQNR {s:.1f} dB < {floor_db} dB"
    assert p >= PSNR_FLOOR_DB, f"{what}: image PSNR {p:.1f} dB < {PSNR_FLOOR_DB} dB"


# --------------------------------------------------------------------------------------------
# shared results: computed once per module, asserted on by the tests below
# --------------------------------------------------------------------------------------------


class Runs:
    """Per pipeline kind, each computed once and shared by the tests below: the fp reference and
    the first transformer call the pipeline made (recorded with a forward pre-hook), the
    quantized program exported from that call, and the pipeline's result with it saved, loaded
    and plugged in (the compile-free W8A8 result the compiled ones are checked against)."""

    def __init__(self, kind: str, tmp_dir):
        self.kind = kind
        self.tmp_dir = tmp_dir
        transformer = build_transformer(kind)
        calls = []
        hook = transformer.register_forward_pre_hook(
            lambda m, a, k: calls.append((a, dict(k))) if not calls else None, with_kwargs=True)
        with torch.no_grad():
            self.fp = generate(kind, build_pipeline(kind, transformer))
        hook.remove()
        self.call = calls[0]
        self._quantized = self._loaded = None

    def quantized(self) -> vq.QuantizedModel:
        """W8A8, exported with the pipeline's own call (CFG batch 2)."""
        if self._quantized is None:
            args, kwargs = self.call
            self._quantized = vq.quantize(build_transformer(self.kind), args, kwargs, recipe="w8a8")
        return self._quantized

    def loaded(self):
        """(result, adapter): saved, loaded with ``vq.load`` and wrapped for the pipeline with the
        model config saved beside it."""
        from viditq_compile.io.diffusers_adapter import as_diffusers_transformer

        if self._loaded is None:
            self.quantized().save(self.tmp_dir / "q")
            build_transformer(self.kind).save_config(self.tmp_dir / "config")
            cls = diffusers.PixArtTransformer2DModel if self.kind == "pixart" \
                else diffusers.DiTTransformer2DModel
            adapter = as_diffusers_transformer(vq.load(self.tmp_dir / "q"),
                                               cls.load_config(self.tmp_dir / "config"))
            pipe = build_pipeline(self.kind, build_transformer(self.kind))
            pipe.transformer = adapter
            self._loaded = generate(self.kind, pipe), adapter
        return self._loaded


_RUNS: dict[str, Runs] = {}


def _runs(kind: str, tmp_path_factory) -> Runs:
    _needs(kind)
    if kind not in _RUNS:
        _RUNS[kind] = Runs(kind, tmp_path_factory.mktemp(kind))
    return _RUNS[kind]


@pytest.fixture(params=["pixart", "dit"])
def runs(request, tmp_path_factory) -> Runs:
    return _runs(request.param, tmp_path_factory)


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------


def test_fp_pipeline_generates(runs):
    latents, images = runs.fp
    assert torch.isfinite(latents).all()
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0.05
    assert latents.shape[0] == 1
    args, kwargs = runs.call
    if runs.kind == "pixart":  # the call the adapter must reproduce: latents positional
        assert len(args) == 1 and args[0].shape == (2, 4, 16, 16)
        assert sorted(kwargs) == ["added_cond_kwargs", "encoder_attention_mask",
                                  "encoder_hidden_states", "return_dict", "timestep"]
        assert kwargs["return_dict"] is False
    else:
        assert len(args) == 1 and args[0].shape == (2, 4, 8, 8)
        assert sorted(kwargs) == ["class_labels", "timestep"]


# PixArt's whole-model compile takes about 40 s on 2 cores with a cold Inductor cache
@pytest.mark.parametrize("kind", [pytest.param("pixart", marks=pytest.mark.slow), "dit"])
def test_compiled_transformer_in_the_pipeline(kind, tmp_path_factory):
    runs = _runs(kind, tmp_path_factory)
    pipe = build_pipeline(kind, build_transformer(kind))
    n0 = len(backend.REPORTS)
    pipe.transformer = torch.compile(pipe.transformer, backend="viditq")
    result = generate(kind, pipe)
    reports = list(backend.REPORTS)[n0:]

    assert_close_to(runs.fp, result, SQNR_FLOOR_DB, "torch.compile(backend='viditq')")
    assert sqnr_db(runs.loaded()[0][0], result[0]) >= AGREE_DB
    assert len(reports) == 1, "the transformer compiled as more than one graph"
    report = reports[0]
    quantized = [r.name for r in report.rows if r.quantized]
    fp = sorted(r.name for r in report.rows if not r.quantized)
    assert sorted(quantized) == sorted(_blocks(kind, BLOCK_QUANTIZED[kind]))
    assert fp == sorted(_blocks(kind, BLOCK_FP[kind]) + list(MODEL_FP[kind]))
    assert all(r.weight_bits == 8 and r.act_bits == 8 for r in report.rows if r.quantized)
    assert all(r.note.startswith("kept by the graph: ") for r in report.rows if not r.quantized)


def test_saved_and_loaded_transformer_in_the_pipeline(runs):
    from viditq_compile.io.diffusers_adapter import DiffusersTransformer

    kind = runs.kind
    result, adapter = runs.loaded()
    assert isinstance(adapter, DiffusersTransformer)
    assert adapter.dtype == torch.float32 and adapter.device.type == "cpu"
    assert adapter.config.sample_size == (16 if kind == "pixart" else 8)
    rows = adapter.quantized.report.rows
    assert sorted(r.name for r in rows if r.quantized) == sorted(_blocks(kind, BLOCK_QUANTIZED[kind]))
    assert_close_to(runs.fp, result, SQNR_FLOOR_DB, "loaded artifact")

    # another batch than the export's (2 prompts: CFG batch 4), through the dynamic batch dim
    with torch.no_grad():
        reference = generate(kind, build_pipeline(kind, build_transformer(kind)), prompts=2)
    pipe = build_pipeline(kind, build_transformer(kind))
    pipe.transformer = adapter
    result = generate(kind, pipe, prompts=2)
    assert result[1].shape[0] == 2
    assert_close_to(reference, result, SQNR_FLOOR_DB, "loaded artifact, batch 4")


def test_adapter_binds_calls_to_the_model_signature(runs):
    """Latents by keyword, ``return_dict`` either way; a differing baked-in constant is refused."""
    from viditq_compile.io.diffusers_adapter import as_diffusers_transformer

    transformer = build_transformer(runs.kind)
    args, kwargs = runs.call
    adapter = as_diffusers_transformer(runs.quantized(), transformer)
    positional = adapter(*args, **kwargs)
    kw = dict(kwargs, hidden_states=args[0])
    kw.pop("return_dict", None)
    sample = adapter(**kw).sample
    as_tuple = adapter(**kw, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], sample)
    assert torch.equal(positional[0] if isinstance(positional, tuple) else positional.sample, sample)
    if runs.kind == "pixart":
        bad = dict(kw, added_cond_kwargs={"resolution": torch.ones(2, 2), "aspect_ratio": None})
        with pytest.raises(ValueError, match="resolution"):
            adapter(**bad)


def test_regional_compilation_in_the_pipeline(runs):
    kind = runs.kind
    transformer = build_transformer(kind)
    pipe = build_pipeline(kind, transformer)
    for block in transformer.transformer_blocks:  # as diffusers' compile_repeated_blocks does
        block.compile(backend="viditq")
    n0 = len(backend.REPORTS)
    result = generate(kind, pipe)
    reports = list(backend.REPORTS)[n0:]

    # block 0 takes a strided input (patch embedding output) and gets a graph of its own;
    # blocks 1 and 2 run one graph, each with its own quantized weights
    assert len(reports) == 2 < NUM_BLOCKS
    # names are full paths in the model (the block that compiled the graph first)
    for i, report in zip((0, 1), reports):
        prefix = f"transformer_blocks.{i}."
        assert sorted(r.name for r in report.rows if r.quantized) == sorted(prefix + n for n in BLOCK_QUANTIZED[kind])
        assert sorted(r.name for r in report.rows if not r.quantized) == sorted(prefix + n for n in BLOCK_FP[kind])
    for name in _blocks(kind, BLOCK_QUANTIZED[kind]):
        weight = transformer.get_submodule(name).weight
        assert weight in backend._QUANTIZED_WEIGHTS, f"{name}: weight never quantized"

    assert_close_to(runs.fp, result, SQNR_FLOOR_DB, "regional compilation")
    assert sqnr_db(runs.loaded()[0][0], result[0]) >= AGREE_DB
