"""The sensitivity pass: the damage each layer (or group of layers) does to the model output when
it alone is quantized at each candidate width, per timestep range.

It runs the user's calibration calls on the eager model. The floating-point output of every call
is computed once and kept; then each allocation unit is perturbed in turn, at each candidate
width, with every other layer in floating point, and its damage is scored with the metric of its
role (``viditq_compile.mixed_precision.metrics``). A perturbed layer computes exactly what the quantized program
will: the balancing of the plan (``balance.layer_transforms``) and ``numerics.quantize_act`` +
``numerics.qlinear`` (the reference the ``viditq`` ops are tested against), through a forward
hook that replaces the layer's output.

Assumes: ``plan`` quantizes the layers of ``units`` (the select pass ran with the base recipe);
``transforms`` holds the balancing of every balanced one. Rewrites no graph; returns data.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor, nn

from viditq_compile.config.plan import LayerPlan, Plan
from viditq_compile.graph.modules import is_linear_layer
from viditq_compile.methods import int_weight
from viditq_compile.methods.balance import EagerFolded, LayerTransform
from viditq_compile.mixed_precision.metrics import MetricError, MetricFn, metric_name, score
from viditq_compile.numerics import quant as numerics

log = logging.getLogger(__name__)

WEIGHT_SYM = int_weight.SEARCH_WEIGHT_SYM

Call = tuple[tuple, dict]


@dataclass
class Sensitivity:
    """What the pass measured. ``damage[unit]``: [n_ranges, n_candidates] float64, the mean damage
    over the calls of each range (``nan`` for a range without calls is never produced: ranges come
    from the calls)."""

    units: dict[str, tuple[str, ...]]
    roles: dict[str, str]
    metrics: dict[str, str]
    candidates: tuple[tuple[int, int], ...]
    bounds: tuple[float, ...]
    damage: dict[str, np.ndarray]
    calls_per_range: tuple[int, ...]
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def first_tensor(out) -> Tensor:
    """The denoiser output of a model call: a tensor, the first element of a tuple/list, the
    ``sample`` of a diffusers output, or the first tensor value of a mapping."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    sample = getattr(out, "sample", None)
    if isinstance(sample, Tensor):
        return sample
    if isinstance(out, Mapping):
        for v in out.values():
            if isinstance(v, Tensor):
                return v
    raise TypeError(f"cannot find the output tensor of the model call (got {type(out).__name__})")


def install_hooks(model: nn.Module, widths: Mapping[str, tuple[int, int]], plan: Plan,
                  transforms: Mapping[str, LayerTransform], stats=None) -> list:
    """Quantize the layers of ``widths`` (layer -> (weight_bits, act_bits)) in ``model`` with each
    method's eager reference (``methods.int_weight.EagerLinear``: the plan's format at those widths,
    the search's weight symmetry per width); returns the hook handles (remove them to restore the
    floating-point model). ``stats`` gives the static activation scales of ``act_static`` layers."""
    modules = dict(model.named_modules())
    handles = []
    try:
        for name, (w, a) in widths.items():
            mod = modules.get(name)
            if mod is None or not is_linear_layer(mod):
                raise ValueError(f"layer {name!r} is not a linear layer of the model (an nn.Linear "
                                 f"or a 1x1 convolution)")
            hook = int_weight.EagerLinear(mod, at_widths(plan.layers[name], w, a), transforms.get(name),
                                          _static_scale(plan.layers[name], stats, a))
            handles.append(mod.register_forward_hook(hook))
        # the other layer of a folded pair computes with its transform (methods.balance.EagerFolded)
        # even in floating point: its partner's weights are only right beside it
        for name in widths:
            partner = transforms[name].partner if name in transforms else None
            if partner is not None and partner not in widths:
                mod = modules[partner]
                handles.append(mod.register_forward_hook(EagerFolded(mod, partner, transforms[partner])))
    except BaseException:
        for h in handles:
            h.remove()
        raise
    return handles


def at_widths(lp: LayerPlan, weight_bits: int, act_bits: int) -> LayerPlan:
    """``lp`` (one timestep range) at a candidate's widths, with the search's weight symmetry."""
    return replace(lp, weight_bits=weight_bits, act_bits=act_bits, weight_sym=WEIGHT_SYM[weight_bits],
                   timestep_widths=None)


def _static_scale(lp: LayerPlan, stats, act_bits: int):
    if not lp.act_static:
        return None
    if stats is None or lp.name not in stats:
        raise ValueError(f"layer {lp.name!r} has a static activation scale: its calibration statistics are needed")
    return numerics.static_scale(stats.absmax(lp.name), act_bits)


def run_calls(model: nn.Module, calls: Sequence[Call], batches: Sequence[Batch] | None = None) -> list[Tensor]:
    """The output tensor of every call; with ``batches`` (``merge_calls``), each batch runs as one
    model call and its output is split back into the calls'."""
    with torch.no_grad():
        if batches is None:
            return [first_tensor(model(*args, **kwargs)).detach() for args, kwargs in calls]
        out: list[Tensor] = [None] * len(calls)  # type: ignore[list-item]
        for b in batches:
            y = first_tensor(model(*b.call[0], **b.call[1])).detach()
            parts = y.split(b.rows) if len(b.members) > 1 else (y,)
            for i, part in zip(b.members, parts):
                out[i] = part
        return out


@dataclass
class Batch:
    """Calls merged along the batch dimension: ``call`` runs ``members``, ``rows`` each."""

    call: Call
    members: list[int]
    rows: list[int]


def merge_calls(calls: Sequence[Call], max_rows: int = 16) -> list[Batch]:
    """Merge consecutive calls into batches of at most ``max_rows`` rows where they differ only
    along the batch dimension (dim 0 of every tensor whose dim 0 is the call's batch size; every
    other value equal). Per-token activation quantization and per-channel weights treat every row
    alone, so a merged call scores each call exactly as running it alone would, in a fraction of
    the time (the weights are read once per batch). Calls that cannot merge run alone."""
    batches: list[Batch] = []
    for i, call in enumerate(calls):
        b = _batch_size(call)
        last = batches[-1] if batches else None
        if (last is not None and b is not None and sum(last.rows) + b <= max_rows
                and _mergeable(calls[last.members[0]], call, _batch_size(calls[last.members[0]]), b)):
            last.members.append(i)
            last.rows.append(b)
        else:
            batches.append(Batch(call, [i], [b if b is not None else 0]))
    for bt in batches:
        if len(bt.members) > 1:
            bt.call = _concat([calls[i] for i in bt.members], bt.rows)
    return batches


def _leaves(call: Call) -> list:
    args, kwargs = call
    return list(args) + [kwargs[k] for k in sorted(kwargs)]


def _batch_size(call: Call) -> int | None:
    for v in _leaves(call):
        if isinstance(v, Tensor) and v.dim() >= 1:
            return int(v.shape[0])
    return None


def _mergeable(a: Call, b: Call, ba: int | None, bb: int | None) -> bool:
    if ba is None or bb is None or len(a[0]) != len(b[0]) or sorted(a[1]) != sorted(b[1]):
        return False
    for x, y in zip(_leaves(a), _leaves(b)):
        if isinstance(x, Tensor) != isinstance(y, Tensor):
            return False
        if isinstance(x, Tensor):
            if x.dtype != y.dtype or x.device != y.device or x.dim() != y.dim():
                return False
            batched = x.dim() >= 1 and x.shape[0] == ba and y.shape[0] == bb
            if batched and x.shape[1:] == y.shape[1:]:
                continue
            if x.shape != y.shape or not torch.equal(x, y):
                return False
        elif not _same(x, y):
            return False
    return True


def _same(x, y) -> bool:
    try:
        return bool(x == y) if not isinstance(x, Mapping) else (
            x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x))
    except (RuntimeError, TypeError, ValueError):
        return False


def _concat(calls: Sequence[Call], rows: Sequence[int]) -> Call:
    def cat(values):
        v0 = values[0]
        if isinstance(v0, Tensor) and v0.dim() >= 1 and v0.shape[0] == rows[0] and all(
                v.shape[0] == r for v, r in zip(values, rows)):
            return torch.cat(values)
        return v0

    args = tuple(cat([c[0][i] for c in calls]) for i in range(len(calls[0][0])))
    kwargs = {k: cat([c[1][k] for c in calls]) for k in calls[0][1]}
    return args, kwargs


class _Progress:
    def __init__(self, enabled: bool | None, total: int):
        self.enabled = sys.stderr.isatty() if enabled is None else bool(enabled)
        self.total, self.done, self.t0 = total, 0, time.perf_counter()

    def step(self, what: str) -> None:
        self.done += 1
        if self.enabled:
            sys.stderr.write(f"\rsensitivity  {self.done}/{self.total}  {what[:60]:<60}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.done:
            sys.stderr.write(f"\n{time.perf_counter() - self.t0:.1f} s\n")


def measure_sensitivity(model: nn.Module, calls: Sequence[Call], call_ranges: Sequence[int],
                        plan: Plan, transforms: Mapping[str, LayerTransform],
                        units: Mapping[str, Sequence[str]], roles: Mapping[str, str],
                        metrics: Mapping[str, MetricFn], candidates: Sequence[tuple[int, int]],
                        bounds: Sequence[float], *, progress: bool | None = None,
                        reference: Sequence[Tensor] | None = None,
                        batches: Sequence[Batch] | None = None, stats=None) -> Sensitivity:
    """Damage of every unit at every candidate width, per timestep range.

    calls: the model calls ``(args, kwargs)``; call_ranges: the timestep range of each call;
    units: unit name -> its layers (perturbed together); roles: unit -> role; metrics: role ->
    metric; candidates: ``(weight_bits, act_bits)``; reference: the floating-point outputs of the
    calls if already computed; batches: run the calls merged (``merge_calls``). A metric that
    cannot score an output (``MetricError``, e.g. the cfg metric on an odd batch) is an error
    naming the unit and the call.
    """
    t0 = time.perf_counter()
    n_ranges = len(bounds) + 1
    if len(call_ranges) != len(calls):
        raise ValueError(f"{len(calls)} calls but {len(call_ranges)} range indices")
    per_range = [sum(1 for r in call_ranges if r == i) for i in range(n_ranges)]
    empty = [i for i, n in enumerate(per_range) if n == 0]
    if empty:
        raise ValueError(f"timestep range(s) {empty} hold no calibration call (calls per range: "
                         f"{per_range})")
    ref = list(reference) if reference is not None else run_calls(model, calls)
    bar = _Progress(progress, len(units) * len(candidates))
    damage = {}
    try:
        for unit, layers in units.items():
            metric = metrics[roles[unit]]
            table = np.zeros((n_ranges, len(candidates)), dtype=np.float64)
            for j, (w, a) in enumerate(candidates):
                handles = install_hooks(model, {name: (w, a) for name in layers}, plan, transforms, stats)
                try:
                    outs = run_calls(model, calls, batches)
                finally:
                    for h in handles:
                        h.remove()
                for i, (r, q, call) in enumerate(zip(ref, outs, calls)):
                    try:
                        table[call_ranges[i], j] += score(metric, r, q, call)
                    except MetricError as e:
                        raise MetricError(f"unit {unit!r} (role {roles[unit]}), call {i}: {e}") from None
                bar.step(f"{unit} W{w}A{a}")
            damage[unit] = table / np.asarray(per_range, dtype=np.float64)[:, None]
    finally:
        bar.close()
    return Sensitivity(units={u: tuple(v) for u, v in units.items()}, roles=dict(roles),
                       metrics={u: metric_name(metrics[roles[u]]) for u in units},
                       candidates=tuple((w, a) for w, a in candidates), bounds=tuple(bounds),
                       damage=damage, calls_per_range=tuple(per_range),
                       seconds=time.perf_counter() - t0)


def timestep_bounds(timesteps: Sequence[float], n_ranges: int) -> tuple[float, ...]:
    """Interior boundaries splitting the distinct timesteps of the calls into ``n_ranges`` ranges
    of (nearly) equal numbers of distinct timesteps, each boundary halfway between neighbours, so
    a sampler with other timesteps in between falls into the nearest range."""
    if isinstance(n_ranges, bool) or not isinstance(n_ranges, int) or n_ranges < 1:
        raise ValueError(f"timestep_ranges must be an int >= 1, got {n_ranges!r}")
    if n_ranges == 1:
        return ()
    known = sorted({float(t) for t in timesteps if not math.isnan(t)})
    if any(math.isnan(t) for t in timesteps):
        raise ValueError("timestep_ranges > 1 needs the timestep of every calibration call, but "
                         "the model has no timestep / timesteps / t argument (or a call passed "
                         "none)")
    if len(known) < n_ranges:
        raise ValueError(f"timestep_ranges={n_ranges} but the calibration calls have only "
                         f"{len(known)} distinct timestep(s): {known}")
    edges = [round(i * len(known) / n_ranges) for i in range(1, n_ranges)]
    return tuple((known[e - 1] + known[e]) / 2 for e in edges)


def group_units(layers: Sequence[str], group: str | Callable[[str], str]) -> dict[str, list[str]]:
    """Allocation units: ``"layer"`` (each layer alone), ``"module"`` (each layer with the others
    of its nearest enclosing module that holds two or more of ``layers``: the q/k/v/out
    projections of one attention, the two linears of one MLP), or a callable layer -> unit name."""
    if group == "layer":
        key: Callable[[str], str] = str
    elif group == "module":
        def key(name: str) -> str:
            parts = name.split(".")
            for i in range(len(parts) - 1, 0, -1):
                prefix = ".".join(parts[:i]) + "."
                if sum(n.startswith(prefix) for n in layers) >= 2:
                    return prefix[:-1]
            return name
    elif callable(group):
        key = group
    else:
        raise ValueError(f"group must be 'layer', 'module' or a callable, got {group!r}")
    units: dict[str, list[str]] = {}
    for name in layers:
        u = key(name)
        if not isinstance(u, str) or not u:
            raise ValueError(f"group({name!r}) returned {u!r}; a unit name must be a non-empty str")
        units.setdefault(u, []).append(name)
    return units


def measure_attention_sensitivity(model: nn.Module, calls: Sequence[Call], call_ranges: Sequence[int],
                                  attentions: Mapping[str, str], metrics: Mapping[str, MetricFn],
                                  n_ranges: int = 1, *, block: int = 1,
                                  reference: Sequence[Tensor] | None = None,
                                  batches: Sequence[Batch] | None = None) -> dict[str, np.ndarray]:
    """Damage of each attention run alone as int8 quantized attention (SageAttention-style,
    ``methods.attention.EagerAttention``: what ``passes.quantize_attention`` builds), every other
    op in floating point: attention (module path) -> [n_ranges] float64, the mean damage over the
    calls of each timestep range, scored by the metric of its role (``attentions``: path -> role,
    ``metrics``: role -> metric; ``block``: tokens per scale, as ``AttentionRule.block``). An
    attention that made no SDPA call the reference takes (a masked cross-attention, a path that
    runs none) raises ``ValueError`` naming it. The search does not allocate attentions yet: this is
    their score, for a recipe's ``attention`` rule."""
    from viditq_compile.methods.attention import EagerAttention
    from viditq_compile.ops.schema import ATTENTION

    if len(call_ranges) != len(calls):
        raise ValueError(f"{len(calls)} calls but {len(call_ranges)} range indices")
    per_range = np.bincount(np.asarray(call_ranges, dtype=np.int64), minlength=n_ranges).astype(np.float64)
    if len(per_range) != n_ranges or (per_range == 0).any():
        raise ValueError(f"call_ranges must cover each of the {n_ranges} range(s), got {list(call_ranges)}")
    ref = list(reference) if reference is not None else run_calls(model, calls)
    out = {}
    for name, role in attentions.items():
        with EagerAttention(model, [name], block=block) as eager:
            outs = run_calls(model, calls, batches)
        if eager.calls == 0 or eager.refused:
            raise ValueError(f"attention {name!r}: {eager.calls} SDPA call(s) quantized, {eager.refused} "
                             f"refused (mask, causal, dropout or GQA); it cannot run as {ATTENTION.display}")
        table = np.zeros(n_ranges, dtype=np.float64)
        for i, (r, q, call) in enumerate(zip(ref, outs, calls)):
            try:
                table[call_ranges[i]] += score(metrics[role], r, q, call)
            except MetricError as e:
                raise MetricError(f"attention {name!r} (role {role}), call {i}: {e}") from None
        out[name] = table / per_range
    return out
