"""viditq_compile: ViDiT-Q quantization of diffusion transformers as PyTorch 2 compiler passes.

Importing the package defines the ``torch.ops.viditq`` ops (needed before
``torch.export.load`` of a quantized program); it registers nothing with Inductor.
"""

# isort: off
from viditq_compile.ops import library as _ops  # noqa: F401  (defines torch.ops.viditq.*, which the passes below look up)
from viditq_compile.ops import cuda as _cuda  # noqa: F401  (their CUDA kernels; Triton is imported on first use)
# isort: on
from viditq_compile.api import compile, quantize
from viditq_compile.calibration.observe import calibrate
from viditq_compile.calibration.stats import CalibrationError, CalibrationStats
from viditq_compile.config.budget import Budget, BudgetError
from viditq_compile.config.plan import LayerPlan, Plan, PlanError
from viditq_compile.config.recipe import Recipe, RecipeError
from viditq_compile.graph.capture import CaptureError
from viditq_compile.io.artifact import ArtifactError
from viditq_compile.io.diffusers_adapter import as_diffusers_transformer
from viditq_compile.mixed_precision.search import search
from viditq_compile.program import InputShapeError, QuantizedModel, load
from viditq_compile.report.tables import Report

__version__ = "0.1.0"


def quantize_pipeline(pipe, **kwargs):
    """Quantize a diffusers pipeline's transformer in place from the pipeline's own sampling loop:
    ``viditq_compile.diffusers.quantize_pipeline`` (see there). Defined here, importing the
    diffusers module on the first call, because that import registers the ``"viditq"`` diffusers
    quantization backend, which ``import viditq_compile`` must not do. Returns the ``Report``."""
    from viditq_compile.diffusers import quantize_pipeline as run

    return run(pipe, **kwargs)


__all__ = ["quantize", "quantize_pipeline", "compile", "search", "Budget", "BudgetError", "load", "calibrate",
           "CalibrationStats", "CalibrationError",
           "QuantizedModel", "Recipe", "RecipeError", "Plan", "LayerPlan", "PlanError", "Report",
           "ArtifactError", "CaptureError", "InputShapeError", "as_diffusers_transformer", "__version__"]
