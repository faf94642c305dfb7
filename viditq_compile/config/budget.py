"""``Budget``: the upper bounds a mixed-precision allocation must meet, and ``BudgetError``."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

BUDGET_FIELDS = ("weight_bits", "act_bits", "weight_bytes")
MINIMUM_TEXT = {
    "weight_bits": "the narrowest candidates give {} average weight bits",
    "act_bits": "the narrowest candidates give {} average activation bits",
    "weight_bytes": "the smallest weight versions take {} bytes",
}


@dataclass(frozen=True)
class Budget:
    """Upper bounds on an allocation; each one left ``None`` is not constrained.

    ``weight_bits``: average weight bits, weighted by each unit's ``weight_params``, averaged
    over the timestep ranges (each range counts equally: what one sampling step reads).
    ``act_bits``: average activation bits, weighted by ``act_elems``, averaged over the ranges.
    ``weight_bytes``: bytes of every weight version that must be stored: a unit using W8 in one
    range and W4 in another stores both.
    """

    weight_bits: float | None = None
    act_bits: float | None = None
    weight_bytes: int | None = None

    def __post_init__(self):
        if all(getattr(self, f) is None for f in BUDGET_FIELDS):
            raise ValueError("Budget: set at least one of weight_bits, act_bits, weight_bytes")
        for f in ("weight_bits", "act_bits"):
            v = getattr(self, f)
            if v is not None and not (is_real(v) and math.isfinite(v) and v > 0):
                raise ValueError(f"Budget.{f} must be a positive finite number, got {v!r}")
        v = self.weight_bytes
        if v is not None and not (is_int(v) and v > 0):
            raise ValueError(f"Budget.weight_bytes must be a positive integer, got {v!r}")


class BudgetError(ValueError):
    """The budget cannot be met. ``shortfall``: budget field -> how far the closest allocation
    is over it (for a single constraint, the narrowest allocation possible)."""

    def __init__(self, message: str, shortfall: Mapping[str, float]):
        super().__init__(message)
        self.shortfall = dict(shortfall)



def is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)
