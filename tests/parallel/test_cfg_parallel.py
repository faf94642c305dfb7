"""CFG parallelism (``viditq_compile.parallel.cfg``) on 2 CPU ranks (gloo): each rank runs one half of
the guided batch and every rank returns the whole output, for a float module, a ``QuantizedModel``
and the transformer of a pipeline (``return_dict=False``: PixArt-Σ; ``return_dict=True``: DiT)."""

from __future__ import annotations

import pytest
import torch

import viditq_compile as vq
from tests import tiny_pipelines, zoo
from tests.parallel import ranks
from viditq_compile.parallel.cfg import cfg_parallel, remove_cfg_parallel


def _call(model, kwargs):
    with torch.no_grad():
        return model(**kwargs)[0]


def _modules_worker(rank, world, out_dir):
    model, kwargs = zoo.build_pixart()  # batch 2: the two CFG halves
    qm = vq.quantize(model, (), kwargs)
    refs = {"float": _call(model, kwargs), "quantized": _call(qm, kwargs)}
    with torch.no_grad():
        dict_ref = model(**{**kwargs, "return_dict": True}).sample
    seen = []
    cfg_parallel(model)  # its pre hook runs first: this one sees the rank's part
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["hidden_states"].shape[0]), with_kwargs=True)
    cfg_parallel(qm)
    outs = {"float": _call(model, kwargs), "quantized": _call(qm, kwargs)}
    with torch.no_grad():
        dict_out = model(**{**kwargs, "return_dict": True}).sample
    errors = []
    odd = {**kwargs, **{k: kwargs[k][:1] for k in ("hidden_states", "encoder_hidden_states",
                                                      "encoder_attention_mask", "timestep")}}
    try:
        _call(model, odd)
    except ValueError as e:
        errors.append(str(e))
    try:
        cfg_parallel(model)
    except ValueError as e:
        errors.append(str(e))
    remove_cfg_parallel(model)
    undone = _call(model, kwargs)
    ranks.save(out_dir, rank, **{f"ref_{k}": v for k, v in refs.items()}, **{f"out_{k}": v for k, v in outs.items()},
               dict_ref=dict_ref, dict_out=dict_out, local_batch=seen[0], errors="\n".join(errors),
               undone=undone)


def _pipelines_worker(rank, world, out_dir):
    pipe, kwargs = tiny_pipelines.build_pixart_sigma()
    dit, dit_kwargs = tiny_pipelines.build_dit()

    def run_pixart():
        return pipe(**kwargs, num_inference_steps=2, output_type="latent",
                    generator=torch.Generator().manual_seed(3)).images

    def run_dit():
        return dit(class_labels=[1, 2], num_inference_steps=2, output_type="pt",
                   generator=torch.Generator().manual_seed(3), **dit_kwargs).images

    refs = run_pixart(), run_dit()
    cfg_parallel(pipe.transformer)
    cfg_parallel(dit.transformer)
    outs = run_pixart(), run_dit()
    ranks.save(out_dir, rank, pixart_ref=refs[0], pixart=outs[0], dit_ref=refs[1], dit=outs[1])


def test_cfg_parallel_modules_match_one_process():
    results = ranks.run(_modules_worker, timeout=120)
    for r in results:
        assert r["local_batch"] == 1  # each rank ran one of the two halves
        for kind in ("float", "quantized"):
            assert r[f"out_{kind}"].shape == r[f"ref_{kind}"].shape
            assert (r[f"out_{kind}"] - r[f"ref_{kind}"]).abs().max().item() <= 1e-6
        assert (r["dict_out"] - r["dict_ref"]).abs().max().item() <= 1e-6  # return_dict=True
        assert "batch 1 does not split over 2 ranks" in r["errors"]
        assert "already applied" in r["errors"]
        assert torch.equal(r["undone"], r["ref_float"])
    assert torch.equal(results[0]["out_quantized"], results[1]["out_quantized"])


def test_cfg_parallel_pipelines_match_one_process():
    for r in ranks.run(_pipelines_worker, timeout=120):
        assert (r["pixart"] - r["pixart_ref"]).abs().max().item() <= 1e-6  # return_dict=False
        assert (r["dit"] - r["dit_ref"]).abs().max().item() <= 1e-6  # .sample of a BaseOutput


def test_cfg_parallel_needs_a_process_group():
    model, _ = zoo.build_pixart()
    with pytest.raises(RuntimeError, match="not initialized"):
        cfg_parallel(model)
    with pytest.raises(TypeError, match="nn.Module"):
        cfg_parallel(lambda x: x)  # type: ignore[arg-type]
