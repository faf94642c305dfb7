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

PLAN_FORMAT = 2
READABLE_FORMATS = (1, 2)  # format 1 (W8A8 only) has none of the balancing / group fields

BALANCE_METHODS = ("smooth", "rotate", "smooth+rotate")


class PlanError(ValueError):
    """A plan that is malformed or does not fit the model it is applied to."""


@dataclass(frozen=True)
class LayerPlan:
    """What one linear layer becomes.

    ``weight_bits is None`` means the layer stays in floating point, and ``reason`` says why.
    ``weight_group``: quantization group along K (``None``: per output channel).
    ``act_static``: one static activation scale per tensor from calibration (the naive baseline)
    instead of dynamic per-token scales. ``balance``: ``None`` or one of ``BALANCE_METHODS``;
    ``alpha`` is the smoothing exponent on the weight side, ``rotation_seed`` the seed of the
    random signs of the Hadamard rotation. ``note`` records what was changed from the recipe's
    request and why (e.g. smoothing dropped for lack of calibration data).
    """

    name: str
    in_features: int
    out_features: int
    weight_bits: Optional[int] = None
    act_bits: Optional[int] = None
    weight_sym: bool = True
    act_sym: bool = True
    reason: Optional[str] = None
    weight_group: Optional[int] = None
    act_static: bool = False
    balance: Optional[str] = None
    alpha: Optional[float] = None
    rotation_seed: Optional[int] = None
    note: Optional[str] = None

    @property
    def quantized(self) -> bool:
        return self.weight_bits is not None

    @property
    def single_op(self) -> bool:
        """Plain W8A8 (int8 per-channel weights, dynamic per-token activations, no balancing):
        one ``viditq.w8a8_linear``; every other quantized layer is ``quantize_act`` + ``qlinear``."""
        return (self.weight_bits == 8 and self.weight_group is None and self.balance is None
                and not self.act_static)

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
            g = self.weight_group
            if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g <= 0
                                  or self.in_features % g):
                raise PlanError(f"layer {self.name!r}: weight_group={g!r} must be a positive "
                                f"int dividing in_features={self.in_features}")
            if self.weight_bits == 4 and (g or self.in_features) % 2:
                raise PlanError(f"layer {self.name!r}: 4-bit weights are packed two per byte "
                                f"and need an even K (group), got {g or self.in_features}")
            if self.balance is not None:
                if self.balance not in BALANCE_METHODS:
                    raise PlanError(f"layer {self.name!r}: balance={self.balance!r} is not one "
                                    f"of {BALANCE_METHODS}")
                if "smooth" in self.balance and not (isinstance(self.alpha, (int, float))
                                                     and 0 <= self.alpha <= 1):
                    raise PlanError(f"layer {self.name!r}: smoothing needs alpha in [0, 1], got "
                                    f"{self.alpha!r}")
                if "rotate" in self.balance and not isinstance(self.rotation_seed, int):
                    raise PlanError(f"layer {self.name!r}: rotation needs an int rotation_seed, "
                                    f"got {self.rotation_seed!r}")
                if self.act_static:
                    raise PlanError(f"layer {self.name!r}: static per-tensor activation scales "
                                    f"cannot be combined with balancing")
        elif not self.reason:
            raise PlanError(f"layer {self.name!r} stays floating point but the plan gives no "
                            f"reason")


@dataclass
class Plan:
    """Per-layer decisions, keyed by module path (e.g. ``transformer_blocks.3.attn1.to_q``)."""

    recipe: str
    layers: dict[str, LayerPlan] = field(default_factory=dict)

    @property
    def needs_calibration(self) -> list[str]:
        """Layers that cannot be built without calibration statistics."""
        return [p.name for p in self.layers.values()
                if p.quantized and (p.act_static or (p.balance or "").startswith("smooth"))]

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
        if data.get("format") not in READABLE_FORMATS:
            raise PlanError(f"plan format {data.get('format')!r} is not supported "
                            f"(this version reads formats {READABLE_FORMATS})")
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
