"""Plans: the per-layer decisions a quantized program is built from.

A plan is data. The select pass makes one from a recipe and the captured graph; the quantize pass
applies it. Plans are saved as JSON next to a quantized program and can be inspected, edited and
re-applied.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Optional, Union

from . import numerics

PLAN_FORMAT = 1


class PlanError(ValueError):
    """A plan that is malformed or does not fit the model it is applied to."""


@dataclass(frozen=True)
class LayerPlan:
    """What one linear layer becomes.

    ``weight_bits is None`` means the layer stays in floating point, and ``reason`` says why.
    """

    name: str
    in_features: int
    out_features: int
    weight_bits: Optional[int] = None
    act_bits: Optional[int] = None
    weight_sym: bool = True
    act_sym: bool = True
    reason: Optional[str] = None

    @property
    def quantized(self) -> bool:
        return self.weight_bits is not None

    def validate(self) -> None:
        if self.quantized:
            if self.weight_bits not in numerics.SUPPORTED_WEIGHT_BITS:
                raise PlanError(f"layer {self.name!r}: weight_bits={self.weight_bits} has no op "
                                f"(supported: {numerics.SUPPORTED_WEIGHT_BITS})")
            if self.act_bits not in numerics.SUPPORTED_ACT_BITS:
                raise PlanError(f"layer {self.name!r}: act_bits={self.act_bits} has no op "
                                f"(supported: {numerics.SUPPORTED_ACT_BITS})")
            if not self.act_sym:
                raise PlanError(f"layer {self.name!r}: asymmetric activations have no op")
        elif not self.reason:
            raise PlanError(f"layer {self.name!r} stays floating point but the plan gives no "
                            f"reason")


@dataclass
class Plan:
    """Per-layer decisions, keyed by module path (e.g. ``transformer_blocks.3.attn1.to_q``)."""

    recipe: str
    layers: dict[str, LayerPlan] = field(default_factory=dict)

    @property
    def quantized(self) -> list[LayerPlan]:
        return [p for p in self.layers.values() if p.quantized]

    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, "recipe": self.recipe,
                "layers": [asdict(p) for p in self.layers.values()]}

    @staticmethod
    def from_dict(data: dict) -> "Plan":
        if not isinstance(data, dict):
            raise PlanError(f"plan must be a JSON object, got {type(data).__name__}")
        if data.get("format") != PLAN_FORMAT:
            raise PlanError(f"plan format {data.get('format')!r} is not supported "
                            f"(this version reads format {PLAN_FORMAT})")
        fields = set(LayerPlan.__dataclass_fields__)
        layers = {}
        for i, row in enumerate(data.get("layers", [])):
            if not isinstance(row, dict) or set(row) - fields or "name" not in row:
                raise PlanError(f"plan layer #{i} is malformed: {row!r}")
            p = LayerPlan(**row)
            p.validate()
            layers[p.name] = p
        return Plan(recipe=str(data.get("recipe", "?")), layers=layers)

    def save(self, path: Union[str, os.PathLike]) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1)

    @staticmethod
    def load(path: Union[str, os.PathLike]) -> "Plan":
        try:
            with open(path, encoding="utf-8") as f:
                return Plan.from_dict(json.load(f))
        except json.JSONDecodeError as e:
            raise PlanError(f"plan {os.fspath(path)} is not valid JSON: {e}") from None
