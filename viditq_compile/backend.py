"""The ``viditq`` backend for ``torch.compile``.

``torch.compile(model, backend="viditq")`` works after ``import torch`` alone: the entry point
(group ``torch_dynamo_backends``) names ``viditq_backend``, a plain function, which Dynamo looks up
lazily. Each graph Dynamo captures (one per graph break, one per recompile) goes through the same
select and quantize passes as ``viditq_compile.quantize``, then to Inductor with the ``viditq``
lowerings installed. A graph that already holds ``viditq`` ops (a loaded or exported quantized
program) is compiled as it is.

Options (``torch.compile(..., options={...})``): ``recipe`` (preset name, YAML path, mapping or
``Recipe``; default ``"w8a8"``), ``plan`` (a ``Plan`` to apply instead of the recipe's selection),
``calibration`` (``CalibrationStats`` or the path of saved statistics; the backend cannot run a
sampler itself, so calibrate first with ``viditq_compile.calibrate``).
The compiled function is inference only: it runs under ``torch.no_grad()``.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .lowering import inductor as inductor_lowering
from .lowering.fuse_epilogues import fuse_epilogues
from .passes.balance import balance_linears
from .passes.quantize import quantize_linears
from .passes.select import match_plan, select_linears
from .passes.sites import DynamoTensors
from .plan import Plan
from .recipe import Recipe
from .report import Report, build_report

log = logging.getLogger(__name__)

OPTIONS = ("recipe", "plan", "calibration")
REPORTS: deque[Report] = deque(maxlen=64)
"""Reports of the graphs this process compiled with the backend, newest last."""

_warned_cache_key: list[bool] = []
_QUANTIZED_WEIGHTS = WeakIdKeyDictionary()  # float weight -> its quantized forms


def _has_viditq_ops(gm: torch.fx.GraphModule) -> bool:
    return any(n.op == "call_function" and getattr(n.target, "namespace", None) == "viditq"
               for n in gm.graph.nodes)


def _parse_options(kwargs: dict) -> tuple[Recipe, Any, Any, dict]:
    options = dict(kwargs.pop("options", None) or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"viditq backend: unknown option(s) {unknown}; known: {list(OPTIONS)}")
    recipe = Recipe.resolve(options.get("recipe", "w8a8"))
    recipe.check_supported()
    plan = options.get("plan")
    if recipe.budget is not None and plan is None:
        raise ValueError(f"viditq backend: recipe {recipe.name!r} searches mixed precision, which "
                         f"replays calibration calls on the eager model; run "
                         f"plan = viditq_compile.search(model, calls, budget) (or "
                         f"viditq_compile.quantize(..., recipe={recipe.name!r}, calibration=calls)) "
                         f"and pass options={{'plan': plan}}")
    if plan is not None and not isinstance(plan, Plan):
        raise TypeError(f"viditq backend: option 'plan' must be a Plan, got {type(plan).__name__}")
    stats = options.get("calibration")
    if stats is not None:
        from .calibration import CalibrationStats

        if isinstance(stats, (str, os.PathLike)):
            stats = CalibrationStats.load(stats)
        elif not isinstance(stats, CalibrationStats):
            raise TypeError(f"viditq backend: option 'calibration' must be CalibrationStats or the "
                            f"path of saved statistics, got {type(stats).__name__} (run "
                            f"viditq_compile.calibrate(model, ...) first)")
        stats.validate()
    config = {}
    mode = kwargs.pop("mode", None)
    if mode is not None:
        from torch._inductor import list_mode_options

        config.update(list_mode_options(mode))
    if kwargs:
        raise ValueError(f"viditq backend: unexpected arguments {sorted(kwargs)}")
    return recipe, plan, stats, config


def _lowering_sources() -> tuple[str, ...]:
    from . import numerics
    from .kernels import hadamard, packing
    from .lowering import fuse_epilogues as fuse, inductor

    return tuple(m.__file__ for m in (numerics, hadamard, packing, inductor, fuse))


def _cache_key_pass():
    """A no-op post-grad pass whose ``uuid`` hashes the sources of the viditq decompositions.

    Inductor's FX graph cache keys on the graph before our ops are decomposed, so without this
    an upgraded viditq_compile would reuse kernels compiled from its old numerics.
    """
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class ViditqLoweringKey(CustomGraphPass):
        def __call__(self, graph):
            return None

        def uuid(self):
            return get_hash_for_files(_lowering_sources())

    return ViditqLoweringKey()


def viditq_backend(gm: torch.fx.GraphModule, example_inputs, **kwargs):
    """Quantize one Dynamo graph and compile it with Inductor."""
    from torch._inductor.compile_fx import compile_fx

    from .lowering import ops  # noqa: F401  (defines torch.ops.viditq.*)

    recipe, given_plan, stats, config = _parse_options(kwargs)
    inductor_lowering.install()
    if _has_viditq_ops(gm):
        log.info("viditq backend: graph is already quantized; compiling it as is")
    else:
        if stats is None and given_plan is not None:
            stats = given_plan.calibration
        tensors = DynamoTensors(gm, example_inputs)
        sites = tensors.linear_sites()
        plan = match_plan(sites, given_plan, stats) if given_plan is not None \
            else select_linears(sites, recipe, stats)
        balance_linears(tensors, sites, plan, stats)
        n = quantize_linears(tensors, sites, plan, cache=_QUANTIZED_WEIGHTS, stats=stats)
        report = build_report(plan, title=f"viditq backend graph {len(REPORTS)} (recipe "
                                          f"{plan.recipe!r}): {n} linear calls rewritten")
        REPORTS.append(report)
        log.info("%s", report.summary())
    fused = fuse_epilogues(gm, inductor_lowering.GEMM_KERNEL_DEVICES)
    if fused:
        log.info("viditq backend: GEMM epilogues fused: %s", dict(fused))
    import torch._inductor.config as inductor_config

    if inductor_config.post_grad_custom_post_pass is None:  # never displace a user's own pass
        config["post_grad_custom_post_pass"] = _cache_key_pass()
    elif not _warned_cache_key:
        _warned_cache_key.append(True)
        log.warning("viditq backend: torch._inductor.config.post_grad_custom_post_pass is set, so "
                    "the viditq lowering cannot add its sources to Inductor's cache key; after "
                    "upgrading viditq_compile, clear the Inductor cache (TORCHINDUCTOR_CACHE_DIR)")
    with torch.no_grad():
        compiled = compile_fx(gm, example_inputs, config_patches=config or None)

    def run(*args):
        with torch.no_grad():
            return compiled(*args)

    return run


def last_report() -> Report:
    """The report of the most recent graph the backend compiled."""
    if not REPORTS:
        raise RuntimeError("the viditq backend has not compiled a graph in this process yet")
    return REPORTS[-1]
