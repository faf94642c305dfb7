"""The CPU int8 GEMM through oneDNN: ``numerics.int8_mm`` on AMX / VNNI with prepacked weights.

Why not ``torch._int_mm``, which the CPU route called before: on an AMX Xeon (PixArt-Σ block
shapes, 2 threads) oneDNN's ``qlinear_pointwise`` on a prepacked weight runs the [2048, 1152] x
[1152, 3456] int8 GEMM in 3.3 ms (fp32 out) / 2.9 ms (bf16 out) where ``torch._int_mm`` takes
6.1 ms, and it can write a 16-bit product with the weight scale applied: the MLP's [2048, 4608]
int32 product (37.7 MB) is over glibc's 32 MiB mmap ceiling, so every call page-faults a fresh
mapping in (17.9 ms for that GEMM against 4.0 ms for the bf16 product). Measured with
``benchmarks/test_bench_block.py`` and the GEMM timings in ``benchmarks/RESULTS.md``.

A 4-bit weight (packed two per byte, symmetric or with a zero point per channel) is unpacked and
its zero point subtracted once, into the int8 weight whose GEMM is the reference's ``acc - rowsum *
zero`` exactly (``numerics.zero_adjusted_weight``), so W4A8 runs the W8A8 GEMM instead of unpacking
the weight on every call; the cache then holds one int8 byte per weight, twice the int4 bytes.

The prepacked weight is oneDNN's blocked copy of the int8 weight (an opaque ``mkldnn`` tensor that
a graph cannot hold as a constant), so it is kept in a cache keyed by the weight tensor itself: a
weak reference, checked against the tensor's data pointer, shape and version counter on every hit,
so a weight changed in place or freed is never served stale. The cache costs one more copy of each
int8 weight it has seen (``cached_bytes``); ``clear_cache`` drops it.

``available()`` decides once per process: the ops exist, oneDNN is built in, and a small self-test
agrees bit for bit with the reference integer GEMM. Where it is False the op runs
``torch._int_mm`` (``ops.library.int8_mm``), and ``unavailable_reason`` says why. The environment
variable ``VIDITQ_CPU_INT8_GEMM`` chooses by hand: ``onednn`` (the default) or ``int_mm`` (the
``torch._int_mm`` route, e.g. to compare the two); any other value is an error.
"""

from __future__ import annotations

import functools
import os
import threading
import weakref
from collections.abc import Callable

import torch
from torch import Tensor

from viditq_compile.numerics import quant as numerics

__all__ = ["ENV", "ROUTES", "OUT_DTYPES", "available", "unavailable_reason", "int8_mm", "cached_bytes",
           "cached_weights", "clear_cache"]

ENV = "VIDITQ_CPU_INT8_GEMM"
ROUTES = ("onednn", "int_mm")
"""The values ``ENV`` takes (unset: ``onednn``)."""

OUT_DTYPES = (torch.float32, torch.bfloat16)
"""The product dtypes this route writes (oneDNN's int8 matmul also has fp16, which this CPU
family does not accelerate; an fp16 layer takes the fp32 product)."""

_lock = threading.Lock()
_cache: dict[int, tuple] = {}
"""id(weight) -> (weakref, data_ptr, version, shape, weakref of ``also`` or None, its version, packed)."""
_state: dict[str, str | None] = {}


def _prepack(wq: Tensor) -> Tensor:
    return torch.ops.onednn.qlinear_prepack(wq, None)


@functools.lru_cache(maxsize=256)
def _constants(n: int) -> tuple[Tensor, Tensor]:
    """Zero weight zero points (int64) and unit weight scales (fp32) for N=n: read-only operands,
    made once per width instead of twice per call."""
    return torch.zeros(n, dtype=torch.int64), torch.ones(n, dtype=torch.float32)


def _run(xq: Tensor, packed: Tensor, w_scale: Tensor | None, n: int, out_dtype: torch.dtype) -> Tensor:
    zero, ones = _constants(n)
    # x scale 1 and zero point 0: the int32 accumulator times w_scale, converted once
    return torch.ops.onednn.qlinear_pointwise(xq, 1.0, 0, packed, ones if w_scale is None else w_scale, zero,
                                              None, 1.0, 0, out_dtype, "none", [None], "")


def _self_test() -> str | None:
    route = os.environ.get(ENV, "onednn")
    if route not in ROUTES:
        raise ValueError(f"{ENV}={route!r}: must be one of {ROUTES}")
    if route == "int_mm":
        return f"{ENV}=int_mm"
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():  # the decompositions ask while tracing with fake tensors
        return _run_self_test()


def _run_self_test() -> str | None:
    if not hasattr(torch.ops, "onednn") or not hasattr(torch.ops.onednn, "qlinear_pointwise") \
            or not hasattr(torch.ops.onednn, "qlinear_prepack"):
        return f"torch {torch.__version__} has no torch.ops.onednn.qlinear_pointwise / qlinear_prepack"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (torch.backends.mkldnn.is_available() is False)"
    g = torch.Generator().manual_seed(0)
    xq = torch.randint(-128, 128, (37, 96), generator=g, dtype=torch.int8)
    wq = torch.randint(-127, 128, (40, 96), generator=g, dtype=torch.int8)
    try:
        got = _run(xq, _prepack(wq), None, 40, torch.float32)
    except Exception as e:  # a build without the int8 kernels raises here, not at import
        return f"oneDNN qlinear_pointwise failed on a self-test: {type(e).__name__}: {e}"
    want = numerics.int_gemm_ref(xq, wq).to(torch.float32)
    if not torch.equal(got, want):
        return "oneDNN qlinear_pointwise disagreed with the reference integer GEMM on a self-test"
    return None


def unavailable_reason() -> str | None:
    """None when the oneDNN route runs here; else why not (decided once per process)."""
    with _lock:
        if "reason" not in _state:
            _state["reason"] = _self_test()
        return _state["reason"]


def available() -> bool:
    """True when ``int8_mm`` runs oneDNN in this process (``unavailable_reason`` is None)."""
    return unavailable_reason() is None


def _alive(entry, t: Tensor, also: Tensor | None) -> bool:
    ref, ptr, ver, shape, also_ref, also_ver, _ = entry
    if ref() is not t or ptr != t.data_ptr() or ver != t._version or shape != tuple(t.shape):
        return False
    if also is None:
        return also_ref is None
    return also_ref is not None and also_ref() is also and also_ver == also._version


def _packed(key_tensor: Tensor, prepare: Callable[[], Tensor], also: Tensor | None) -> Tensor:
    key = id(key_tensor)
    with _lock:
        hit = _cache.get(key)
        if hit is not None and _alive(hit, key_tensor, also):
            return hit[-1]
    version, also_version = key_tensor._version, (also._version if also is not None else None)
    packed = _prepack(prepare())

    def _drop(_ref, key=key):
        with _lock:
            entry = _cache.get(key)
            if entry is not None and entry[0] is _ref:
                del _cache[key]

    with _lock:
        _cache[key] = (weakref.ref(key_tensor, _drop), key_tensor.data_ptr(), version, tuple(key_tensor.shape),
                       weakref.ref(also) if also is not None else None, also_version, packed)
    return packed


def int8_mm(xq: Tensor, w_q: Tensor, w_scale: Tensor | None, out_dtype: torch.dtype,
            prepare: Callable[[], Tensor] | None = None, also: Tensor | None = None) -> Tensor:
    """``numerics.int8_mm(xq [M, K] int8, W [N, K] int8, w_scale [N] fp32 or None, out_dtype)``
    through oneDNN, W being ``prepare()`` (default: ``w_q`` itself, int8 [N, K]). The cache keys on
    ``w_q`` (and ``also``, e.g. the zero point ``prepare`` reads): W is prepared and prepacked once
    per weight, again when either changes. The caller checks ``available()`` and the operands
    (CPU, contiguous int8 ``xq``, ``out_dtype`` in ``OUT_DTYPES``); the integer part is exact and
    the float part is the reference's single multiply and cast (``tests/kernels/test_onednn_int8.py``)."""
    packed = _packed(w_q, prepare or (lambda: w_q.contiguous()), also)
    scale = w_scale.to(torch.float32) if w_scale is not None else None
    return _run(xq, packed, scale, w_q.shape[0], out_dtype)


def cached_weights() -> int:
    """How many prepacked weights the cache holds."""
    with _lock:
        return len(_cache)


def cached_bytes() -> int:
    """Bytes of the prepacked weights the cache holds (one int8 byte per weight element)."""
    with _lock:
        return sum(entry[-1].numel() for entry in _cache.values())


def clear_cache() -> None:
    """Drop every prepacked weight (they are rebuilt on the next call that needs them)."""
    with _lock:
        _cache.clear()
