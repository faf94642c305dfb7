"""Recipes: what the user asks for. A preset name, a ``Recipe``, or a YAML file.

The YAML format is that of the ViDiT-Q reference implementation's quantization configs; every
key of it is parsed into the recipe, and each is used, refused or reported, never silently
dropped:

- used: ``remain_fp_regex``, ``weight.*`` / ``act.*`` (``n_bits``, ``i_bitwidth``, ``sym``, an int
  ``group``: a weight group size along K), ``viditq`` / ``smooth_quant`` / ``quarot``,
  ``mixed_precision``, ``balance`` (this project's: ``search``, or ``{search: {kinds, alphas,
  max_rows, seeds}}``, the per-layer balancing search, ``BalanceSearch``; exclusive with the
  three balancing blocks), and ``calib_data.save_path``: where the recipe's calibration statistics
  live (``Recipe.calibration_path``: relative to the working directory, as the reference's
  scripts run; a ``.pth`` / ``.pt`` suffix becomes ``.safetensors``, statistics are never
  pickled). ``viditq quantize --calibration N`` writes them there; ``vq.quantize``, the backend
  and the CLI read them from there when no ``calibration`` is given and the file exists (a
  warning says when it does not).
- refused, by ``Recipe.check_supported()`` with an error naming the key
  (``Recipe.unsupported()``): a capability not built yet (widths without an op, asymmetric or
  group-wise activations).
- reported as not applied, by a warning naming the key the first time the recipe is checked
  (``Recipe.not_applied()``): ``model.*`` (informational tags: layers are found from the graph,
  family knowledge lives in ``viditq_compile.families``) and a ``weight.group`` / ``act.group``
  name other than the granularity used (per output channel / per token).

One key is this project's, not the reference's: ``keep_fp_from_graph`` (default true). Layers
stay floating point where the graph's data flow shows a conditioning, embedding or final
projection layer (``graph.roles.keep_fp_by_graph``: it reads the timestep, guidance or pooled
text, produces modulation, embeds patches, or projects out), whatever it is called; the family
names (``DIT_KEEP_FP_REGEX``) decide only the layers the graph cannot place. An explicit
``remain_fp_regex`` keeps its matches FP on top of that; ``keep_fp_from_graph: false`` leaves the
decision to the regex alone.

Another is this project's too: ``attention`` (``AttentionRule``: int8 or fp per attention kind,
self / temporal / cross, and the tokens per scale), used by ``passes.quantize_attention``.

And ``fold_balance`` (default false): fold each attention out projection's balancing into its
value projection (``passes.fold_balance``: one rotation block per head), so no activation of the
out projection is smoothed or rotated at run time; layers that cannot fold are noted in the plan.

Unknown keys are refused at parse time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from viditq_compile.config import capabilities
from viditq_compile.families import registry as families
from viditq_compile.io.files import read_capped
from viditq_compile.io.user_regex import UserRegexError, compile_user_regex, user_search
from viditq_compile.io.yaml_loader import MAX_BYTES as MAX_YAML_BYTES
from viditq_compile.io.yaml_loader import YamlError, load_yaml, short_repr
from viditq_compile.methods import balance as balancing
from viditq_compile.numerics.fp8 import FORMATS

# Linears a DiT quantizer keeps in floating point by default: timestep / class / caption
# embedders, adaLN modulation, patch embedding and the final projection. They are a sliver of the
# FLOPs, run at M = batch (or few tokens), and the reference configs keep them FP too. The names
# are each family's (``viditq_compile.families``: PixArt, DiT, Latte, Flux, CogVideoX, OpenSORA).
DIT_KEEP_FP_REGEX = families.KEEP_FP_REGEX

log = logging.getLogger(__name__)


class RecipeError(ValueError):
    """A recipe that cannot be parsed or applied; the message names the offending key."""


@dataclass(frozen=True)
class QuantSpec:
    """Quantization of one operand (weights or activations).

    n_bits: candidate widths (one for a uniform recipe, several for mixed precision);
    i_bitwidth: index of the default width; sym: zero point fixed at 0;
    group: an int is a weight group size along K (refused for activations); a name is a
    granularity tag as written in the reference configs (which ignore it), reported by
    ``Recipe.not_applied`` unless it names what is done anyway.
    """

    n_bits: tuple[int, ...] = (8,)
    i_bitwidth: int = 0
    sym: bool = True
    group: str | int | None = None

    @property
    def bits(self) -> int:
        return self.n_bits[self.i_bitwidth]


BALANCE_METHOD_OF_KEY = {"viditq": "smooth+rotate", "smooth_quant": "smooth", "quarot": "rotate"}

SEARCH_KINDS = ("none",) + balancing.KINDS
"""What the per-layer balancing search may choose (``BalanceSearch.kinds``): ``"none"`` (no
balancing, ``LayerPlan.balance = None``) or a balancing method."""
SEARCH_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
"""The default grid of smoothing exponents the search tries (``BalanceSearch.alphas``)."""
SEARCH_MAX_ROWS = 4096
"""Calibration input rows per layer the search scores by default (tokens, evenly spaced)."""

DEFAULT_ALPHA = 0.5
"""Smoothing exponent on the weight side (``m = w_max^α / a_max^(1-α)``) for the presets."""


@dataclass(frozen=True)
class BalanceRule:
    """A channel-balancing block of the reference YAML (``viditq``, ``smooth_quant``, ``quarot``).

    ``optional``: applied only when calibration statistics are given (the ``w8a8`` preset stays
    data-free without them). A rule that is not optional and wants smoothing degrades to its
    rotation part, or to nothing, without statistics, and the report says so.
    """

    key: str
    layer_name_regex: str
    alpha: float | None = None
    optional: bool = False

    @property
    def method(self) -> str:
        return BALANCE_METHOD_OF_KEY[self.key]

    def matches(self, layer: str) -> bool:
        return _search(self.layer_name_regex, layer, f"{self.key}.layer_name_regex")


@dataclass(frozen=True)
class BalanceSearch:
    """``balance="search"``: per producer (the linears that share one balanced input), the select
    step chooses the balancing (``kinds``) and the smoothing exponent (``alphas``, for the kinds
    that smooth) that minimise the layers' output error on the calibration inputs
    (``mixed_precision.balance_search``), scoring at most ``max_rows`` input rows per layer.
    ``seeds``: the seeds of the rotation's random signs to try for the kinds that rotate (empty:
    the recipe's ``seed`` only). Needs the calibration calls themselves, not only statistics.
    Validated on construction."""

    kinds: tuple[str, ...] = SEARCH_KINDS
    alphas: tuple[float, ...] = SEARCH_ALPHAS
    max_rows: int = SEARCH_MAX_ROWS
    seeds: tuple[int, ...] = ()

    def __post_init__(self):
        kinds, alphas = self.kinds, self.alphas
        if isinstance(kinds, str) or not isinstance(kinds, (tuple, list)) or not kinds \
                or any(k not in SEARCH_KINDS for k in kinds) or len(set(kinds)) != len(kinds):
            raise RecipeError(f"balance search kinds={short_repr(kinds)}: expected distinct names "
                              f"from {list(SEARCH_KINDS)}")
        if isinstance(alphas, (str, bytes)) or not isinstance(alphas, (tuple, list)) \
                or any(not isinstance(a, (int, float)) or isinstance(a, bool) or not 0 <= a <= 1
                       for a in alphas) or len(set(alphas)) != len(alphas):
            raise RecipeError(f"balance search alphas={short_repr(alphas)}: expected distinct numbers "
                              f"in [0, 1]")
        smooth = [k for k in kinds if k != "none" and balancing.smooths(k)]
        if smooth and not alphas:
            raise RecipeError(f"balance search kinds {smooth} smooth, so alphas must name at least one "
                              f"exponent in [0, 1]")
        m = self.max_rows
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise RecipeError(f"balance search max_rows={short_repr(m)}: expected an int >= 1")
        seeds = self.seeds
        if isinstance(seeds, (str, bytes)) or not isinstance(seeds, (tuple, list)) or any(
                isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63 for v in seeds) \
                or len(set(seeds)) != len(seeds):
            raise RecipeError(f"balance search seeds={short_repr(seeds)}: expected distinct ints in "
                              f"[0, 2**63)")
        object.__setattr__(self, "kinds", tuple(kinds))
        object.__setattr__(self, "alphas", tuple(float(a) for a in alphas))
        object.__setattr__(self, "seeds", tuple(seeds))

    def candidates(self, can_smooth: bool = True, can_rotate: bool = True,
                   seed: int = 0) -> list[tuple[str | None, float | None, int | None]]:
        """``(kind, alpha, rotation_seed)`` to try, in order (``kind`` ``None``: no balancing;
        ``alpha`` ``None`` for the kinds that do not smooth, ``rotation_seed`` ``None`` for those
        that do not rotate; ``seed``: the recipe's, used when ``seeds`` is empty), without the
        kinds a producer cannot take."""
        out: list[tuple[str | None, float | None, int | None]] = []
        for k in self.kinds:
            kind = None if k == "none" else k
            if (balancing.smooths(kind) and not can_smooth) or (balancing.rotates(kind) and not can_rotate):
                continue
            alphas = self.alphas if balancing.smooths(kind) else (None,)
            seeds = (self.seeds or (seed,)) if balancing.rotates(kind) else (None,)
            out += [(kind, a, s) for s in seeds for a in alphas]
        return out


ATTENTION_FORMATS = ("fp", "int8")
ATTENTION_KEYS = {"self": "self_attn", "temporal": "temporal_attn", "cross": "cross_attn"}
"""``attention:`` YAML key -> the attention kind of ``graph.roles`` it sets."""


@dataclass(frozen=True)
class AttentionRule:
    """``attention: {self: int8, temporal: int8, cross: fp, block: 1}``: per attention kind (as
    ``graph.roles`` tells it from the graph), ``"int8"`` (SageAttention-style ``viditq.attention``:
    int8 Q·Kᵀ with K mean-subtracted, fp32 softmax, 16-bit P·V; ``passes.quantize_attention``) or
    ``"fp"`` (SDPA as the model runs it). ``block``: tokens per int8 scale of Q and of K; 1 (per
    token, the default) costs the kernel nothing over SageAttention's 128-token blocks and measured
    38.3 against 32.3 dB output SQNR on the outlier PixArt of ``tests/zoo.py`` (linears FP). Every
    kind is ``"fp"`` by default. Validated on construction."""

    self_attn: str = "fp"
    temporal_attn: str = "fp"
    cross_attn: str = "fp"
    block: int = 1
    search_min_db: float | None = None
    """For ``viditq_compile.search``: an attention of an int8 kind stays in floating point when,
    quantized alone, it scores below this many dB on its role's metric (output SQNR for self
    attention, the guidance direction for cross attention, frame differences for temporal
    attention; the worst timestep range counts). None: every attention of an int8 kind is int8,
    and the search only reports their scores."""

    def __post_init__(self):
        for kind in ATTENTION_KEYS.values():
            v = getattr(self, kind)
            if v not in ATTENTION_FORMATS:
                raise RecipeError(f"recipe key 'attention.{kind.removesuffix('_attn')}': expected one of "
                                  f"{list(ATTENTION_FORMATS)}, got {short_repr(v)}")
        b = self.block
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 4096:
            raise RecipeError(f"recipe key 'attention.block': expected an int in [1, 4096] (tokens per "
                              f"scale), got {short_repr(b)}")
        m = self.search_min_db
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m <= 200):
            raise RecipeError(f"recipe key 'attention.search_min_db': expected a number of dB in [0, 200] "
                              f"or null, got {short_repr(m)}")

    def format_of(self, kind: str) -> str:
        """``"int8"`` or ``"fp"`` for an attention of ``kind`` (``"other"``, a pooler: ``"fp"``)."""
        return getattr(self, kind) if kind in ATTENTION_KEYS.values() else "fp"

    @property
    def quantizes(self) -> bool:
        return any(getattr(self, k) != "fp" for k in ATTENTION_KEYS.values())

    def to_dict(self) -> dict:
        """``{"self": ..., "temporal": ..., "cross": ..., "block": ...}``: the YAML key's form."""
        out = {**{k: getattr(self, a) for k, a in ATTENTION_KEYS.items()}, "block": self.block}
        if self.search_min_db is not None:
            out["search_min_db"] = self.search_min_db
        return out

    @staticmethod
    def from_dict(data: Any) -> AttentionRule:
        """The rule from the YAML key's form (a plan file's ``attention``), validated."""
        return _attention(data)


@dataclass(frozen=True)
class MixedPrecisionRule:
    """``mixed_precision.{weight,act}.layer_name_regex``: [FP regex, regex for n_bits[0], ...]."""

    weight: tuple[str, ...] = ()
    act: tuple[str, ...] = ()


@dataclass(frozen=True)
class Recipe:
    """The user's intent. ``enabled=False`` keeps every layer in floating point (preset ``fp``).

    ``static_act``: one static per-tensor activation scale from calibration instead of dynamic
    per-token scales (the paper's naive baseline). ``seed``: seed of the random signs of every
    Hadamard rotation (recorded in the plan). ``keep_fp_from_graph``: keep the layers the graph
    shows to be conditioning, embedding or final projection in floating point (module docstring).
    ``number_format``: ``"int"``, or ``"fp8_e4m3"`` for W8A8 on the e4m3 grid (``numerics.fp8``:
    per-channel weights, dynamic per-token activations, fp32 accumulation; the fast route on
    Hopper GPUs). ``budget`` (a ``viditq_compile.Budget``): the
    widths are not fixed but searched under this budget (``viditq_compile.search``, with the rest
    of the recipe as its base and ``timestep_ranges`` ranges), which needs calibration calls.
    ``balance``: the balancing rules, or ``"search"`` (normalised on construction to no rules and
    ``balance_search=BalanceSearch()``): the balancing and alpha are chosen per producer by the
    layers' output error on the calibration calls (``BalanceSearch``). ``fold_balance``: fold
    the out projections' balancing into the value projections (``passes.fold_balance``).
    """

    name: str
    weight: QuantSpec = QuantSpec(sym=True)
    act: QuantSpec = QuantSpec(sym=True)
    remain_fp_regex: str = DIT_KEEP_FP_REGEX
    keep_fp_from_graph: bool = True
    enabled: bool = True
    balance: tuple[BalanceRule, ...] = ()
    mixed_precision: MixedPrecisionRule | None = None
    calib_save_path: str | None = None
    model_tags: tuple[tuple[str, str], ...] = ()
    source: str = "preset"
    static_act: bool = False
    seed: int = 0
    budget: Any = None
    timestep_ranges: int = 1
    number_format: str = "int"
    attention: AttentionRule = AttentionRule()
    balance_search: BalanceSearch | None = None
    fold_balance: bool = False

    def __post_init__(self):
        if not isinstance(self.fold_balance, bool):
            raise RecipeError(f"recipe {self.name!r}: fold_balance must be true/false, got "
                              f"{short_repr(self.fold_balance)}")
        b = self.balance
        if isinstance(b, str):
            if b != "search":
                raise RecipeError(f"recipe {self.name!r}: balance={short_repr(b)}: expected 'search' or a "
                                  f"tuple of BalanceRule")
            object.__setattr__(self, "balance", ())
            if self.balance_search is None:
                object.__setattr__(self, "balance_search", BalanceSearch())
        elif isinstance(b, list):
            object.__setattr__(self, "balance", tuple(b))
        if not isinstance(self.balance, tuple) or any(not isinstance(r, BalanceRule) for r in self.balance):
            raise RecipeError(f"recipe {self.name!r}: balance={short_repr(b)}: expected 'search' or a tuple "
                              f"of BalanceRule")
        if self.balance_search is not None:
            if not isinstance(self.balance_search, BalanceSearch):
                raise RecipeError(f"recipe {self.name!r}: balance_search must be a BalanceSearch, got "
                                  f"{type(self.balance_search).__name__}")
            if self.balance:
                raise RecipeError(f"recipe {self.name!r}: balance='search' chooses the balancing of every "
                                  f"layer; it cannot be combined with the balancing rules "
                                  f"{[r.key for r in self.balance]}")

    # -- construction ---------------------------------------------------------------------
    @staticmethod
    def preset(name: str) -> Recipe:
        if name not in PRESETS:
            raise RecipeError(f"unknown recipe preset {short_repr(name)}; presets: {sorted(PRESETS)}")
        return PRESETS[name]

    @staticmethod
    def from_yaml(path: str | os.PathLike) -> Recipe:
        """Read and parse a YAML recipe (``io.yaml_loader``: size, depth and alias limits, no
        duplicate keys). Every error names the file, and the key where there is one."""
        path = os.fspath(path)
        data = _read_recipe_file(path)
        try:
            parsed = load_yaml(data, f"recipe file {path}")
        except YamlError as e:
            raise RecipeError(str(e)) from None
        try:
            return Recipe.from_dict(parsed, name=os.path.splitext(os.path.basename(path))[0], source=path)
        except RecipeError as e:
            raise RecipeError(f"recipe file {path}: {e}") from None

    @staticmethod
    def from_dict(data: Any, name: str = "custom", source: str = "dict") -> Recipe:
        return _parse(data, name, source)

    @staticmethod
    def resolve(recipe: str | os.PathLike | Recipe | Mapping) -> Recipe:
        """A preset name, a path to a YAML file, a mapping in the YAML format, or a Recipe."""
        if isinstance(recipe, Recipe):
            return recipe
        if isinstance(recipe, Mapping):
            return Recipe.from_dict(recipe)
        if isinstance(recipe, (str, os.PathLike)):
            s = os.fspath(recipe)
            if isinstance(s, bytes):
                s = os.fsdecode(s)
            if s in PRESETS:
                return PRESETS[s]
            if s.endswith((".yaml", ".yml")) or os.path.sep in s or os.path.lexists(s):
                return Recipe.from_yaml(s)
            raise RecipeError(f"unknown recipe {short_repr(s)}: not a preset ({sorted(PRESETS)}) "
                              f"and not a path to a YAML file")
        raise RecipeError(f"recipe must be a preset name, a YAML path, a mapping or a Recipe, "
                          f"got {type(recipe).__name__}")

    # -- capability checks ----------------------------------------------------------------
    def unsupported(self) -> list[str]:
        """Keys (in YAML dotted form) whose capability is not built yet, with the reason."""
        out: list[str] = []
        if not self.enabled:
            return out
        if self.mixed_precision is not None:
            supported = {"weight": capabilities.WEIGHT_BITS, "act": capabilities.ACT_BITS}
            for op, spec in (("weight", self.weight), ("act", self.act)):
                for i, regex in enumerate(getattr(self.mixed_precision, op)[1:]):
                    bits = spec.n_bits[i]
                    if regex and bits not in supported[op]:
                        out.append(f"mixed_precision.{op}.layer_name_regex[{i + 1}]: assigns "
                                   f"{bits}-bit {op}s to {short_repr(regex)}, which is not supported "
                                   f"(supported: {supported[op]})")
        if self.weight.bits not in capabilities.WEIGHT_BITS:
            out.append(f"weight.n_bits: {self.weight.bits}-bit weights are not supported yet "
                       f"(supported: {capabilities.WEIGHT_BITS})")
        if self.act.bits not in capabilities.ACT_BITS:
            out.append(f"act.n_bits: {self.act.bits}-bit activations are not supported yet "
                       f"(supported: {capabilities.ACT_BITS})")
        if not self.act.sym:
            out.append("act.sym: asymmetric per-token activations are not supported yet")
        if self.balance_search is not None and self.static_act:
            out.append("balance: search balances per layer, which static per-tensor activation scales "
                       "cannot be combined with")
        if self.balance_search is not None and self.budget is not None:
            out.append("balance: search together with a mixed-precision budget is not built yet (search "
                       "the widths with a fixed balancing, e.g. w4a8-mp)")
        if isinstance(self.act.group, int):
            out.append(f"act.group: group-wise activation quantization (group={self.act.group}) "
                       f"is not supported (activations are quantized per token)")
        if self.number_format not in FORMATS:
            out.append(f"number_format: {short_repr(self.number_format)} is not one of {list(FORMATS)}")
        elif self.number_format != "int":
            fp8_needs = {"weight.n_bits: 8": self.weight.bits == 8 and self.act.bits == 8,
                         "weight.sym: true": self.weight.sym,
                         "no weight.group": not isinstance(self.weight.group, int),
                         "dynamic activations (not the naive static scale)": not self.static_act,
                         "no mixed_precision": self.mixed_precision is None and self.budget is None}
            for what, ok in fp8_needs.items():
                if not ok:
                    out.append(f"number_format: {self.number_format} is W8A8 with symmetric "
                               f"per-channel weights and per-token activations; it needs {what}")
        return out

    def check_supported(self) -> None:
        if self.budget is not None:
            from viditq_compile.config.budget import Budget

            if not isinstance(self.budget, Budget):
                raise RecipeError(f"recipe {self.name!r}: budget must be a viditq_compile.Budget, got "
                                  f"{type(self.budget).__name__}")
        if isinstance(self.timestep_ranges, bool) or not isinstance(self.timestep_ranges, int) \
                or self.timestep_ranges < 1:
            raise RecipeError(f"recipe {self.name!r}: timestep_ranges must be an int >= 1, got "
                              f"{self.timestep_ranges!r}")
        problems = self.unsupported()
        if problems:
            raise RecipeError(f"recipe {self.name!r} ({self.source}) uses what is not built yet: "
                              + "; ".join(problems))
        for note in self.not_applied():
            if (self.source, self.name, note) not in _REPORTED:  # once per recipe, not per check
                _REPORTED.add((self.source, self.name, note))
                log.warning("recipe %r (%s): %s", self.name, self.source, note)

    def not_applied(self) -> list[str]:
        """Parsed keys (YAML dotted form) that are not applied, with why (the module docstring)."""
        out = []
        if self.model_tags:
            keys = ", ".join(f"model.{k}" for k, _ in self.model_tags)
            out.append(f"{keys}: informational tags, not applied (layers are found from the graph, "
                       f"family knowledge in viditq_compile.families)")
        for op, spec, done in (("weight", self.weight, "weights are quantized per output channel "
                                                       "(an int group is a group size along K)"),
                               ("act", self.act, "activations are quantized per token")):
            if isinstance(spec.group, str) and spec.group.lower() not in _GRANULARITY_USED[op]:
                out.append(f"{op}.group: {spec.group!r} is not applied: {done}")
        return out

    @property
    def calibration_path(self) -> str | None:
        """Where the recipe's calibration statistics live (``calib_data.save_path``), a safetensors
        file: a ``.pth`` / ``.pt`` suffix (the reference's pickles) becomes ``.safetensors``, so a
        file the reference wrote is never read as ours. ``None`` when the recipe names none."""
        if not self.calib_save_path:
            return None
        root, ext = os.path.splitext(self.calib_save_path)
        return root + ".safetensors" if ext.lower() in (".pth", ".pt") else self.calib_save_path

    def keeps_fp(self, layer: str) -> bool:
        return _search(self.remain_fp_regex, layer, "remain_fp_regex")

    @property
    def names_are_hints(self) -> bool:
        """Whether ``remain_fp_regex`` is the families' default name list, which decides only the
        layers the graph cannot place (an explicit regex always applies)."""
        return self.keep_fp_from_graph and self.remain_fp_regex == DIT_KEEP_FP_REGEX

    def layer_bits(self, layer: str) -> tuple[int, int] | None:
        """``(weight_bits, act_bits)`` of ``layer``, or ``None`` when ``mixed_precision`` keeps it
        FP.

        Reference semantics (as the reference configs document them): each list is
        ``[FP regex, regex for n_bits[0], regex for n_bits[1], ...]``, applied in order, later
        entries overriding earlier ones; a layer the FP entry matches stays FP; ``''`` matches no
        layer; a layer no entry matches keeps ``n_bits[i_bitwidth]``.
        """
        bits = []
        for op, spec in (("weight", self.weight), ("act", self.act)):
            regs = getattr(self.mixed_precision, op) if self.mixed_precision else ()
            key = f"mixed_precision.{op}.layer_name_regex"
            if regs and _search(regs[0], layer, f"{key}[0]"):
                return None
            b = spec.bits
            for i, regex in enumerate(regs[1:]):
                if _search(regex, layer, f"{key}[{i + 1}]"):
                    b = spec.n_bits[i]
            bits.append(b)
        return bits[0], bits[1]

    def balance_for(self, layer: str) -> BalanceRule | None:
        """The first balancing rule whose regex matches ``layer`` (``None``: no balancing)."""
        return next((r for r in self.balance if r.matches(layer)), None)

    @property
    def weight_group(self) -> int | None:
        """Weight quantization group along K (``None``: per output channel)."""
        return self.weight.group if isinstance(self.weight.group, int) else None

    def with_(self, **changes) -> Recipe:
        return replace(self, **changes)


def _presets() -> dict[str, Recipe]:
    every = "."  # balancing rules of the presets apply to every quantized layer
    widths = {"w8a8": QuantSpec(n_bits=(8,), sym=True), "w4a8": QuantSpec(n_bits=(4,), sym=False)}
    out = {"fp": Recipe(name="fp", enabled=False)}
    for wa, weight in widths.items():
        # The ablation of the paper (Table 5), weakest first: static per-tensor activations,
        # dynamic per-token, smoothing only, rotation only, and ViDiT-Q (smoothing + rotation).
        variants: dict[str, dict[str, Any]] = {
            "naive": dict(static_act=True),
            "dynamic": {},
            "smooth": dict(balance=(BalanceRule("smooth_quant", every, DEFAULT_ALPHA),)),
            "rotate": dict(balance=(BalanceRule("quarot", every),)),
            "viditq": dict(balance=(BalanceRule("viditq", every, DEFAULT_ALPHA),)),
            # per-layer balancing search: none / smooth / rotate / both and alpha, by output error
            "search": dict(balance_search=BalanceSearch()),
        }
        for v, kw in variants.items():
            out[f"{wa}-{v}"] = Recipe(name=f"{wa}-{v}", weight=weight, **kw)
    # w8a8: data-free per-token W8A8, and ViDiT-Q balancing when calibration is given.
    out["w8a8"] = Recipe(name="w8a8", weight=widths["w8a8"],
                         balance=(BalanceRule("viditq", every, DEFAULT_ALPHA, optional=True),))
    # FP8 (e4m3) W8A8: data-free, as torchao's float8 rowwise; -viditq adds the balancing
    # (smoothing + rotation, smoothing only with calibration).
    out["w8a8-fp8"] = Recipe(name="w8a8-fp8", weight=widths["w8a8"], number_format="fp8_e4m3")
    out["w8a8-fp8-viditq"] = out["w8a8-fp8"].with_(name="w8a8-fp8-viditq",
                                                   balance=(BalanceRule("viditq", every, DEFAULT_ALPHA),))
    out["w4a8"] = out["w4a8-viditq"].with_(name="w4a8")
    # Mixed precision (the paper's W4A8-MP / W4A4-MP): ViDiT-Q balancing, widths searched per
    # layer under the budget. W4A8-MP spends half a bit per weight on the sensitive layers (about
    # one weight in eight at W8); W4A4-MP keeps about a third of the layers at W8A8 and the rest
    # at W4A4 (the paper's appendix), i.e. 16/3 bits on average for weights and activations.
    from viditq_compile.config.budget import Budget

    out["w4a8-mp"] = out["w4a8-viditq"].with_(name="w4a8-mp", budget=Budget(weight_bits=4.5, act_bits=8))
    out["w4a4-mp"] = out["w4a8-viditq"].with_(name="w4a4-mp",
                                              budget=Budget(weight_bits=16 / 3, act_bits=16 / 3))
    return out


PRESETS: dict[str, Recipe] = _presets()

_GRANULARITY_USED = {"weight": ("channel", "per_channel"), "act": ("token", "per_token")}
"""``weight.group`` / ``act.group`` names that say what is done anyway (no note)."""
_REPORTED: set[tuple[str, str, str]] = set()

# ----------------------------------------------------------------------------------------------
# YAML parsing (the reference implementation's format)

_TOP_KEYS = {"model", "remain_fp_regex", "keep_fp_from_graph", "number_format", "weight", "act", "viditq", "attention",
             "fold_balance", "smooth_quant", "quarot", "mixed_precision", "calib_data", "balance"}
_SPEC_KEYS = {"n_bits", "i_bitwidth", "sym", "group"}


def _read_recipe_file(path: str) -> bytes:
    """The bytes of a recipe file, read once; size-capped; every OS error as a ``RecipeError``."""
    return read_capped(path, MAX_YAML_BYTES, "recipe file", RecipeError)


def _search(regex: str, layer: str, key: str) -> bool:
    """Whether ``regex`` (a recipe's user regex; ``''`` matches nothing) is found in ``layer``, through
    the guard of ``io.user_regex`` (compiled once, cached)."""
    if not regex:
        return False
    try:
        return user_search(compile_user_regex(regex, f"recipe key {key!r}"), layer, f"recipe key {key!r}") \
            is not None
    except UserRegexError as e:
        raise RecipeError(str(e)) from None


def _fail(key: str, msg: str) -> RecipeError:
    return RecipeError(f"recipe key {key!r}: {msg}")


def _mapping(data: Any, key: str) -> Mapping:
    if not isinstance(data, Mapping):
        raise _fail(key, f"expected a mapping, got {type(data).__name__} {short_repr(data)}")
    return data


def _check_keys(data: Mapping, allowed: set, prefix: str) -> None:
    for k in data:
        if k not in allowed:
            name = k[:40] if isinstance(k, str) else short_repr(k, 40)
            full = f"{prefix}.{name}" if prefix else name
            raise _fail(full, f"unknown key (known here: {sorted(allowed)})")


def _regex(value: Any, key: str) -> str:
    if value is None:
        return ""
    try:
        compile_user_regex(value, f"recipe key {key!r}")
    except UserRegexError as e:
        raise RecipeError(str(e)) from None
    return value


def _spec(data: Any, key: str) -> QuantSpec:
    data = _mapping(data, key)
    _check_keys(data, _SPEC_KEYS, key)
    if "n_bits" not in data:
        raise _fail(f"{key}.n_bits", "missing")
    raw = data["n_bits"]
    bits = tuple(raw) if isinstance(raw, (list, tuple)) else (raw,)
    if not bits or any(not isinstance(b, int) or isinstance(b, bool) or not 2 <= b <= 16
                       for b in bits):
        raise _fail(f"{key}.n_bits", f"expected an int or a list of ints in [2, 16], got {short_repr(raw)}")
    i = data.get("i_bitwidth", 0 if len(bits) == 1 else None)
    if i is None:
        raise _fail(f"{key}.i_bitwidth", f"required when n_bits is a list ({list(bits)})")
    if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(bits):
        raise _fail(f"{key}.i_bitwidth", f"must index n_bits {list(bits)}, got {short_repr(i)}")
    sym = data.get("sym", True)
    if not isinstance(sym, bool):
        raise _fail(f"{key}.sym", f"expected true/false, got {short_repr(sym)}")
    group = data.get("group")
    if group is not None and not (isinstance(group, str) or
                                  (isinstance(group, int) and not isinstance(group, bool)
                                   and group > 0)):
        raise _fail(f"{key}.group", f"expected a name or a positive int, got {short_repr(group)}")
    return QuantSpec(n_bits=bits, i_bitwidth=i, sym=sym, group=group)


def _balance(data: Any, key: str) -> BalanceRule:
    data = _mapping(data, key)
    allowed = {"layer_name_regex"} | ({"alpha"} if key != "quarot" else set())
    _check_keys(data, allowed, key)
    if "layer_name_regex" not in data:
        raise _fail(f"{key}.layer_name_regex", "missing")
    alpha = data.get("alpha")
    if key != "quarot":
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 <= alpha <= 1:
            raise _fail(f"{key}.alpha", f"expected a number in [0, 1], got {short_repr(alpha)}")
        alpha = float(alpha)
    return BalanceRule(key, _regex(data["layer_name_regex"], f"{key}.layer_name_regex"), alpha)


def _balance_search(data: Any) -> BalanceSearch:
    """``balance: search``, or ``balance: {search: {kinds: [...], alphas: [...], max_rows: N,
    seeds: [...]}}``."""
    if data == "search":
        return BalanceSearch()
    if not isinstance(data, Mapping):
        raise _fail("balance", f"expected 'search' or a mapping {{search: {{kinds, alphas, max_rows, seeds}}}}, "
                               f"got {short_repr(data)}")
    _check_keys(data, {"search"}, "balance")
    if "search" not in data:
        raise _fail("balance.search", "missing")
    sub = {} if data["search"] is None else _mapping(data["search"], "balance.search")
    _check_keys(sub, {"kinds", "alphas", "max_rows", "seeds"}, "balance.search")
    given: dict[str, Any] = {}
    for k in ("kinds", "alphas", "seeds"):
        if k in sub:
            if not isinstance(sub[k], list):
                raise _fail(f"balance.search.{k}", f"expected a list, got {short_repr(sub[k])}")
            given[k] = tuple(sub[k])
    if "max_rows" in sub:
        given["max_rows"] = sub["max_rows"]
    try:
        return BalanceSearch(**given)
    except RecipeError as e:
        raise _fail("balance.search", str(e)) from None


def _mixed(data: Any, bits: dict[str, tuple[int, ...]]) -> MixedPrecisionRule:
    data = _mapping(data, "mixed_precision")
    _check_keys(data, {"weight", "act"}, "mixed_precision")
    lists: dict[str, tuple[str, ...]] = {}
    for op in ("weight", "act"):
        key = f"mixed_precision.{op}"
        if op not in data:
            lists[op] = ()
            continue
        sub = _mapping(data[op], key)
        _check_keys(sub, {"layer_name_regex"}, key)
        regs = sub.get("layer_name_regex")
        if not isinstance(regs, list):
            raise _fail(f"{key}.layer_name_regex", f"expected a list [FP regex, regex per n_bits "
                                                   f"...], got {short_repr(regs)}")
        if len(regs) > len(bits[op]) + 1:
            raise _fail(f"{key}.layer_name_regex", f"{len(regs)} entries but {op}.n_bits has "
                                                   f"{len(bits[op])} widths (+1 for FP)")
        lists[op] = tuple(_regex(r, f"{key}.layer_name_regex[{i}]") for i, r in enumerate(regs))
    return MixedPrecisionRule(weight=lists["weight"], act=lists["act"])


def _attention(data: Any) -> AttentionRule:
    data = _mapping(data, "attention")
    _check_keys(data, {*ATTENTION_KEYS, "block", "search_min_db"}, "attention")
    return AttentionRule(**{ATTENTION_KEYS[k]: v for k, v in data.items() if k in ATTENTION_KEYS},
                         **{k: data[k] for k in ("block", "search_min_db") if k in data})


def _parse(data: Any, name: str, source: str) -> Recipe:
    if data is None:
        raise RecipeError(f"recipe {source} is empty")
    data = _mapping(data, "<top level>")
    _check_keys(data, _TOP_KEYS, "")
    for required in ("weight", "act"):
        if required not in data:
            raise _fail(required, "missing (every recipe states its weight and act widths)")
    weight, act = _spec(data["weight"], "weight"), _spec(data["act"], "act")
    balance = tuple(_balance(data[k], k) for k in ("viditq", "smooth_quant", "quarot") if k in data)
    searched = _balance_search(data["balance"]) if "balance" in data else None
    if searched is not None and balance:
        raise _fail("balance", f"'search' chooses the balancing of every layer; remove "
                               f"{[r.key for r in balance]} or the balance key")
    mixed = None
    if "mixed_precision" in data:
        mixed = _mixed(data["mixed_precision"], {"weight": weight.n_bits, "act": act.n_bits})
    calib = None
    if "calib_data" in data:
        c = _mapping(data["calib_data"], "calib_data")
        _check_keys(c, {"save_path"}, "calib_data")
        calib = c.get("save_path")
        if calib is not None and not isinstance(calib, str):
            raise _fail("calib_data.save_path", f"expected a path string, got {short_repr(calib)}")
    tags: tuple[tuple[str, str], ...] = ()
    if "model" in data:
        m = _mapping(data["model"], "model")
        tags = tuple((str(k), str(v)) for k, v in m.items())
    remain = (_regex(data["remain_fp_regex"], "remain_fp_regex") if "remain_fp_regex" in data
              else DIT_KEEP_FP_REGEX)
    from_graph = data.get("keep_fp_from_graph", True)
    if not isinstance(from_graph, bool):
        raise _fail("keep_fp_from_graph", f"expected true/false, got {short_repr(from_graph)}")
    fold = data.get("fold_balance", False)
    if not isinstance(fold, bool):
        raise _fail("fold_balance", f"expected true/false, got {short_repr(fold)}")
    number_format = data.get("number_format", "int")
    if number_format not in FORMATS:
        raise _fail("number_format", f"expected one of {list(FORMATS)}, got {short_repr(number_format)}")
    return Recipe(name=name, weight=weight, act=act, remain_fp_regex=remain, keep_fp_from_graph=from_graph,
                  balance=balance, mixed_precision=mixed, calib_save_path=calib, model_tags=tags, source=source,
                  number_format=number_format, balance_search=searched, fold_balance=fold,
                  attention=_attention(data["attention"]) if "attention" in data else AttentionRule())


__all__ = ["Recipe", "QuantSpec", "BalanceRule", "BalanceSearch", "DEFAULT_ALPHA", "MixedPrecisionRule", "RecipeError",
           "PRESETS",
           "DIT_KEEP_FP_REGEX", "AttentionRule"]
