"""``QuantizedModel`` (a quantized program that runs like its module) and ``load`` (its artifact)."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import torch

from viditq_compile.config.plan import Plan
from viditq_compile.graph.shapes import ADD_BUCKET, InputShapeError, InputShapes
from viditq_compile.io import artifact
from viditq_compile.io.artifact import MAX_BUCKETS, ArtifactError
from viditq_compile.report.tables import Report, build_report

__all__ = ["InputShapeError", "QuantizedModel", "load"]


class QuantizedModel(torch.nn.Module):
    """A quantized program that runs like the module it came from.

    Attributes: ``program`` (the ``torch.export.ExportedProgram``, portable, holds
    ``torch.ops.viditq`` ops), ``plan`` (per-layer decisions), ``report`` (per-layer table),
    ``module`` (the runnable ``GraphModule``), ``input_shapes`` (``graph.shapes.InputShapes``:
    per input, the dimensions the program takes at any size and those the model pinned; print
    it). Call it with the same argument structure the model was captured with; a tensor at a
    size the program does not take is refused with ``InputShapeError`` (a ``ValueError``) naming
    the argument and the dimension, before the program runs. Inference only: its parameters do
    not require grad.

    Resolution buckets (``viditq_compile.buckets``): where the model pins input sizes, more
    programs built from the same plan, sharing the weights (``add_bucket``, or ``vq.quantize(...,
    buckets=...)``). ``programs`` / ``bucket_shapes`` list them all, the first being ``program`` /
    ``input_shapes``; a call runs on the first bucket that takes its shapes.
    """

    def __init__(self, program: torch.export.ExportedProgram, plan: Plan,
                 buckets: Sequence[torch.export.ExportedProgram] = ()):
        super().__init__()
        if len(buckets) + 1 > MAX_BUCKETS:
            raise ValueError(f"{len(buckets) + 1} resolution buckets; at most {MAX_BUCKETS} are taken")
        self.plan = plan
        self.programs: tuple[torch.export.ExportedProgram, ...] = ()
        self.bucket_modules = torch.nn.ModuleList()
        self.bucket_shapes: tuple[InputShapes, ...] = ()
        for ep in (program, *buckets):
            self._add_program(ep)
        from viditq_compile.graph.sites import ExportedTensors
        from viditq_compile.passes.quantize_attention import program_attentions

        self.report: Report = build_report(plan, title=f"viditq_compile report (recipe "
                                                       f"{plan.recipe!r})",
                                           convolutions=ExportedTensors(program).kept_convolutions(),
                                           attentions=program_attentions(program.graph_module))

    def _add_program(self, ep: torch.export.ExportedProgram) -> None:
        module = ep.module()
        module.requires_grad_(False)
        self.programs += (ep,)
        self.bucket_modules.append(module)
        self.bucket_shapes += (InputShapes.of(ep),)

    @property
    def program(self) -> torch.export.ExportedProgram:
        return self.programs[0]

    @property
    def module(self) -> torch.nn.Module:
        return self.bucket_modules[0]

    @property
    def input_shapes(self) -> InputShapes:
        return self.bucket_shapes[0]

    def forward(self, *args, **kwargs):
        return dispatch(self.bucket_shapes, list(self.bucket_modules), args, kwargs)

    def takes(self, args: tuple = (), kwargs: dict | None = None) -> bool:
        """Whether a bucket's shapes take this call (checked, not run: a tie between inputs that
        only the program's own guards know is found when it runs)."""
        for shapes in self.bucket_shapes:
            try:
                shapes.check(args, dict(kwargs or {}))
                return True
            except InputShapeError:
                continue
        return False

    def add_bucket(self, model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None) -> int:
        """Capture ``model(*args, **kwargs)`` (an example call at another resolution), quantize it
        by this model's plan, share its tensors with the programs held, and add it; returns its
        index. ``ValueError`` when a bucket already takes the call or ``MAX_BUCKETS`` is reached;
        ``PlanError`` when the plan does not fit the model's graph at that size."""
        from viditq_compile.buckets import capture_bucket

        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(args, tuple):
            raise TypeError(f"args must be a tuple of positional inputs, got {type(args).__name__}")
        if len(self.programs) >= MAX_BUCKETS:
            raise ValueError(f"this model has {len(self.programs)} resolution buckets, the most taken")
        if self.takes(args, kwargs):
            raise ValueError("a resolution bucket of this model already takes this call's shapes: "
                             "adding one would add nothing")
        self._add_program(capture_bucket(model, args, kwargs, self.plan, self.programs))
        return len(self.programs) - 1

    @property
    def weight_bytes(self) -> int:
        """Bytes of every tensor the programs hold (weights, scales, biases, tables), counting a
        tensor the resolution buckets share once."""
        from viditq_compile.buckets import unique_tensor_bytes

        return unique_tensor_bytes(self.programs)

    def save(self, path: str | os.PathLike) -> None:
        """Write the directory artifact (see ``viditq_compile.io.artifact``)."""
        artifact.save(self, path)

    def compile(self, **kwargs) -> Any:
        """``torch.compile`` with the ``viditq`` backend (the graph is already quantized); with
        several resolution buckets, each bucket's module compiled, behind the same dispatch."""
        compiled = [torch.compile(m, backend="viditq", **kwargs) for m in self.bucket_modules]
        if len(compiled) == 1:
            return compiled[0]
        shapes = self.bucket_shapes
        return functools.wraps(self.forward)(lambda *a, **kw: dispatch(shapes, compiled, a, kw))


def dispatch(bucket_shapes: Sequence[InputShapes], runners: Sequence[Any], args: tuple, kwargs: dict):
    """Run the call on the first bucket whose shapes take it (``InputShapes.check``; a guard
    the program raises counts as a refusal); ``InputShapeError`` naming every bucket's refusal
    and how to add a bucket when none does. One bucket: its own error, unchanged."""
    refusals: list[str] = []
    for i, shapes in enumerate(bucket_shapes):
        try:
            shapes.check(args, kwargs)
            try:
                return runners[i](*args, **kwargs)
            except (AssertionError, RuntimeError) as e:  # the program's own guards: our message
                err = shapes.guard_error(e, args, kwargs)
                if err is None:
                    raise
                raise err from None
        except InputShapeError as e:
            if len(bucket_shapes) == 1:
                raise
            refusals.append(f"bucket {i}: {str(e).splitlines()[0].split(' To run ')[0]}")
    raise InputShapeError(
        f"none of the {len(bucket_shapes)} resolution buckets takes this call:\n  "
        + "\n  ".join(refusals) + "\n" + "\n".join(f"bucket {i}: {s}" for i, s in
                                                    enumerate(bucket_shapes))
        + f"\n{ADD_BUCKET}")


def load(path: str | os.PathLike) -> QuantizedModel:
    """Read a directory written by ``QuantizedModel.save``; every check is in
    ``viditq_compile.io.artifact`` (``ArtifactError`` names the file and the cause)."""
    programs, plan = artifact.read_artifact(path)
    try:
        return QuantizedModel(programs[0], plan, programs[1:])
    except Exception as e:  # noqa: BLE001 (building the runnable module of a validated program)
        raise ArtifactError(f"{os.fspath(path)}: {artifact.PROGRAM}: the program cannot be turned into a "
                            f"module: {type(e).__name__}: {str(e)[:300]}") from None
