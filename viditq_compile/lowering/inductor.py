"""How Inductor compiles the ``viditq`` ops.

On CPU, ``viditq.w8a8_linear`` is decomposed into the reference numerics around an extern
``torch._int_mm``: Inductor then fuses the per-token quantization into the kernel that produces
the activation (LayerNorm, adaLN modulate, GELU) and the dequantizing epilogue into the kernel
that consumes the output (bias, gate, residual add), which is faster than calling the opaque op
(measured in ``../shared/TORCH-NOTES.md`` §4: 63 ms vs 78-99 ms on an int8 MLP).
``viditq.balance``, ``viditq.quantize_act`` and ``viditq.qlinear`` decompose the same way: the
balancing GEMMs, the quantization and the int4 unpacking become fusible ATen ops, and each
(group's) integer GEMM an extern ``torch._int_mm``. Other devices keep the opaque ops (with
one warning per op and device). ``viditq.qlinear_timestep`` has no decomposition on purpose: it
picks its version from the timestep's value, a data-dependent choice that inside the graph would
need a recompile per range (or ``torch.cond``), so Inductor calls it as one opaque fallback
kernel and one compiled graph serves every sampling step.

``install()`` registers this with Inductor's process-global decomposition table. It is
idempotent and called by the ``viditq`` backend and by ``QuantizedModel.compile``; importing
the package does not call it.
"""

from __future__ import annotations

import logging

import torch

from .. import numerics
from .ops import _balance_impl, _qlinear_impl

log = logging.getLogger(__name__)
_installed = False


_warned_devices: set[tuple[str, str]] = set()


def _on_cpu(op: str, device: torch.device) -> bool:
    """True on CPU; elsewhere warn once per (op, device type) that the opaque op will run."""
    if device.type == "cpu":
        return True
    if (op, device.type) not in _warned_devices:
        _warned_devices.add((op, device.type))
        log.warning("viditq.%s on %s: no fused Inductor lowering for this device yet; the op runs "
                    "as an opaque call", op, device.type)
    return False


def _w8a8_linear_cpu(x, w_q, w_scale, w_zero, bias, act_bits=8):
    if not _on_cpu("w8a8_linear", x.device):
        return NotImplemented
    return numerics.w8a8_linear(x, w_q, w_scale, w_zero, bias, act_bits,
                                gemm=numerics.int_gemm_fast)


def _balance_cpu(x, smooth, rotation):
    if not _on_cpu("balance", x.device):
        return NotImplemented
    return _balance_impl(x, smooth, rotation)


def _quantize_act_cpu(x, smooth, rotation, static_scale, act_bits=8):
    if not _on_cpu("quantize_act", x.device):
        return NotImplemented
    return numerics.quantize_act(x, smooth, rotation, static_scale, act_bits)


def _qlinear_cpu(xq, x_scale, w_q, w_scale, w_zero, bias, weight_bits, group_size, out_dtype):
    if not _on_cpu("qlinear", xq.device):
        return NotImplemented
    return _qlinear_impl(xq, x_scale, w_q, w_scale, w_zero, bias, weight_bits, group_size, out_dtype)


def install() -> None:
    """Register the Inductor decompositions of the ``viditq`` ops (idempotent)."""
    global _installed
    if _installed:
        return
    from torch._inductor import decomposition
    from torch._inductor.decomposition import register_decomposition

    from . import ops  # noqa: F401  (the ops must exist before they get a decomposition)

    viditq = torch.ops.viditq
    register_decomposition(viditq.w8a8_linear.default)(_w8a8_linear_cpu)
    register_decomposition(viditq.balance.default)(_balance_cpu)
    register_decomposition(viditq.quantize_act.default)(_quantize_act_cpu)
    register_decomposition(viditq.qlinear.default)(_qlinear_cpu)
    # Inductor memoizes its table merged with the random-op decompositions on the first compile
    # in the process (functools.cache); drop that copy so a compile that ran before install()
    # does not hide these decompositions from every later one.
    merged = getattr(decomposition, "fast_random_decomps", None)
    if merged is not None and hasattr(merged, "cache_clear"):
        merged.cache_clear()
    _installed = True
    log.debug("viditq Inductor decompositions installed")
