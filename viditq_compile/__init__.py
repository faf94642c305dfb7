"""viditq_compile: ViDiT-Q quantization of diffusion transformers as PyTorch 2 compiler passes.

Importing the package defines the ``torch.ops.viditq`` ops (needed before
``torch.export.load`` of a quantized program); it registers nothing with Inductor.
"""

# isort: off
from .lowering import ops as _ops  # noqa: F401  (defines torch.ops.viditq.*, which the passes below look up)
from .lowering import cuda as _cuda  # noqa: F401  (their CUDA kernels; Triton is imported on first use)
# isort: on
from .allocate import Budget, BudgetError
from .api import QuantizedModel, quantize
from .artifact import ArtifactError, load
from .calibration import CalibrationError, CalibrationStats, calibrate
from .capture import CaptureError
from .diffusers_adapter import as_diffusers_transformer
from .plan import LayerPlan, Plan, PlanError
from .recipe import Recipe, RecipeError
from .report import Report
from .search import search

__version__ = "0.1.0"

__all__ = ["quantize", "search", "Budget", "BudgetError", "load", "calibrate", "CalibrationStats", "CalibrationError",
           "QuantizedModel", "Recipe", "RecipeError", "Plan", "LayerPlan", "PlanError", "Report",
           "ArtifactError", "CaptureError", "as_diffusers_transformer", "__version__"]
