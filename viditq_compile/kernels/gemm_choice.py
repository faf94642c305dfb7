"""Which integer GEMM runs a W8A8 ``viditq.qlinear`` on CUDA: the project's Triton GEMM with its
fused epilogue (``kernels.int_gemm``), or cuBLAS' ``torch._int_mm`` followed by the epilogue kernel
(``kernels.int_mm_epilogue``), chosen per shape bucket by timing both.

- ``int_mm_unsupported_reason``: the one place the shapes and operands ``torch._int_mm`` takes are
  spelled (int8 x int8 only, per output channel, M > 16, K and N positive multiples of 8: the
  checks of ``_int_mm_out_cuda`` in ATen's ``native/cuda/Blas.cpp``); other layers run the Triton
  GEMM and their route names the reason.
- ``BucketKey``: M rounded up to a power of two (16 .. 65536: the ``M_BUCKET`` the Triton GEMM's
  autotuner keys on, so that both caches agree), K, N, the specialization (``variant_name``:
  zero points, bias, activation, gate, residual, output dtype) and the compute capability.
- ``choose``: on the first call of a bucket on a CUDA device, runs both routes once (Triton
  autotuning, compiles) and then times each over a few repetitions with CUDA events
  (``cuda_event_timer``), keeps the faster and caches it; later calls of the bucket read the cache.
  ``VIDITQ_GEMM_ROUTE`` (read at every call: ``auto``, the default, ``triton`` or ``int_mm``) or
  ``forced(route)`` forces a route; a forced ``int_mm`` that ``torch._int_mm`` cannot take runs the
  Triton GEMM, and says so. Without a CUDA device (the interpreter) an unforced choice is
  ``triton`` with that reason, untimed and uncached; tests inject a ``timer``. An ``int_mm`` route
  that raises a ``RuntimeError`` when timed (a cuBLAS status) leaves the bucket on ``triton``, with
  the error as its reason (logged).
- ``routes()``: the route each bucket took last in this process, with its reason and timings
  (``ops/cuda.routes`` shows it per op).

No Triton is imported here: the rules and the cache are testable anywhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Iterator, Mapping

import torch

log = logging.getLogger(__name__)

ROUTES = ("triton", "int_mm")
"""``triton``: ``int_gemm.qlinear_triton`` (one kernel, epilogue fused); ``int_mm``:
``torch._int_mm`` (cuBLASLt int8 GEMM to an int32 [M, N]) + ``int_mm_epilogue`` (one more kernel)."""

ENV = "VIDITQ_GEMM_ROUTE"
"""``auto`` (or unset): time both routes per bucket; ``triton`` / ``int_mm``: force one."""

INT_MM_MIN_M = 17
"""``torch._int_mm`` on CUDA needs ``self.size(0) > 16``."""

INT_MM_MULTIPLE = 8
"""... and ``self.size(1)`` (K) and ``mat2.size(1)`` (N) positive multiples of 8."""

M_BUCKET_MIN, M_BUCKET_MAX = 16, 65536

TIMING_REPS = 5
"""Timed repetitions per route on a bucket's first call (after one untimed warm-up call)."""


def int_mm_unsupported_reason(m: int, n: int, k: int, weight_bits: int, group_size: int,
                              packed_act: bool = False, fp8: bool = False) -> str | None:
    """Why ``torch._int_mm`` (then the epilogue kernel) cannot compute this ``viditq.qlinear``, or
    None when it can: int8 activations (not packed int4) x int8 weights per output channel (no
    groups, no e4m3), and the shape rules of ATen's ``_int_mm_out_cuda``: M > 16, K and N positive
    multiples of 8. Raises ``ValueError`` for a negative dimension."""
    if min(m, n, k) < 0:
        raise ValueError(f"int_mm_unsupported_reason: negative shape M={m}, N={n}, K={k}")
    if fp8:
        return "e4m3 operands: torch._int_mm takes int8 x int8 only"
    if weight_bits != 8:
        return f"W{weight_bits} weights: torch._int_mm takes int8 x int8 only"
    if packed_act:
        return "packed 4-bit activations: torch._int_mm takes int8 x int8 only"
    if group_size:
        return f"weight groups of {group_size}: torch._int_mm has one scale per output channel"
    if m < INT_MM_MIN_M:
        return f"M={m}: torch._int_mm needs M > {INT_MM_MIN_M - 1}"
    for name, v in (("K", k), ("N", n)):
        if v < 1 or v % INT_MM_MULTIPLE:
            return f"{name}={v}: torch._int_mm needs {name} a positive multiple of {INT_MM_MULTIPLE}"
    return None


def m_bucket(m: int) -> int:
    """M rounded up to a power of two, clamped to [16, 65536] (the Triton GEMM's ``M_BUCKET``)."""
    if m < 0:
        raise ValueError(f"m_bucket: M={m} is negative")
    m = min(max(m, M_BUCKET_MIN), M_BUCKET_MAX)
    return 1 << (m - 1).bit_length()


def variant_name(zero: bool, bias: bool, activation: str, gate: bool, residual: bool,
                 out_dtype: torch.dtype) -> str:
    """The epilogue specialization of a W8A8 call, e.g. ``w8a8-sym+bias+gelu_tanh->bfloat16``."""
    tail = [t for t, on in (("bias", bias), (activation, activation != "none"), ("gate", gate),
                            ("res", residual)) if on]
    dtype = str(out_dtype).removeprefix("torch.")
    return f"w8a8-{'asym' if zero else 'sym'}" + ("+" + "+".join(tail) if tail else "") + f"->{dtype}"


def device_capability(device: torch.device) -> int:
    """``10 * major + minor`` of a CUDA device; 0 for any other device (the interpreter)."""
    if device.type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


@dataclasses.dataclass(frozen=True)
class BucketKey:
    """What one cached choice covers."""

    m_bucket: int
    k: int
    n: int
    variant: str
    capability: int

    @classmethod
    def of(cls, m: int, n: int, k: int, variant: str, capability: int) -> BucketKey:
        if n < 1 or k < 1:
            raise ValueError(f"BucketKey: N={n}, K={k} must be positive")
        return cls(m_bucket(m), k, n, variant, capability)

    def row(self) -> tuple:
        return (self.m_bucket, self.k, self.n, self.variant, self.capability)


@dataclasses.dataclass(frozen=True)
class Choice:
    """A route and why: ``reason`` says what decided (timings, a force, a refusal); ``times``
    holds the median seconds per route when it was timed."""

    route: str
    reason: str
    times: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):
        if self.route not in ROUTES:
            raise ValueError(f"Choice: route={self.route!r} (one of {ROUTES})")

    def describe(self) -> str:
        return f"{self.route}: {self.reason}"


Timer = Callable[[Callable[[], object]], float]
"""``timer(fn) -> seconds per call`` (median); ``fn`` has been called once already."""


def cuda_event_timer(fn: Callable[[], object], reps: int = TIMING_REPS) -> float:
    """Median seconds of ``reps`` calls of ``fn``, each between two CUDA events of the current stream."""
    if reps < 1:
        raise ValueError(f"cuda_event_timer: reps={reps} must be >= 1")
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


_TIMED: dict[BucketKey, Choice] = {}   # auto choices, by bucket
_ROUTES: dict[BucketKey, Choice] = {}  # the last route each bucket took (forced ones included)
_FORCED: list[str] = []                # forced(...) stack


def forced_route() -> str | None:
    """The forced route: the innermost ``forced(...)``, else ``VIDITQ_GEMM_ROUTE`` (None for
    ``auto`` or unset). Raises ``ValueError`` naming a bad value."""
    if _FORCED:
        return _FORCED[-1]
    raw = os.environ.get(ENV, "").strip().lower()
    if raw in ("", "auto"):
        return None
    if raw not in ROUTES:
        raise ValueError(f"{ENV}={raw!r}: expected auto, {' or '.join(ROUTES)}")
    return raw


@contextlib.contextmanager
def forced(route: str | None) -> Iterator[None]:
    """Within the block, every choice is ``route`` (None: timed, whatever ``VIDITQ_GEMM_ROUTE``
    says)."""
    if route is not None and route not in ROUTES:
        raise ValueError(f"forced: route={route!r} (one of {ROUTES} or None)")
    _FORCED.append(route)  # type: ignore[arg-type]  # None pops back to timing below
    try:
        yield
    finally:
        _FORCED.pop()


def choose(key: BucketKey, run: Mapping[str, Callable[[], object]], refusal: str | None,
           timer: Timer | None = None, cuda: bool = True) -> Choice:
    """The route for ``key``. ``run``: one callable per route in ``ROUTES`` computing this call
    (timed on a bucket's first call); ``refusal``: ``int_mm_unsupported_reason`` of the call
    (then ``triton``, untimed); ``timer``: how to time (default ``cuda_event_timer``); ``cuda``:
    whether the operands are on a CUDA device (else nothing is timed unless a timer is given)."""
    if set(run) != set(ROUTES):
        raise ValueError(f"choose: run has routes {sorted(run)}, expected {sorted(ROUTES)}")
    force = forced_route()
    if refusal is not None:
        why = f"{ENV}=int_mm forced, but {refusal}" if force == "int_mm" else refusal
        return _record(key, Choice("triton", why))
    if force is not None:
        return _record(key, Choice(force, "forced" + ("" if _FORCED else f" by {ENV}")))
    cached = _TIMED.get(key)
    if cached is not None:
        return _record(key, cached)
    if timer is None and not cuda:
        return _record(key, Choice("triton", "not a CUDA device: not timed"))
    if timer is None and torch.cuda.is_current_stream_capturing():
        return _record(key, Choice("triton", "capturing a CUDA graph: not timed, not cached"))
    time_fn = timer or cuda_event_timer
    times = []
    for route in ROUTES:
        try:
            run[route]()  # warm-up: Triton autotuning and compiles, cuBLASLt's heuristics
            times.append((route, float(time_fn(run[route]))))
        except RuntimeError as exc:  # a cuBLAS / launch error: the other route, said and cached
            if route == "triton":
                raise
            choice = Choice("triton", f"the int_mm route failed when timed ({type(exc).__name__}: {exc})",
                            tuple(times))
            log.warning("GEMM route for M<=%d K=%d N=%d %s sm_%d: %s", *key.row(), choice.describe())
            _TIMED[key] = choice
            return _record(key, choice)
    best = min(times, key=lambda rt: rt[1])[0]
    shown = ", ".join(f"{r} {t * 1e6:.1f} us" for r, t in times)
    choice = Choice(best, f"timed ({shown})", tuple(times))
    _TIMED[key] = choice
    log.info("GEMM route for M<=%d K=%d N=%d %s sm_%d: %s", *key.row(), choice.describe())
    return _record(key, choice)


def _record(key: BucketKey, choice: Choice) -> Choice:
    if _ROUTES.get(key) != choice:
        _ROUTES[key] = choice
        log.debug("GEMM route for M<=%d K=%d N=%d %s sm_%d: %s", *key.row(), choice.describe())
    return choice


def routes() -> dict[BucketKey, Choice]:
    """The route each bucket took last in this process."""
    return dict(_ROUTES)


def clear() -> None:
    """Forget every timed choice and route (tests; a new device configuration)."""
    _TIMED.clear()
    _ROUTES.clear()
