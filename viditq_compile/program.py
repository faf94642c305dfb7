"""``QuantizedModel`` (a quantized program that runs like its module) and ``load`` (its artifact)."""

from __future__ import annotations

import os
from typing import Any

import torch

from viditq_compile.config.plan import Plan
from viditq_compile.graph.shapes import InputShapeError, InputShapes
from viditq_compile.io import artifact
from viditq_compile.io.artifact import ArtifactError
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
    """

    def __init__(self, program: torch.export.ExportedProgram, plan: Plan):
        super().__init__()
        self.program = program
        self.plan = plan
        self.module = program.module()
        self.module.requires_grad_(False)
        self.input_shapes = InputShapes.of(program)
        self.report: Report = build_report(plan, title=f"viditq_compile report (recipe "
                                                       f"{plan.recipe!r})")

    def forward(self, *args, **kwargs):
        self.input_shapes.check(args, kwargs)
        try:
            return self.module(*args, **kwargs)
        except (AssertionError, RuntimeError) as e:  # the program's own guards: our message
            err = self.input_shapes.guard_error(e, args, kwargs)
            if err is None:
                raise
            raise err from None

    @property
    def weight_bytes(self) -> int:
        """Bytes of every tensor the program holds (weights, scales, biases, tables)."""
        tensors = list(self.program.state_dict.values()) + [
            t for t in self.program.constants.values() if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def save(self, path: str | os.PathLike) -> None:
        """Write the directory artifact (see ``viditq_compile.io.artifact``)."""
        artifact.save(self, path)

    def compile(self, **kwargs) -> Any:
        """``torch.compile`` with the ``viditq`` backend (the graph is already quantized)."""
        return torch.compile(self.module, backend="viditq", **kwargs)


def load(path: str | os.PathLike) -> QuantizedModel:
    """Read a directory written by ``QuantizedModel.save``; every check is in
    ``viditq_compile.io.artifact`` (``ArtifactError`` names the file and the cause)."""
    ep, plan = artifact.read_artifact(path)
    try:
        return QuantizedModel(ep, plan)
    except Exception as e:  # noqa: BLE001 (building the runnable module of a validated program)
        raise ArtifactError(f"{os.fspath(path)}: {artifact.PROGRAM}: the program cannot be turned into a "
                            f"module: {type(e).__name__}: {str(e)[:300]}") from None
