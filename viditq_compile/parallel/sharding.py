"""DTensor sharding rules for the ``viditq`` ops, so a model whose quantized layers hold DTensor
weights (``parallelize_module`` with ``ColwiseParallel`` / ``RowwiseParallel``, diffusers'
``_tp_plan``) runs them without gathering anything that need not be gathered.

``register()`` registers them (``torch.distributed.tensor.experimental.register_sharding``),
once per process; ``import viditq_compile`` never does. Each rule lists the placements under
which the op computed on each shard's local tensors gives the shards of the unsharded result;
DTensor picks the cheapest and redistributes the inputs to it (Replicate -> Shard is a local
slice, no communication). Numerics: ``numerics/parallel.py``.

- replicate: every tensor Replicate (always listed, so any input layout runs, by gathering).
- token: x (and its per-token scales, gates, residuals) sharded along a leading dim, every
  weight tensor Replicate: exact, a per-token scale is token-local. The batch dim of
  ``qlinear_timestep`` shards with its ``[B]`` timestep.
- column: x Replicate, the weight's output channels sharded (w_q, w_scale, w_zero, bias dim 0),
  the output sharded along its last dim: exact.
- row (K split): only where the op's result is a sum over K of terms each shard has:
  ``qlinear`` with xq sharded along K, x_scale Replicate (already the global per-token scale),
  w_q / grouped scales sharded along dim 1, bias ``Partial`` -> output ``Partial`` (sum): exact
  up to the order of the fp32 additions of the all-reduce; ``balance`` without rotation
  (per-channel); ``quantize_act`` with a static per-tensor scale and no rotation. Ops that
  quantize x per token themselves (``w8a8_linear``, dynamic ``quantize_act``) need the whole row
  for the scale: under policy ``"global"`` (the default) DTensor gathers x for them (exact;
  ``w8a8_linear`` then gathers its K-sharded weight too, ``qlinear`` splits it again locally);
  ``register(row_policy="per_shard")`` adds a K-split rule for ``w8a8_linear`` in which each
  shard quantizes its own slice (``numerics.parallel``'s ``"per_shard"`` policy, a different
  quantization). For ``"global"`` codes without the gather, and int32 partial sums, use
  ``parallel.tensor.RowParallelQuantizedLinear``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["register", "registered", "ROW_POLICIES"]

ROW_POLICIES = ("global", "per_shard")
_registered: dict[str, str] = {}


def registered() -> dict[str, str]:
    """Op name -> the row policy its rules were registered with (empty before ``register``)."""
    return dict(_registered)


def _ndim(spec) -> int:
    return len(spec.shape) if spec is not None else 0


def _rep(t) -> Any:
    from torch.distributed.tensor import Replicate

    return None if t is None else Replicate()


def _reps(ts: Sequence) -> list:
    return [_rep(t) for t in ts]


def _shard(t, dim: int) -> Any:
    from torch.distributed.tensor import Shard

    return None if t is None else Shard(dim % _ndim(t))


def _partial(t) -> Any:
    from torch.distributed.tensor import Partial

    return None if t is None else Partial()


def _leading_dims(x) -> range:
    return range(_ndim(x) - 1)


# ---- the rules, one per op: arguments as the op's schema ---------------------------------------
def _w8a8_linear(row_policy: str) -> Callable:
    def rule(x, w_q, w_scale, w_zero, bias, act_bits=8):
        from torch.distributed.tensor import Replicate, Shard

        out: list = [([Replicate()], [Replicate(), Replicate(), Replicate(), _rep(w_zero), _rep(bias), None])]
        for d in _leading_dims(x):
            out.append(([Shard(d)], [Shard(d), Replicate(), Replicate(), _rep(w_zero), _rep(bias), None]))
        last = _ndim(x) - 1
        out.append(([Shard(last)], [Replicate(), Shard(0), Shard(0), _shard(w_zero, 0), _shard(bias, 0), None]))
        if row_policy == "per_shard":
            out.append(([_partial(x)], [Shard(last), Shard(1), Replicate(), _rep(w_zero), _partial(bias), None]))
        return out
    return rule


def _balance(x, smooth, rotation):
    from torch.distributed.tensor import Replicate, Shard

    rot = _reps(rotation)
    out: list = [([Replicate()], [Replicate(), _rep(smooth), *rot])]
    for d in _leading_dims(x):
        out.append(([Shard(d)], [Shard(d), _rep(smooth), *rot]))
    if not rotation:  # per channel: a K split is a split of smooth
        last = _ndim(x) - 1
        out.append(([Shard(last)], [Shard(last), _shard(smooth, 0)]))
    return out


def _quantize_act(x, smooth, rotation, static_scale, act_bits=8):
    from torch.distributed.tensor import Replicate, Shard

    rot = _reps(rotation)
    out: list = [([Replicate(), Replicate()], [Replicate(), _rep(smooth), *rot, _rep(static_scale), None])]
    for d in _leading_dims(x):
        out.append(([Shard(d), Shard(d)], [Shard(d), _rep(smooth), *rot, _rep(static_scale), None]))
    if static_scale is not None and not rotation:  # one global scale: codes are elementwise
        last = _ndim(x) - 1
        out.append(([Shard(last), Replicate()], [Shard(last), _shard(smooth, 0), Replicate(), None]))
    return out


def _quantize_act_fp8(x, smooth, rotation):
    from torch.distributed.tensor import Replicate, Shard

    rot = _reps(rotation)
    out: list = [([Replicate(), Replicate()], [Replicate(), _rep(smooth), *rot])]
    for d in _leading_dims(x):
        out.append(([Shard(d), Shard(d)], [Shard(d), _rep(smooth), *rot]))
    return out


def _attention(q, k, v, scale, block_q=128, block_k=128):
    """Replicate, or q, k, v and the output sharded alike along a batch / head dim (exact: each
    slice is an attention of its own). Not along tokens: the per-block scales and K's mean span them."""
    from torch.distributed.tensor import Replicate, Shard

    out: list = [([Replicate()], [Replicate(), Replicate(), Replicate(), None, None, None])]
    for d in range(_ndim(q) - 2):
        out.append(([Shard(d)], [Shard(d), Shard(d), Shard(d), None, None, None]))
    return out


def _qlinear_rules(xq, x_scale, w_q, w_scale, w_zero, bias, group_size, tail_token, tail_col, tail_rep,
                   allow_row: bool):
    from torch.distributed.tensor import Replicate, Shard

    out: list = [([Replicate()], [Replicate(), Replicate(), Replicate(), Replicate(), _rep(w_zero), _rep(bias),
                            None, None, None, *tail_rep])]
    for d in _leading_dims(xq):
        out.append(([Shard(d)], [Shard(d), Shard(d), Replicate(), Replicate(), _rep(w_zero), _rep(bias),
                                 None, None, None, *tail_token(d)]))
    last = _ndim(xq) - 1
    out.append(([Shard(last)], [Replicate(), Replicate(), Shard(0), Shard(0), _shard(w_zero, 0),
                                _shard(bias, 0), None, None, None, *tail_col]))
    if allow_row:
        scale = Shard(1) if group_size else Replicate()
        zero = None if w_zero is None else scale
        out.append(([_partial(xq)], [Shard(last), Replicate(), Shard(1), scale, zero, _partial(bias),
                                     None, None, None]))
    return out


def _qlinear(xq, x_scale, w_q, w_scale, w_zero, bias, weight_bits, group_size, out_dtype):
    return _qlinear_rules(xq, x_scale, w_q, w_scale, w_zero, bias, group_size, lambda d: [], [], [], True)


def _row_of(t, d: int, out_ndim: int):
    """A gate / residual's placement when the output is sharded along its leading dim ``d``:
    sharded there if it has that dim at full size (it is per row), else Replicate."""
    from torch.distributed.tensor import Replicate, Shard

    if t is None:
        return None
    pad = out_ndim - _ndim(t)
    dim = d - pad
    if dim >= 0 and t.shape[dim] > 1:
        return Shard(dim)
    return Replicate()


def _qlinear_fused(xq, x_scale, w_q, w_scale, w_zero, bias, weight_bits, group_size, out_dtype,
                   activation, gate, residual, packed_act):
    n = _ndim(xq)
    token = lambda d: [None, _row_of(gate, d, n), _row_of(residual, d, n), None]  # noqa: E731
    col = [None, _shard(gate, -1), _shard(residual, -1), None]
    rep = [None, _rep(gate), _rep(residual), None]
    # no row rule: the activation / gate / residual tail needs the summed output
    return _qlinear_rules(xq, x_scale, w_q, w_scale, w_zero, bias, group_size, token, col, rep, False)


def _qlinear_timestep(x, smooth, rotation, timestep, bounds, w_q, w_scale, w_zero, bias, weight_bits,
                      act_bits, group_size, out_dtype):
    from torch.distributed.tensor import Replicate, Shard

    rot = _reps(rotation)
    wz = [_rep(z) for z in w_zero]
    weights = [*_reps(w_q), *_reps(w_scale), *wz]
    out: list = [([Replicate()], [Replicate(), _rep(smooth), *rot, Replicate(), None, *weights, _rep(bias),
                            None, None, None, None])]
    for d in _leading_dims(x):
        t = Shard(0) if d == 0 and _ndim(timestep) == 1 and timestep.shape[0] > 1 else Replicate()
        out.append(([Shard(d)], [Shard(d), _rep(smooth), *rot, t, None, *weights, _rep(bias),
                                 None, None, None, None]))
    col = [*[Shard(0) for _ in w_q], *[Shard(0) for _ in w_scale], *[_shard(z, 0) for z in w_zero]]
    out.append(([Shard(_ndim(x) - 1)], [Replicate(), _rep(smooth), *rot, Replicate(), None, *col,
                                        _shard(bias, 0), None, None, None, None]))
    return out


def _int8_mm(xq, w_q, w_zero, weight_bits, w_scale, out_dtype):
    """The CPU decompositions' GEMM: replicated, token-sharded (rows of xq), or column-sharded (the
    weight, its zero point and scale along N). No K split: a float product with the weight scale
    applied does not sum exactly."""
    from torch.distributed.tensor import Replicate, Shard

    return [([Replicate()], [Replicate(), Replicate(), _rep(w_zero), None, _rep(w_scale), None]),
            ([Shard(0)], [Shard(0), Replicate(), _rep(w_zero), None, _rep(w_scale), None]),
            ([Shard(1)], [Replicate(), Shard(0), _shard(w_zero, 0), None, _shard(w_scale, 0), None])]


def register(row_policy: str = "global") -> dict[str, str]:
    """Register the sharding rules of every ``viditq`` op with DTensor (see the module docstring);
    returns ``registered()``. ``row_policy``: ``"global"`` (ops that quantize per token never
    split K: DTensor gathers x, exact) or ``"per_shard"`` (``w8a8_linear`` may split K, each
    shard quantizing its own slice). Calling it again with the same policy does nothing; with the
    other, ``RuntimeError`` (one policy per process)."""
    if row_policy not in ROW_POLICIES:
        raise ValueError(f"row_policy={row_policy!r} (supported: {ROW_POLICIES})")
    from torch.distributed.tensor.experimental import register_sharding

    import viditq_compile.ops.library  # noqa: F401  # defines the ops
    from viditq_compile.ops import schema

    rules: dict[str, Callable] = {
        schema.W8A8_LINEAR.name: _w8a8_linear(row_policy),
        schema.BALANCE.name: _balance,
        schema.QUANTIZE_ACT.name: _quantize_act,
        schema.QUANTIZE_ACT_FP8.name: _quantize_act_fp8,
        schema.QLINEAR.name: _qlinear,
        schema.QLINEAR_FUSED.name: _qlinear_fused,
        schema.QLINEAR_TIMESTEP.name: _qlinear_timestep,
        schema.ATTENTION.name: _attention,
        schema.INT8_MM.name: _int8_mm,
    }
    missing = sorted(set(schema.BY_NAME) - set(rules))
    if missing:  # a new op must get its rule here, or DTensor refuses it at run time
        raise RuntimeError(f"parallel.sharding has no rule for {missing}")
    if _registered and set(_registered.values()) != {row_policy}:
        # DTensor's C++ dispatch caches the placements it chose per op and input specs, so
        # rules replaced later would not be consulted for inputs it has seen
        raise RuntimeError(f"parallel.sharding: the rules are registered with row_policy="
                           f"{next(iter(_registered.values()))!r} in this process; one policy per process")
    for name, rule in rules.items():
        if name not in _registered:
            register_sharding(schema.BY_NAME[name].overload)(rule)
            _registered[name] = row_policy
    log.info("DTensor sharding rules registered for %d viditq ops (row policy %s)", len(rules), row_policy)
    return registered()
