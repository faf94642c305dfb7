"""Mixed-precision search: how long it takes on a PixArt-Σ-sized model, and what it buys on the
outlier PixArt.

Run: ``make bench-search`` (or ``pytest -q benchmarks/test_bench_search.py --benchmark-only -s``).
Each test runs once (``benchmark.pedantic``, one round): a search is minutes, not microseconds,
and what matters is the figure with its setup, recorded in ``extra_info`` and printed as the
table in ``benchmarks/RESULTS.md``.

- ``test_search_time_pixart_sigma``: the diffusers ``PixArtTransformer2DModel`` at PixArt-Σ's
  widths (28 blocks, hidden 1152 = 16 x 72, MLP 4608, caption 4096 -> 1152; 0.6 B parameters,
  fp32) with a reduced token count (8x8 latent: 16 image tokens, 8 caption tokens), 2 calibration
  calls with CFG pairs (batch 2), every block linear its own unit (280 units), W8A8 / W4A8
  candidates, budget 4.5 weight bits. Environment ``VIDITQ_BENCH_SEARCH_LAYERS`` sets the depth
  (default 28), ``VIDITQ_BENCH_SEARCH_GROUP=module`` scores q/k/v/out of an attention (and the two
  MLP linears) together (84 units).
- ``test_mixed_precision_quality``: the outlier PixArt of the ablation (tiny config, four channels
  10-100x larger through the adaLN table, moving with the timestep), calibrated and searched on a
  6-step trajectory of CFG pairs, evaluated on another: output SQNR, average bits and weight bytes
  of uniform W8A8, uniform W4A8, ``w4a8-mp``, ``w4a4-mp`` and a timestep-aware W4A8-MP.
"""

from __future__ import annotations

import logging
import os
import time

import pytest
import torch

import viditq_compile as vq
from viditq_compile.mixed_precision.metrics import cfg_direction
from viditq_compile.mixed_precision.sensitivity import first_tensor, run_calls
from viditq_compile.numerics import quant as numerics
from viditq_demo.demo_model import add_modulation_outliers_, heavy_tailed_

TRAJECTORY = (999, 800, 600, 400, 200, 20)


def pixart(layers: int, heads: int, head_dim: int, caption: int, sample: int, seed: int = 0):
    from diffusers import PixArtTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PixArtTransformer2DModel(
            num_layers=layers, num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
            out_channels=8, sample_size=sample, patch_size=2, caption_channels=caption,
            cross_attention_dim=heads * head_dim, norm_type="ada_norm_single",
            use_additional_conditions=False, norm_elementwise_affine=False, norm_eps=1e-6)
    heavy_tailed_(model, torch.Generator().manual_seed(seed))
    return model.eval()


def cfg_calls(sample: int, caption: int, tokens: int, seed: int, timesteps=TRAJECTORY):
    """One latent per step, twice; unconditional caption first, then the prompt (as pipelines)."""
    g = torch.Generator().manual_seed(seed)
    calls = []
    for t in timesteps:
        latent = torch.randn(1, 4, sample, sample, generator=g).expand(2, -1, -1, -1).contiguous()
        calls.append(((), {"hidden_states": latent,
                           "encoder_hidden_states": torch.randn(2, tokens, caption, generator=g),
                           "timestep": torch.full((2,), t, dtype=torch.long),
                           "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
                           "return_dict": False}))
    return calls


def _quantized_stats(plan) -> tuple[float, float, int]:
    """Average weight bits (parameter-weighted, over ranges), average activation bits (per
    layer, over ranges) and stored weight bytes (every version) of the quantized layers."""
    wsum = asum = params = n = 0.0
    nbytes = 0
    for lp in plan.layers.values():
        if not lp.quantized:
            continue
        versions = lp.versions()
        p = lp.in_features * lp.out_features
        wsum += p * sum(v[0] for v in versions) / len(versions)
        asum += sum(v[1] for v in versions) / len(versions)
        params += p
        n += 1
        nbytes += sum(lp.weight_bytes(w, sym) for w, sym in {(v[0], v[2]) for v in versions})
    return wsum / params, asum / n, nbytes


@pytest.mark.benchmark(group="search")
def test_search_time_pixart_sigma(benchmark):
    logging.getLogger("viditq_compile").setLevel(logging.ERROR)
    layers = int(os.environ.get("VIDITQ_BENCH_SEARCH_LAYERS", "28"))
    group = os.environ.get("VIDITQ_BENCH_SEARCH_GROUP", "layer")
    t0 = time.perf_counter()
    model = pixart(layers, heads=16, head_dim=72, caption=4096, sample=8)
    build_s = time.perf_counter() - t0
    calls = cfg_calls(sample=8, caption=4096, tokens=8, seed=1, timesteps=(999, 500))
    result = {}

    def run():
        result["plan"] = vq.search(model, calls, vq.Budget(weight_bits=4.5, act_bits=8), group=group)

    benchmark.pedantic(run, rounds=1, iterations=1)
    rec = result["plan"].search
    params = sum(p.numel() for p in model.parameters())
    info = dict(layers=layers, group=group, params=params, build_s=round(build_s, 1), units=len(rec["choice"]),
                candidates=rec["candidates"], calls=len(calls), search_s=round(rec["seconds"], 1),
                achieved_weight_bits=round(rec["achieved"]["weight_bits"], 3),
                measured_sqnr_db=[round(x, 2) for x in rec["measured_sqnr_db"]],
                w8_units=sum(rec["candidates"][c[0]][0] == 8 for c in rec["choice"].values()),
                threads=torch.get_num_threads(), torch=torch.__version__)
    benchmark.extra_info.update(info)
    print(f"\nsearch on PixArt-Σ-sized ({layers} blocks, {params / 1e6:.0f} M params, group {group}): "
          f"{info['search_s']} s for {info['units']} units x {len(rec['candidates'])} widths x "
          f"{len(calls)} calls; {info['w8_units']} units at W8, "
          f"{info['achieved_weight_bits']} weight bits, measured {info['measured_sqnr_db']} dB")
    assert rec["achieved"]["weight_bits"] <= 4.5


@pytest.mark.benchmark(group="search")
def test_mixed_precision_quality(benchmark):
    logging.getLogger("viditq_compile").setLevel(logging.ERROR)
    model = pixart(2, heads=4, head_dim=32, caption=64, sample=16)
    add_modulation_outliers_(model, torch.Generator().manual_seed(7), num_channels=4,
                             scale_range=(10.0, 100.0), timestep_linear=model.adaln_single.linear)
    calib = cfg_calls(sample=16, caption=64, tokens=8, seed=1)
    evals = cfg_calls(sample=16, caption=64, tokens=8, seed=2)
    ref = run_calls(model, evals)
    rows = {}

    def sqnr(plan) -> tuple[float, float]:
        """Output SQNR and guidance-direction (cond - uncond) SQNR over the evaluation calls."""
        qm = vq.quantize(model, (), evals[0][1], plan=plan)
        out = [first_tensor(qm(*a, **k)) for a, k in evals]
        flat = [torch.cat([x.flatten() for x in xs]) for xs in (ref, out)]
        dirs = [torch.cat([cfg_direction(x).flatten() for x in xs]) for xs in (ref, out)]
        return numerics.sqnr_db(*flat), numerics.sqnr_db(*dirs)

    def run():
        stats = vq.calibrate(model, calib, progress=False)
        kw = calib[0][1]
        plans = {
            "uniform W8A8 (`w8a8-viditq`)": vq.quantize(model, (), kw, recipe="w8a8-viditq", calibration=stats).plan,
            "uniform W4A8 (`w4a8`)": vq.quantize(model, (), kw, recipe="w4a8", calibration=stats).plan,
            "`w4a8-mp` (search, 4.5 weight bits)": vq.search(model, calib, vq.Recipe.preset("w4a8-mp").budget),
            "`w4a8-mp`, every role scored by output error": vq.search(
                model, calib, vq.Recipe.preset("w4a8-mp").budget, metrics="output"),
            "`w4a8-mp`, 4 timestep ranges": vq.search(model, calib, vq.Recipe.preset("w4a8-mp").budget,
                                                      timestep_ranges=4),
            "`w4a4-mp` (search, 16/3 weight and activation bits)":
                vq.search(model, calib, vq.Recipe.preset("w4a4-mp").budget),
        }
        for name, plan in plans.items():
            wb, ab, nbytes = _quantized_stats(plan)
            out_db, cfg_db = sqnr(plan)
            rows[name] = dict(sqnr_db=round(out_db, 2), cfg_sqnr_db=round(cfg_db, 2), weight_bits=round(wb, 3),
                              act_bits=round(ab, 3), weight_bytes=nbytes,
                              search_s=round(plan.search["seconds"], 1) if plan.search else None)

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info["rows"] = rows
    print("\n| plan | output SQNR dB | guidance-direction SQNR dB | avg weight bits | act bits (layer mean) "
          "| weight bytes | search s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['sqnr_db']:.1f} | {r['cfg_sqnr_db']:.1f} | {r['weight_bits']:.2f} | "
              f"{r['act_bits']:.2f} | {r['weight_bytes']} | {r['search_s'] if r['search_s'] is not None else '-'} |")
    names = list(rows)
    uniform, mp, mp_output = rows[names[1]], rows[names[2]], rows[names[3]]
    assert mp["cfg_sqnr_db"] > uniform["cfg_sqnr_db"]  # the default metrics protect the prompt
    assert mp_output["sqnr_db"] > uniform["sqnr_db"]  # the output metric buys output SQNR
