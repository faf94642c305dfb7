"""Plans: the per-layer decisions a quantized program is built from.

A plan is data. The select pass makes one from a recipe and the captured graph; the quantize pass
applies it. Plans are saved as JSON next to a quantized program and can be inspected, edited and
re-applied.
"""

from __future__ import annotations

import json
import os
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional, Union

from . import numerics

PLAN_FORMAT = 3
# format 1 (W8A8 only) has none of the balancing / group fields; format 2 has no timestep ranges
# and no search record
READABLE_FORMATS = (1, 2, 3)

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

    ``timestep_widths``: for a layer whose widths change with the timestep, one
    ``(weight_bits, act_bits, weight_sym)`` per range of ``Plan.timestep_bounds`` (lowest
    timesteps first); the layer's own ``weight_bits`` / ``act_bits`` / ``weight_sym`` are those
    of range 0. ``None``: the same widths at every timestep.
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
    timestep_widths: Optional[tuple[tuple[int, int, bool], ...]] = None

    @property
    def quantized(self) -> bool:
        return self.weight_bits is not None

    @property
    def single_op(self) -> bool:
        """Plain W8A8 (int8 per-channel weights, dynamic per-token activations, no balancing):
        one ``viditq.w8a8_linear``; every other quantized layer is ``quantize_act`` + ``qlinear``
        (or ``qlinear_timestep`` when its widths change with the timestep)."""
        return (self.weight_bits == 8 and self.weight_group is None and self.balance is None
                and not self.act_static and self.timestep_widths is None)

    def weight_bytes(self, bits: int, sym: bool) -> int:
        """Bytes of this layer's quantized weight at ``bits`` / ``sym``: the integer values (int4
        packed two per byte), fp32 scales and, when asymmetric, int32 zero points (one per output
        channel, or per group along K)."""
        n, k = self.out_features, self.in_features
        scales = n * (k // self.weight_group if self.weight_group else 1)
        return n * k * bits // 8 + 4 * scales * (1 if sym else 2)

    def versions(self) -> tuple[tuple[int, int, bool], ...]:
        """``(weight_bits, act_bits, weight_sym)`` per timestep range (one entry when static)."""
        if self.timestep_widths is not None:
            return tuple(tuple(v) for v in self.timestep_widths)
        return ((self.weight_bits, self.act_bits, self.weight_sym),)

    def at_range(self, i: int) -> "LayerPlan":
        """This layer as a static plan for timestep range ``i``."""
        if self.timestep_widths is None:
            return self
        w, a, sym = self.timestep_widths[i]
        return replace(self, weight_bits=w, act_bits=a, weight_sym=sym, timestep_widths=None)

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
            if self.timestep_widths is not None:
                self._validate_timestep_widths()
        elif self.timestep_widths is not None:
            raise PlanError(f"layer {self.name!r} stays floating point but has timestep_widths "
                            f"(a layer is quantized at every timestep or at none)")
        elif not self.reason:
            raise PlanError(f"layer {self.name!r} stays floating point but the plan gives no "
                            f"reason")


    def _validate_timestep_widths(self) -> None:
        tw = self.timestep_widths
        if not isinstance(tw, (tuple, list)) or len(tw) < 2:
            raise PlanError(f"layer {self.name!r}: timestep_widths must list one "
                            f"(weight_bits, act_bits, weight_sym) per range (>= 2), got {tw!r}")
        for i, v in enumerate(tw):
            ok = (isinstance(v, (tuple, list)) and len(v) == 3 and isinstance(v[2], bool)
                  and all(isinstance(b, int) and not isinstance(b, bool) for b in v[:2]))
            if not ok:
                raise PlanError(f"layer {self.name!r}: timestep_widths[{i}] must be "
                                f"(weight_bits, act_bits, weight_sym), got {v!r}")
            if v[0] not in numerics.SUPPORTED_WEIGHT_BITS or v[1] not in numerics.SUPPORTED_ACT_BITS:
                raise PlanError(f"layer {self.name!r}: timestep_widths[{i}] = W{v[0]}A{v[1]} has "
                                f"no op (supported: weights {numerics.SUPPORTED_WEIGHT_BITS}, "
                                f"activations {numerics.SUPPORTED_ACT_BITS})")
        if tuple(tw[0]) != (self.weight_bits, self.act_bits, self.weight_sym):
            raise PlanError(f"layer {self.name!r}: timestep_widths[0] {tuple(tw[0])} differs from "
                            f"the layer's own widths ({self.weight_bits}, {self.act_bits}, "
                            f"{self.weight_sym})")
        if self.act_static:
            raise PlanError(f"layer {self.name!r}: static activation scales cannot change with "
                            f"the timestep")
        if self.weight_bits == 4 or any(v[0] == 4 for v in tw):
            if (self.weight_group or self.in_features) % 2:
                raise PlanError(f"layer {self.name!r}: 4-bit weights need an even K (group)")


@dataclass
class Plan:
    """Per-layer decisions, keyed by module path (e.g. ``transformer_blocks.3.attn1.to_q``).

    Timestep-aware plans: ``timestep_bounds`` are ascending interior boundaries splitting the
    timestep axis into ``len(timestep_bounds) + 1`` ranges; range ``i`` holds the timesteps ``t``
    with ``bounds[i-1] < t <= bounds[i]`` (``range_of``). ``timestep_input`` names the model's
    forward argument that carries the timestep. Layers with ``timestep_widths`` dispatch on it at
    run time. ``search``: what ``viditq_compile.search`` recorded (budget, achieved averages,
    roles, per-candidate damage), for the report and the heat map; ``None`` for other plans.
    ``calibration``: ``CalibrationStats`` the plan needs (smoothing), kept in memory and written
    next to the plan by ``save``.
    """

    recipe: str
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    timestep_bounds: tuple[float, ...] = ()
    timestep_input: Optional[str] = None
    search: Optional[dict] = None
    calibration: Any = field(default=None, repr=False, compare=False)

    @property
    def num_ranges(self) -> int:
        return len(self.timestep_bounds) + 1

    def range_of(self, t: float) -> int:
        """Index of the timestep range holding ``t``."""
        return sum(1 for b in self.timestep_bounds if t > b)

    @property
    def timestep_aware(self) -> bool:
        return any(p.timestep_widths is not None for p in self.layers.values())

    def validate(self) -> None:
        """Every layer (``LayerPlan.validate``) and the timestep ranges."""
        b = self.timestep_bounds
        if any(not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x)
               for x in b) or list(b) != sorted(set(b)):
            raise PlanError(f"timestep_bounds must be strictly ascending finite numbers, got {b!r}")
        for p in self.layers.values():
            p.validate()
            if p.timestep_widths is not None and len(p.timestep_widths) != self.num_ranges:
                raise PlanError(f"layer {p.name!r} has {len(p.timestep_widths)} timestep_widths "
                                f"but the plan has {self.num_ranges} timestep ranges")
        if self.timestep_aware and not (isinstance(self.timestep_input, str)
                                        and self.timestep_input):
            raise PlanError("a timestep-aware plan must name its timestep_input (the model's "
                            "forward argument that carries the timestep)")

    @property
    def needs_calibration(self) -> list[str]:
        """Layers that cannot be built without calibration statistics."""
        return [p.name for p in self.layers.values()
                if p.quantized and (p.act_static or (p.balance or "").startswith("smooth"))]

    @property
    def quantized(self) -> list[LayerPlan]:
        return [p for p in self.layers.values() if p.quantized]

    @property
    def report(self) -> str:
        """The per-layer table; for a plan made by ``search``, the search table (per unit and
        timestep range: chosen widths and sensitivity, budget, achieved) first."""
        from .report import build_report

        table = str(build_report(self, title=f"plan (recipe {self.recipe!r})"))
        if self.search:
            from .search import search_report

            return search_report(self) + "\n\n" + table
        return table

    def to_dict(self) -> dict:
        out = {"format": PLAN_FORMAT, "recipe": self.recipe,
               "layers": [asdict(p) for p in self.layers.values()]}
        if self.timestep_bounds or self.timestep_input:
            out["timestep_bounds"] = list(self.timestep_bounds)
            out["timestep_input"] = self.timestep_input
        if self.search is not None:
            out["search"] = self.search
        return out

    @staticmethod
    def from_dict(data: dict) -> "Plan":
        if not isinstance(data, dict):
            raise PlanError(f"plan must be a JSON object, got {type(data).__name__}")
        if data.get("format") not in READABLE_FORMATS:
            raise PlanError(f"plan format {data.get('format')!r} is not supported "
                            f"(this version reads formats {READABLE_FORMATS})")
        unknown = set(data) - {"format", "recipe", "layers", "timestep_bounds", "timestep_input",
                               "search"}
        if unknown:
            raise PlanError(f"plan has unknown key(s) {sorted(unknown)}")
        fields = set(LayerPlan.__dataclass_fields__)
        layers = {}
        for i, row in enumerate(data.get("layers", [])):
            if not isinstance(row, dict) or set(row) - fields or "name" not in row:
                raise PlanError(f"plan layer #{i} is malformed: {row!r}")
            if row.get("timestep_widths") is not None:
                tw = row["timestep_widths"]
                if not isinstance(tw, list) or not all(isinstance(v, list) for v in tw):
                    raise PlanError(f"plan layer {row['name']!r}: timestep_widths must be a list "
                                    f"of [weight_bits, act_bits, weight_sym], got {tw!r}")
                row = {**row, "timestep_widths": tuple(tuple(v) for v in tw)}
            try:
                p = LayerPlan(**row)
            except TypeError as e:
                raise PlanError(f"plan layer #{i} is malformed: {e}") from None
            layers[p.name] = p
        bounds = data.get("timestep_bounds", [])
        if not isinstance(bounds, list):
            raise PlanError(f"plan timestep_bounds must be a list, got {bounds!r}")
        search = data.get("search")
        if search is not None and not isinstance(search, dict):
            raise PlanError(f"plan search record must be an object, got {type(search).__name__}")
        plan = Plan(recipe=str(data.get("recipe", "?")), layers=layers,
                    timestep_bounds=tuple(bounds), timestep_input=data.get("timestep_input"),
                    search=search)
        plan.validate()
        return plan

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the plan as JSON; a plan with ``calibration`` also writes it next to the plan
        (``<stem>.calibration.safetensors``), and ``load`` reads it back. A plan made by
        ``search`` also gets its heat map, ``<stem>.heatmap.png``."""
        self.validate()
        data = self.to_dict()
        path = os.fspath(path)
        if self.search:
            from .search import write_heatmap

            write_heatmap(self, sibling_path(path, ".heatmap.png"))
        if self.calibration is not None:
            calib = calibration_path(path)
            self.calibration.save(calib)
            data["calibration_file"] = os.path.basename(calib)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)

    @staticmethod
    def load(path: Union[str, os.PathLike]) -> "Plan":
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise PlanError(f"plan file {path!r} does not exist") from None
        except json.JSONDecodeError as e:
            raise PlanError(f"plan {path} is not valid JSON: {e}") from None
        calib = data.pop("calibration_file", None) if isinstance(data, dict) else None
        plan = Plan.from_dict(data)
        if calib is not None:
            from .calibration import CalibrationStats

            if not isinstance(calib, str) or os.path.basename(calib) != calib:
                raise PlanError(f"plan {path}: calibration_file must be a file name next to the "
                                f"plan, got {calib!r}")
            plan.calibration = CalibrationStats.load(os.path.join(os.path.dirname(path), calib))
        return plan


def sibling_path(plan_path: str, suffix: str) -> str:
    """``plan.json`` -> ``plan<suffix>``: where ``Plan.save`` writes the files that go with it."""
    stem = plan_path[:-5] if plan_path.endswith(".json") else plan_path
    return f"{stem}{suffix}"


def calibration_path(plan_path: str) -> str:
    """Where ``Plan.save`` writes a plan's calibration statistics."""
    return sibling_path(plan_path, ".calibration.safetensors")
