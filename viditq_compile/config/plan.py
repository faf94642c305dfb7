"""Plans: the per-layer decisions a quantized program is built from.

A plan is data. The select pass makes one from a recipe and the captured graph; the quantize pass
applies it. Plans are saved as JSON next to a quantized program and can be inspected, edited and
re-applied.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from viditq_compile.config import capabilities
from viditq_compile.io.atomic import atomic_write_files
from viditq_compile.io.files import parse_json_strict, read_capped
from viditq_compile.io.yaml_loader import short_repr
from viditq_compile.methods import balance
from viditq_compile.numerics.fp8 import FORMATS
from viditq_compile.numerics.hadamard import hadamard_order_split

PLAN_FORMAT = 3
# format 1 (W8A8 only) has none of the balancing / group fields; format 2 has no timestep ranges
# and no search record
READABLE_FORMATS = (1, 2, 3)

BALANCE_METHODS = balance.KINDS

MAX_PLAN_BYTES = 256 << 20
"""Largest plan JSON ``load`` reads (a plan is about 300 bytes per layer, plus its search record)."""

_INT, _NUM, _STR, _BOOL = "an int", "a number", "a string", "true/false"
_FIELD_KINDS = {"name": (_STR, False), "in_features": (_INT, False), "out_features": (_INT, False),
                "weight_bits": (_INT, True), "act_bits": (_INT, True), "weight_sym": (_BOOL, False),
                "act_sym": (_BOOL, False), "reason": (_STR, True), "weight_group": (_INT, True),
                "act_static": (_BOOL, False), "balance": (_STR, True), "alpha": (_NUM, True),
                "rotation_seed": (_INT, True), "note": (_STR, True), "number_format": (_STR, False),
                "rotation_blocks": (_INT, True), "balance_folded_into": (_STR, True)}
"""JSON type of each ``LayerPlan`` field read from a file (and whether it may be null);
``timestep_widths`` is checked on its own."""


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

    ``number_format``: ``"int"`` (integer grids, int32 accumulation) or ``"fp8_e4m3"`` (W8A8 on
    the e4m3 grid, per-channel weights and dynamic per-token activations, fp32 accumulation:
    ``numerics.fp8``).

    ``rotation_blocks``: the rotation of a rotating layer is block-diagonal, ``rotation_blocks``
    equal diagonal blocks ``I ⊗ H(in_features / rotation_blocks)``
    (``numerics.parallel.rotation_factors``): what a row-parallel layer under tensor parallelism
    needs, since a full-width Hadamard does not commute with a split of K
    (``parallel.tp_plan``), and what a balancing folded per head needs. ``None``: one full-width
    rotation.

    ``balance_folded_into``: for an attention out projection, the value projection whose weight
    and bias carry this layer's activation balancing (``M = diag(v) R``, ``v`` the activation
    vector, one rotation block per head), so its input arrives balanced and no activation is
    smoothed or rotated at run time (``methods.balance.fold_into_value``; set by the recipe's
    ``fold_balance``). ``None``: balanced at run time.

    ``timestep_widths``: for a layer whose widths change with the timestep, one
    ``(weight_bits, act_bits, weight_sym)`` per range of ``Plan.timestep_bounds`` (lowest
    timesteps first); the layer's own ``weight_bits`` / ``act_bits`` / ``weight_sym`` are those
    of range 0. ``None``: the same widths at every timestep.
    """

    name: str
    in_features: int
    out_features: int
    weight_bits: int | None = None
    act_bits: int | None = None
    weight_sym: bool = True
    act_sym: bool = True
    reason: str | None = None
    weight_group: int | None = None
    act_static: bool = False
    balance: str | None = None
    alpha: float | None = None
    rotation_seed: int | None = None
    note: str | None = None
    timestep_widths: tuple[tuple[int, int, bool], ...] | None = None
    number_format: str = "int"
    rotation_blocks: int | None = None
    balance_folded_into: str | None = None

    @property
    def quantized(self) -> bool:
        return self.weight_bits is not None

    @property
    def single_op(self) -> bool:
        """Plain W8A8 (int8 per-channel weights, dynamic per-token activations, no balancing):
        one ``viditq.w8a8_linear``; every other quantized layer is ``quantize_act`` + ``qlinear``
        (or ``qlinear_timestep`` when its widths change with the timestep)."""
        return (self.weight_bits == 8 and self.weight_group is None and self.balance is None
                and not self.act_static and self.timestep_widths is None
                and self.number_format == "int")

    @property
    def fp8(self) -> bool:
        return self.number_format == "fp8_e4m3"

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
            return tuple((w, a, s) for w, a, s in self.timestep_widths)
        return ((self.weight_bits, self.act_bits, self.weight_sym),)  # type: ignore[return-value]  # quantized: widths set

    def at_range(self, i: int) -> LayerPlan:
        """This layer as a static plan for timestep range ``i``."""
        if self.timestep_widths is None:
            return self
        w, a, sym = self.timestep_widths[i]
        return replace(self, weight_bits=w, act_bits=a, weight_sym=sym, timestep_widths=None)

    def validate(self) -> None:
        if self.number_format not in FORMATS:
            raise PlanError(f"layer {self.name!r}: number_format={short_repr(self.number_format)} is "
                            f"not one of {FORMATS}")
        if self.fp8:
            self._validate_fp8()
        if self.quantized:
            if self.weight_bits not in capabilities.WEIGHT_BITS:
                raise PlanError(f"layer {self.name!r}: weight_bits={self.weight_bits} has no op "
                                f"(supported: {capabilities.WEIGHT_BITS})")
            if self.act_bits not in capabilities.ACT_BITS:
                raise PlanError(f"layer {self.name!r}: act_bits={self.act_bits} has no op "
                                f"(supported: {capabilities.ACT_BITS})")
            if not self.act_sym:
                raise PlanError(f"layer {self.name!r}: asymmetric activations have no op")
            g = self.weight_group
            if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g <= 0
                                  or self.in_features % g):
                raise PlanError(f"layer {self.name!r}: weight_group={g!r} must be a positive "
                                f"int dividing in_features={self.in_features}")
            self._check_weight_width(self.weight_bits)
            if self.balance is not None:
                if self.balance not in BALANCE_METHODS:
                    raise PlanError(f"layer {self.name!r}: balance={self.balance!r} is not one "
                                    f"of {BALANCE_METHODS}")
                if balance.smooths(self.balance) and not (isinstance(self.alpha, (int, float))
                                                     and 0 <= self.alpha <= 1):
                    raise PlanError(f"layer {self.name!r}: smoothing needs alpha in [0, 1], got "
                                    f"{self.alpha!r}")
                if balance.rotates(self.balance) and not isinstance(self.rotation_seed, int):
                    raise PlanError(f"layer {self.name!r}: rotation needs an int rotation_seed, "
                                    f"got {self.rotation_seed!r}")
                if self.act_static:
                    raise PlanError(f"layer {self.name!r}: static per-tensor activation scales "
                                    f"cannot be combined with balancing")
            if self.rotation_blocks is not None:
                self._validate_rotation_blocks()
            if self.balance_folded_into is not None:
                self._validate_fold()
            if self.timestep_widths is not None:
                self._validate_timestep_widths()
        elif self.timestep_widths is not None:
            raise PlanError(f"layer {self.name!r} stays floating point but has timestep_widths "
                            f"(a layer is quantized at every timestep or at none)")
        elif not self.reason:
            raise PlanError(f"layer {self.name!r} stays floating point but the plan gives no "
                            f"reason")


    def _validate_rotation_blocks(self) -> None:
        b, k = self.rotation_blocks, self.in_features
        if not isinstance(b, int) or isinstance(b, bool) or b < 2:
            raise PlanError(f"layer {self.name!r}: rotation_blocks={b!r} must be an int >= 2 (null: "
                            f"one full-width rotation)")
        if not balance.rotates(self.balance):
            raise PlanError(f"layer {self.name!r}: rotation_blocks={b} but the layer does not rotate "
                            f"(balance={self.balance!r})")
        if k % b:
            raise PlanError(f"layer {self.name!r}: rotation_blocks={b} does not divide in_features={k}")
        try:
            hadamard_order_split(k // b)
        except ValueError as e:
            raise PlanError(f"layer {self.name!r}: rotation_blocks={b}: no Hadamard rotation of the "
                            f"block width {k // b} ({e})") from None

    def _validate_fold(self) -> None:
        into = self.balance_folded_into
        if not isinstance(into, str) or not into or into == self.name:
            raise PlanError(f"layer {self.name!r}: balance_folded_into={short_repr(into)} must name "
                            f"another layer (its value projection)")
        if self.balance is None:
            raise PlanError(f"layer {self.name!r}: balance_folded_into={into!r} but the layer is not "
                            f"balanced")
        if balance.rotates(self.balance) and self.rotation_blocks is None:
            raise PlanError(f"layer {self.name!r}: a rotation folded into {into!r} must be one block per "
                            f"head (rotation_blocks), not one full-width rotation")

    def _validate_fp8(self) -> None:
        if not self.quantized:
            raise PlanError(f"layer {self.name!r} stays floating point but has number_format "
                            f"'fp8_e4m3' (use 'int' for floating-point layers)")
        wants = {"W8A8": (self.weight_bits, self.act_bits) == (8, 8), "symmetric weights": self.weight_sym,
                 "per-channel weights (no weight_group)": self.weight_group is None,
                 "dynamic per-token activations (no act_static)": not self.act_static,
                 "the same format at every timestep (no timestep_widths)": self.timestep_widths is None}
        missing = [what for what, ok in wants.items() if not ok]
        if missing:
            raise PlanError(f"layer {self.name!r}: number_format 'fp8_e4m3' needs "
                            f"{', '.join(missing)}")

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
            if v[0] not in capabilities.WEIGHT_BITS or v[1] not in capabilities.ACT_BITS:
                raise PlanError(f"layer {self.name!r}: timestep_widths[{i}] = W{v[0]}A{v[1]} has "
                                f"no op (supported: weights {capabilities.WEIGHT_BITS}, "
                                f"activations {capabilities.ACT_BITS})")
        if tuple(tw[0]) != (self.weight_bits, self.act_bits, self.weight_sym):
            raise PlanError(f"layer {self.name!r}: timestep_widths[0] {tuple(tw[0])} differs from "
                            f"the layer's own widths ({self.weight_bits}, {self.act_bits}, "
                            f"{self.weight_sym})")
        if self.act_static:
            raise PlanError(f"layer {self.name!r}: static activation scales cannot change with "
                            f"the timestep")
        for v in tw:
            self._check_weight_width(v[0])

    def _check_weight_width(self, bits: int) -> None:
        why = capabilities.weight_width_refusal(self.in_features, self.out_features, bits,
                                                self.weight_group)
        if why:
            raise PlanError(f"layer {self.name!r} cannot be quantized at W{bits}: {why}; give it "
                            f"another weight width or keep it in floating point (weight_bits null)")


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
    timestep_input: str | None = None
    search: dict | None = None
    calibration: Any = field(default=None, repr=False, compare=False)
    tensor_parallel: dict | None = None
    """What ``vq.quantize(..., tensor_parallel=N)`` did (``parallel.tp_plan``): ``{"shards": N,
    "layers": {name: {"style": "rowwise" | "colwise", "rotation_blocks": int | None,
    "sqnr_full_db": float | None, "sqnr_block_db": float | None}}}``; the SQNRs (of the layer's
    output against floating point on the example call, with the full-width and the block-diagonal
    rotation) are None where not measured. ``None`` for plans made for one process."""
    attention: dict | None = None
    """The attention rule the program was built with (``config.recipe.AttentionRule.to_dict``:
    ``{"self": "int8", "temporal": "fp", "cross": "fp", "block": 1}``), so that the plan re-applied
    quantizes the same attentions; ``None``: the plan says nothing (the recipe's rule applies).
    ``"kept"``: ``{attention: reason}`` for the attentions of a kind the rule asks int8 for that stay
    in floating point (masked, causal, hand-written, ...), which the report lists."""

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
        _check_folds(self.layers)
        if self.tensor_parallel is not None:
            _check_tp_record(self.tensor_parallel, self.layers)
        if self.attention is not None:
            self.attention_rule()
        if self.timestep_aware and not (isinstance(self.timestep_input, str)
                                        and self.timestep_input):
            raise PlanError("a timestep-aware plan must name its timestep_input (the model's "
                            "forward argument that carries the timestep)")

    def attention_rule(self):
        """``attention`` as a validated ``config.recipe.AttentionRule`` (``None`` if unset)."""
        from viditq_compile.config.recipe import AttentionRule, RecipeError

        if self.attention is None:
            return None
        if not isinstance(self.attention, dict):
            raise PlanError(f"plan 'attention' must be an object, got {type(self.attention).__name__}")
        kept = self.attention.get("kept", {})
        if not isinstance(kept, dict) or len(kept) > 100_000 or not all(
                isinstance(k, str) and isinstance(v, str) and len(v) <= 1000 for k, v in kept.items()):
            raise PlanError(f"plan 'attention.kept' must map attention names to reasons, got {short_repr(kept)}")
        try:
            return AttentionRule.from_dict({k: v for k, v in self.attention.items() if k != "kept"})
        except RecipeError as e:
            raise PlanError(f"plan 'attention': {e}") from None

    @property
    def needs_calibration(self) -> list[str]:
        """Layers that cannot be built without calibration statistics."""
        return [p.name for p in self.layers.values()
                if p.quantized and (p.act_static or balance.smooths(p.balance))]

    @property
    def quantized(self) -> list[LayerPlan]:
        return [p for p in self.layers.values() if p.quantized]

    @property
    def report(self) -> str:
        """The per-layer table; for a plan made by ``search``, the search table (per unit and
        timestep range: chosen widths and sensitivity, budget, achieved) first."""
        from viditq_compile.report.tables import build_report

        table = str(build_report(self, title=f"plan (recipe {self.recipe!r})"))
        if self.search:
            from viditq_compile.report.search_table import search_report

            return search_report(self) + "\n\n" + table
        return table

    def to_dict(self) -> dict:
        out = {"format": PLAN_FORMAT, "recipe": self.recipe,
               "layers": [_layer_to_json(p) for p in self.layers.values()]}
        if self.timestep_bounds or self.timestep_input:
            out["timestep_bounds"] = list(self.timestep_bounds)
            out["timestep_input"] = self.timestep_input
        if self.search is not None:
            out["search"] = self.search
        if self.tensor_parallel is not None:
            out["tensor_parallel"] = self.tensor_parallel
        if self.attention is not None:
            out["attention"] = self.attention
        return out

    @staticmethod
    def from_dict(data: dict) -> Plan:
        """A plan from its JSON form (``to_dict``), types checked field by field, then validated."""
        if not isinstance(data, dict):
            raise PlanError(f"plan must be a JSON object, got {type(data).__name__}")
        if data.get("format") not in READABLE_FORMATS:
            raise PlanError(f"plan format {short_repr(data.get('format'))} is not supported "
                            f"(this version reads formats {READABLE_FORMATS})")
        unknown = set(data) - {"format", "recipe", "layers", "timestep_bounds", "timestep_input",
                               "search", "tensor_parallel", "attention"}
        if unknown:
            raise PlanError(f"plan has unknown key(s) {short_repr(sorted(map(str, unknown)))}")
        rows = data.get("layers", [])
        if not isinstance(rows, list):
            raise PlanError(f"plan 'layers' must be a list of layer objects, got {type(rows).__name__}")
        layers = {}
        for i, row in enumerate(rows):
            p = _layer_from_json(row, i)
            if p.name in layers:
                raise PlanError(f"plan layer #{i}: layer {short_repr(p.name)} is listed twice")
            layers[p.name] = p
        bounds = data.get("timestep_bounds", [])
        if not isinstance(bounds, list) or any(not _is_num(b) or abs(b) > 1e300 for b in bounds):
            raise PlanError(f"plan 'timestep_bounds' must be a list of numbers, got {short_repr(bounds)}")
        search = data.get("search")
        if search is not None and not isinstance(search, dict):
            raise PlanError(f"plan search record must be an object, got {type(search).__name__}")
        recipe, ts_input = data.get("recipe", "?"), data.get("timestep_input")
        if not isinstance(recipe, str):
            raise PlanError(f"plan 'recipe' must be a string, got {short_repr(recipe)}")
        if ts_input is not None and not isinstance(ts_input, str):
            raise PlanError(f"plan 'timestep_input' must be a string or null, got {short_repr(ts_input)}")
        plan = Plan(recipe=recipe, layers=layers, timestep_bounds=tuple(bounds), timestep_input=ts_input,
                    search=search, tensor_parallel=data.get("tensor_parallel"), attention=data.get("attention"))
        plan.validate()
        return plan

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan as JSON; a plan with ``calibration`` also writes it next to the plan
        (``<stem>.calibration.safetensors``), and ``load`` reads it back. A plan made by
        ``search`` also gets its heat map, ``<stem>.heatmap.png``.

        Each file is written atomically (``io.atomic``), and all of them are staged (written and
        fsynced) before any replaces its predecessor: a save that fails while writing leaves the
        previous plan, calibration and heat map as they were. A path that is a symlink is refused.
        """
        self.validate()
        data = self.to_dict()
        path = os.fspath(path)
        files: dict[str | os.PathLike, Any] = {}
        if self.search:
            from viditq_compile.report.search_table import write_heatmap

            files[sibling_path(path, ".heatmap.png")] = lambda tmp: write_heatmap(self, tmp)
        if self.calibration is not None:
            calib = calibration_path(path)
            files[calib] = self.calibration.to_bytes()
            data["calibration_file"] = os.path.basename(calib)
        files[path] = json.dumps(data, indent=1).encode("utf-8")  # last: the plan names the others
        atomic_write_files(files)

    @staticmethod
    def loads(data: bytes | str, source: str,
              read_sibling: Callable[[str], bytes] | None = None) -> Plan:
        """A plan from the bytes (or text) of its JSON file. ``source`` names the file in every error.

        A plan that names a ``calibration_file`` gets it from ``read_sibling(name)`` (the bytes of the
        file of that name next to the plan); without ``read_sibling`` such a plan is refused. Raises
        ``PlanError`` (or the ``CalibrationError`` of the sibling) for anything malformed: invalid
        UTF-8 or JSON, nesting too deep, duplicate keys, wrong types, values out of range.
        """
        try:
            obj = parse_json_strict(data, PlanError)
        except PlanError as e:
            raise PlanError(f"plan {source}: {e}") from None
        calib = obj.pop("calibration_file", None) if isinstance(obj, dict) else None
        try:
            plan = Plan.from_dict(obj)
        except PlanError as e:
            raise PlanError(f"plan {source}: {e}") from None
        if calib is not None:
            from viditq_compile.calibration.stats import CalibrationStats

            if not isinstance(calib, str) or os.path.basename(calib) != calib or calib in ("", ".", "..") \
                    or "\\" in calib or "\0" in calib:
                raise PlanError(f"plan {source}: calibration_file must be a file name next to the "
                                f"plan, got {short_repr(calib)}")
            if read_sibling is None:
                raise PlanError(f"plan {source} names calibration_file {calib!r}, but no file next to it "
                                f"can be read here (Plan.loads without read_sibling)")
            plan.calibration = CalibrationStats.loads(read_sibling(calib), source=_sibling_source(source, calib))
        return plan

    @staticmethod
    def load(path: str | os.PathLike) -> Plan:
        """Read a plan file written by ``save`` (and its calibration file, if it names one); each
        file is read once. Raises ``PlanError`` naming the file."""
        path = os.fspath(path)
        directory = os.path.dirname(path)

        def read_sibling(name: str) -> bytes:
            from viditq_compile.calibration.stats import CalibrationError, read_calibration_file

            try:
                return read_calibration_file(os.path.join(directory, name))
            except CalibrationError as e:
                raise PlanError(f"plan {path}: calibration_file: {e}") from None

        data = read_capped(path, MAX_PLAN_BYTES, "plan file", PlanError)
        return Plan.loads(data, source=path, read_sibling=read_sibling)


_TP_ENTRY_KINDS = {"style": _STR, "rotation_blocks": _INT, "sqnr_full_db": _NUM, "sqnr_block_db": _NUM}


def _check_tp_record(rec: Any, layers: dict) -> None:
    """``Plan.tensor_parallel`` as a file may hold it: types, names of the plan's layers."""
    if not isinstance(rec, dict) or set(rec) != {"shards", "layers"}:
        raise PlanError(f"plan tensor_parallel must be an object with keys 'layers', 'shards', got "
                        f"{short_repr(rec)}")
    n = rec["shards"]
    if not isinstance(n, int) or isinstance(n, bool) or not 2 <= n <= 1 << 16:
        raise PlanError(f"plan tensor_parallel.shards must be an int in [2, 65536], got {short_repr(n)}")
    if not isinstance(rec["layers"], dict):
        raise PlanError(f"plan tensor_parallel.layers must be an object, got {short_repr(rec['layers'])}")
    for name, e in rec["layers"].items():
        who = f"plan tensor_parallel.layers[{short_repr(name)}]"
        if name not in layers:
            raise PlanError(f"{who}: not a layer of the plan")
        if not isinstance(e, dict) or set(e) != set(_TP_ENTRY_KINDS):
            raise PlanError(f"{who} must be an object with keys {sorted(_TP_ENTRY_KINDS)}, got {short_repr(e)}")
        for key, kind in _TP_ENTRY_KINDS.items():
            v = e[key]
            if not (v is None and key != "style") and not _check_kind(v, kind):
                raise PlanError(f"{who}: {key!r} must be {kind}, got {short_repr(v)}")
        if e["style"] not in ("rowwise", "colwise"):
            raise PlanError(f"{who}: style {short_repr(e['style'])} is not 'rowwise' or 'colwise'")
        if e["rotation_blocks"] != layers[name].rotation_blocks:
            raise PlanError(f"{who}: rotation_blocks={e['rotation_blocks']!r} but the layer has "
                            f"{layers[name].rotation_blocks!r}")


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_kind(value: Any, kind: str) -> bool:
    if kind == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _NUM:
        return _is_num(value)
    if kind == _STR:
        return isinstance(value, str)
    return isinstance(value, bool)


def _check_folds(layers: dict[str, LayerPlan]) -> None:
    """Each ``balance_folded_into`` names a quantized layer of the plan that is itself balanced at
    run time on its input only (no fold of its own) and that no other layer folds into."""
    into: dict[str, str] = {}
    for p in layers.values():
        v = p.balance_folded_into
        if v is None:
            continue
        target = layers.get(v)
        if target is None or not target.quantized:
            raise PlanError(f"layer {p.name!r}: balance_folded_into={v!r} is not a quantized layer of "
                            f"the plan")
        if target.balance_folded_into is not None:
            raise PlanError(f"layer {p.name!r}: balance_folded_into={v!r}, which folds its own "
                            f"balancing into {target.balance_folded_into!r}")
        if v in into:
            raise PlanError(f"layers {into[v]!r} and {p.name!r} both fold their balancing into {v!r}")
        into[v] = p.name


def _layer_to_json(p: LayerPlan) -> dict:
    row = asdict(p)
    if row["number_format"] == "int":  # the default: plans of integer layers read as before
        del row["number_format"]
    for key in ("rotation_blocks", "balance_folded_into"):  # the defaults, likewise
        if row[key] is None:
            del row[key]
    return row


def _layer_from_json(row: Any, i: int) -> LayerPlan:
    """One ``LayerPlan`` from a JSON object; every field's type checked, errors name the layer and key."""
    if not isinstance(row, dict):
        raise PlanError(f"plan layer #{i} must be an object, got {type(row).__name__} {short_repr(row)}")
    name = row.get("name")
    if not isinstance(name, str):
        raise PlanError(f"plan layer #{i}: 'name' must be a string, got {short_repr(name)}")
    who = f"plan layer {short_repr(name)}"
    unknown = set(row) - set(LayerPlan.__dataclass_fields__)
    if unknown:
        raise PlanError(f"{who}: unknown key(s) {short_repr(sorted(unknown))}")
    for key in ("in_features", "out_features"):
        if key not in row:
            raise PlanError(f"{who}: '{key}' is missing")
    for key, value in row.items():
        if key == "timestep_widths":
            continue
        kind, nullable = _FIELD_KINDS[key]
        if not (value is None and nullable) and not _check_kind(value, kind):
            raise PlanError(f"{who}: '{key}' must be {kind}{' or null' if nullable else ''}, got {short_repr(value)}")
    for key in ("in_features", "out_features"):
        if not 1 <= row[key] <= 2**31:
            raise PlanError(f"{who}: '{key}' must be in [1, 2**31], got {short_repr(row[key])}")
    tw = row.get("timestep_widths")
    if tw is not None:
        if not isinstance(tw, list) or not all(isinstance(v, list) for v in tw):
            raise PlanError(f"{who}: 'timestep_widths' must be a list of [weight_bits, act_bits, weight_sym], "
                            f"got {short_repr(tw)}")
        row = {**row, "timestep_widths": tuple(tuple(v) for v in tw)}
    return LayerPlan(**row)


def _sibling_source(source: str, name: str) -> str:
    """How errors name the file ``name`` next to the plan ``source``."""
    return os.path.join(os.path.dirname(source), name) if os.path.dirname(source) else name


def sibling_path(plan_path: str, suffix: str) -> str:
    """``plan.json`` -> ``plan<suffix>``: where ``Plan.save`` writes the files that go with it."""
    stem = plan_path[:-5] if plan_path.endswith(".json") else plan_path
    return f"{stem}{suffix}"


def calibration_path(plan_path: str) -> str:
    """Where ``Plan.save`` writes a plan's calibration statistics."""
    return sibling_path(plan_path, ".calibration.safetensors")
