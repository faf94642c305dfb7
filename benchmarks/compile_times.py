"""Cold and warm compile times of the ``viditq`` backend in a diffusers pipeline: the whole
transformer compiled vs regional compilation of its repeated blocks.

    .venv/bin/python benchmarks/compile_times.py [--pipeline pixart|dit] [--blocks 4 28]

Modes: ``whole`` is ``pipe.transformer = torch.compile(pipe.transformer, backend="viditq")``;
``regional`` is ``block.compile(backend="viditq")`` on every ``transformer_blocks[i]``, as
diffusers' ``compile_repeated_blocks`` does (PixArt and DiT do not declare ``_repeated_blocks``
in diffusers 0.42, so the blocks are compiled directly).

Each measurement runs in a fresh Python process and times the first pipeline call, which
compiles (4 DPM-Solver++ steps with classifier-free guidance, decoded by a tiny VAE):

- cold: an empty ``TORCHINDUCTOR_CACHE_DIR``, so Inductor generates and builds every kernel;
- warm: a second process on the same cache directory. Dynamo traces and the backend quantizes
  again; Inductor's FX graph and AOTAutograd caches give back the compiled code.

A second call (nothing left to compile) and the fp eager call are given for reference, with the
number of graphs the backend compiled and the SQNR of the images against the fp pipeline's
(the same seeds). Workers run with ``OMP_NUM_THREADS=--threads`` (default
1): these models are tiny, and on a machine with other work, OpenMP barriers with more threads
than free cores stall for seconds per call. Models: the tiny seeded configs of
``tests/test_pipeline.py`` (PixArt hidden 128, 16x16 latent; DiT hidden 64, 8x8 latent) with
``--blocks`` transformer blocks; self-contained, nothing is imported from ``tests/``. PixArt's
pipeline needs the ``transformers`` package; without it the default is DiT. Timings depend on the
machine's load: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def _seeded(factory, seed: int):
    import torch

    from viditq_demo.demo_model import heavy_tailed_

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = factory()
    heavy_tailed_(module, torch.Generator().manual_seed(seed))
    return module.eval().requires_grad_(False)


def build_pipeline(kind: str, blocks: int):
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler

    vae = _seeded(lambda: AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
        layers_per_block=1, sample_size=32), seed=7)
    if kind == "pixart":
        from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel

        transformer = _seeded(lambda: PixArtTransformer2DModel(
            num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=8,
            num_layers=blocks, cross_attention_dim=128, sample_size=16, patch_size=2,
            caption_channels=64, use_additional_conditions=False, norm_elementwise_affine=False,
            norm_eps=1e-6), seed=0)
        pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=vae,
                                   transformer=transformer, scheduler=DPMSolverMultistepScheduler())
    else:
        from diffusers import DiTPipeline, DiTTransformer2DModel

        transformer = _seeded(lambda: DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8,
            num_layers=blocks, sample_size=8, patch_size=2, num_embeds_ada_norm=1000), seed=0)
        pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(kind: str, pipe):
    import torch

    generator = torch.Generator().manual_seed(0)
    if kind == "pixart":
        g = torch.Generator().manual_seed(3)
        mask = torch.ones(1, 8, dtype=torch.int64)
        return pipe(negative_prompt=None, prompt_embeds=torch.randn(1, 8, 64, generator=g),
                    prompt_attention_mask=mask, negative_prompt_embeds=torch.randn(1, 8, 64, generator=g),
                    negative_prompt_attention_mask=mask, num_inference_steps=4, guidance_scale=4.5,
                    generator=generator, output_type="pt", use_resolution_binning=False).images
    return pipe(class_labels=[207], num_inference_steps=4, guidance_scale=4.0, generator=generator,
                output_type="pt").images


def worker(kind: str, mode: str, blocks: int) -> dict:
    """One measurement, in this process (TORCHINDUCTOR_CACHE_DIR set by the caller)."""
    import torch

    from viditq_compile import backend
    from viditq_compile.numerics.quant import sqnr_db

    pipe = build_pipeline(kind, blocks)
    with torch.no_grad():
        reference = generate(kind, pipe)
    if mode == "whole":
        pipe.transformer = torch.compile(pipe.transformer, backend="viditq")
    elif mode == "regional":
        for block in pipe.transformer.transformer_blocks:
            block.compile(backend="viditq")
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        with torch.no_grad():
            images = generate(kind, pipe)
        times.append(time.perf_counter() - t0)
    return {"first_s": times[0], "second_s": times[1], "graphs": len(backend.REPORTS),
            "sqnr_db": sqnr_db(reference, images)}


def _run_worker(kind: str, mode: str, blocks: int, cache_dir: str, threads: int) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir, OMP_NUM_THREADS=str(threads))
    r = subprocess.run([sys.executable, __file__, "--worker", mode, "--pipeline", kind,
                        "--blocks", str(blocks)], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{mode} ({blocks} blocks) failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _default_kind() -> str:
    from diffusers.utils import is_transformers_available

    return "pixart" if is_transformers_available() else "dit"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", choices=("pixart", "dit"), default=None)
    parser.add_argument("--blocks", type=int, nargs="+", default=[4, 28])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", choices=("eager", "whole", "regional"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    kind = args.pipeline or _default_kind()
    if args.worker:
        print(json.dumps(worker(kind, args.worker, args.blocks[0])))
        return

    rows = []
    for blocks in args.blocks:
        with tempfile.TemporaryDirectory() as cache:
            eager = _run_worker(kind, "eager", blocks, cache, args.threads)
        for mode in ("whole", "regional"):
            with tempfile.TemporaryDirectory() as cache:
                cold = _run_worker(kind, mode, blocks, cache, args.threads)
                warm = _run_worker(kind, mode, blocks, cache, args.threads)
            rows.append((blocks, mode, cold, warm, eager))
            print(f"{kind}, {blocks} blocks, {mode}: cold {cold['first_s']:.1f} s, warm "
                  f"{warm['first_s']:.1f} s", file=sys.stderr)

    import torch

    print(f"{'PixArt-Σ' if kind == 'pixart' else 'DiT'} pipeline, 4 steps with CFG; torch "
          f"{torch.__version__}, {os.cpu_count()} CPUs, {args.threads} thread(s), load average "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| blocks | compile | cold first call (s) | warm first call (s) | second call (s) "
          "| fp eager call (s) | graphs compiled | images vs fp (dB) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for blocks, mode, cold, warm, eager in rows:
        print(f"| {blocks} | {mode} | {cold['first_s']:.1f} | {warm['first_s']:.1f} | "
              f"{warm['second_s']:.2f} | {eager['second_s']:.2f} | {cold['graphs']} | "
              f"{cold['sqnr_db']:.1f} |")


if __name__ == "__main__":
    main()
