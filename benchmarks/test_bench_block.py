"""One PixArt-Σ transformer block, every variant in group ``pixart-block``; an OpenSORA STDiT3
spatial + temporal block pair at video length (``VIDITQ_BENCH_VIDEO``, default 8 frames x 256
tokens) in group ``stdit3-block``, for the variants of ``conftest.VIDEO_VARIANTS``.

Run: ``pytest -q benchmarks --benchmark-only --benchmark-json=benchmarks/results.json`` then
``python benchmarks/report.py benchmarks/results.json``. Variants, setup and environment switches:
see ``benchmarks/conftest.py``. Select a subset with ``-k``, e.g. ``-k "viditq or eager"``.
"""

from __future__ import annotations

import math
import os

import pytest


@pytest.mark.benchmark(group="pixart-block")
def test_pixart_block(benchmark, variant):
    _time_variant(benchmark, variant)


@pytest.mark.benchmark(group="stdit3-block")
def test_stdit3_block(benchmark, video_variant):
    """The video block: spatial attention over each frame's tokens, temporal attention over the
    frames at each token, cross-attention to the caption, MLP, adaLN-single modulation."""
    _time_variant(benchmark, video_variant)


def _time_variant(benchmark, variant):
    info = variant.extra_info
    benchmark.extra_info.update(info)
    if hasattr(os, "getloadavg"):
        benchmark.extra_info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    benchmark.pedantic(variant.run, rounds=info["rounds"], warmup_rounds=info["warmup_rounds"],
                       iterations=1)
    sqnr = variant.extra_info.get("sqnr_db")
    # a broken variant should not publish a timing as if it were fine
    assert sqnr is None or (math.isfinite(sqnr) and sqnr > 15.0), \
        f"{variant.name}: output SQNR vs fp32 eager is {sqnr} dB"


@pytest.mark.benchmark(group="quantize-act")
@pytest.mark.parametrize("route", ["16bit", "fp32"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_quantize_act_rotated_16bit(benchmark, dtype, route):
    """The 16-bit rotating ``numerics.quantize_act`` route (smoothing + Kronecker rotation on the ±1
    factors with the per-row power-of-two prescale, dynamic per-token int8) at PixArt-Σ width,
    K=1152, M=4096 tokens: the CPU op and the body of the CPU decomposition. ``route="fp32"`` times
    the route fp32 activations take (``balance_activation`` in fp32, then ``quantize_per_token``)
    on the same 16-bit input, for comparison."""
    import torch

    from viditq_compile.numerics import quant as numerics
    from viditq_compile.numerics.hadamard import kron_factors

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4096, 1152, generator=g) * 3).to(getattr(torch, dtype))
    smooth = torch.rand(1152, generator=g) + 0.5
    rotation = kron_factors(1152)

    def fp32_route(x, smooth, rotation, static_scale, bits):
        return numerics.quantize_per_token(numerics.balance_activation(x, smooth, rotation), bits)

    fn = numerics.quantize_act if route == "16bit" else fp32_route
    benchmark.extra_info.update(k=1152, m=4096, dtype=dtype, route=route, threads=torch.get_num_threads())
    if hasattr(os, "getloadavg"):
        benchmark.extra_info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    q, scale = benchmark.pedantic(fn, args=(x, smooth, rotation, None, 8),
                                  rounds=int(os.environ.get("VIDITQ_BENCH_ROUNDS", "20")), warmup_rounds=3,
                                  iterations=1)
    assert q.shape == x.shape and bool(torch.isfinite(scale).all())
