"""How Inductor compiles the ``viditq`` ops.

On CPU, ``viditq.w8a8_linear`` is decomposed into the reference numerics around an extern
``torch._int_mm``: Inductor then fuses the per-token quantization into the kernel that produces
the activation (LayerNorm, adaLN modulate, GELU) and the dequantizing epilogue into the kernel
that consumes the output (bias, gate, residual add), which is faster than calling the opaque op
(measured in ``../shared/TORCH-NOTES.md`` §4: 63 ms vs 78-99 ms on an int8 MLP).
Other devices keep the opaque op.

``install()`` registers this with Inductor's process-global decomposition table. It is
idempotent and called by the ``viditq`` backend and by ``QuantizedModel.compile``; importing
the package does not call it.
"""

from __future__ import annotations

import logging

import torch

from .. import numerics

log = logging.getLogger(__name__)
_installed = False


_warned_devices: set[str] = set()


def _w8a8_linear_cpu(x, w_q, w_scale, w_zero, bias, act_bits=8):
    if x.device.type != "cpu":
        if x.device.type not in _warned_devices:
            _warned_devices.add(x.device.type)
            log.warning("viditq.w8a8_linear on %s: no fused Inductor lowering for this device "
                        "yet; the op runs as an opaque call (quantize, torch._int_mm, epilogue)",
                        x.device.type)
        return NotImplemented
    return numerics.w8a8_linear(x, w_q, w_scale, w_zero, bias, act_bits,
                                gemm=numerics.int_gemm_fast)


def install() -> None:
    """Register the Inductor decompositions of the ``viditq`` ops (idempotent)."""
    global _installed
    if _installed:
        return
    from torch._inductor.decomposition import register_decomposition

    from . import ops  # noqa: F401  (the ops must exist before they get a decomposition)

    register_decomposition(torch.ops.viditq.w8a8_linear.default)(_w8a8_linear_cpu)
    _installed = True
    log.debug("viditq Inductor decompositions installed")
