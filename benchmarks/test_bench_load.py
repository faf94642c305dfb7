"""``vq.load`` time of a PixArt-Σ-sized W8A8 artifact: the hostile-input loader against the 0.1
loader it replaced (issue 13 asks for at most 1.5x).

Run: ``pytest -q -s benchmarks/test_bench_load.py --benchmark-only`` (about 3 minutes on 2 cores,
most of it building and quantizing the model once).

- ``viditq-load``: ``vq.load`` as shipped: each file read once into memory and checksummed,
  strict zip reader, program JSON validated and regenerated, rebuilt by torch's deserializer
  from those parts and the safetensors tensors, plan <-> program <-> weights checked.
- ``v0.1-load``: what ``vq.load`` did before: checksums by path, ``safe_pt2.check_pt2`` (the
  pickle scan), ``torch.export.load`` of the file, safetensors tensors swapped in. Kept here as
  the baseline only; it runs strings from the file.

The model is the diffusers ``PixArtTransformer2DModel`` at PixArt-Σ's widths (28 blocks,
hidden 1152, MLP 4608, caption 4096; 0.6 B parameters; ``VIDITQ_BENCH_LOAD_LAYERS`` sets the
depth), quantized with the default W8A8 recipe; the artifact is about 0.6 GB of int8 weights,
twice (safetensors and the program's own copy).
"""

from __future__ import annotations

import hashlib
import logging
import os

import pytest
import torch

import viditq_compile as vq
from viditq_demo.demo_model import heavy_tailed_


def _pixart_sigma(layers: int):
    from diffusers import PixArtTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = PixArtTransformer2DModel(
            num_layers=layers, num_attention_heads=16, attention_head_dim=72, in_channels=4,
            out_channels=8, sample_size=8, patch_size=2, caption_channels=4096,
            cross_attention_dim=1152, norm_type="ada_norm_single", use_additional_conditions=False,
            norm_elementwise_affine=False, norm_eps=1e-6)
    heavy_tailed_(model, torch.Generator().manual_seed(0))
    return model.eval()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    logging.getLogger("viditq_compile").setLevel(logging.ERROR)
    layers = int(os.environ.get("VIDITQ_BENCH_LOAD_LAYERS", "28"))
    model = _pixart_sigma(layers)
    g = torch.Generator().manual_seed(1)
    kwargs = {"hidden_states": torch.randn(2, 4, 8, 8, generator=g),
              "encoder_hidden_states": torch.randn(2, 8, 4096, generator=g),
              "timestep": torch.tensor([999, 500]), "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
              "return_dict": False}
    qm = vq.quantize(model, (), kwargs)
    del model
    path = tmp_path_factory.mktemp("load") / "pixart-sigma-w8a8"
    qm.save(path)
    size = sum(f.stat().st_size for f in path.iterdir())
    return path, layers, size


def _v01_load(path):
    """The 0.1 loader, condensed: checksums by path, pickle scan, torch.export.load, tensors swapped in."""
    from safetensors.torch import load_file

    from viditq_compile.config.plan import Plan
    from viditq_compile.io.safe_pt2 import check_pt2
    from viditq_compile.program import QuantizedModel

    for name in ("program.pt2", "weights.safetensors", "plan.json"):
        h = hashlib.sha256()
        with open(os.path.join(path, name), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        h.hexdigest()
    plan = Plan.load(os.path.join(path, "plan.json"))
    tensors = load_file(os.path.join(path, "weights.safetensors"))
    program = os.path.join(path, "program.pt2")
    check_pt2(program)
    ep = torch.export.load(program)
    for key, t in tensors.items():
        kind, name = key.split("/", 1)
        if kind == "state_dict":
            ep.state_dict[name] = torch.nn.Parameter(t, requires_grad=False) \
                if isinstance(ep.state_dict[name], torch.nn.Parameter) else t
        else:
            ep.constants[name] = t
    return QuantizedModel(ep, plan)


@pytest.mark.parametrize("loader", ["viditq-load", "v0.1-load"])
def test_load_time(benchmark, artifact, loader):
    path, layers, size = artifact
    fn = vq.load if loader == "viditq-load" else _v01_load
    fn(path)  # warm: imports, first-use initialisation
    benchmark.extra_info.update(layers=layers, artifact_mb=round(size / 2**20, 1), torch=torch.__version__)
    benchmark.pedantic(fn, args=(path,), rounds=3, iterations=1)
