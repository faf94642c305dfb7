"""Triton GEMM for e4m3 ``viditq.qlinear`` / ``qlinear_fused``: e4m3 activations x e4m3 weights on
the tensor cores with an fp32 accumulator, then the shared fused epilogue.

``fp8_qlinear_triton`` computes what ``numerics.quant.qlinear(..., gemm=fp8.fp8_gemm_fast)`` then
``numerics.quant.epilogue`` compute (the reference, side by side):

- ``acc = xq @ wq.T`` with ``tl.dot(e4m3, e4m3, acc)`` into an fp32 accumulator (Hopper: warpgroup
  ``wgmma`` with e4m3 operands, which Triton software-pipelines, unlike the int8 dot);
- ``acc * x_scale * w_scale`` left to right in fp32 (``quant.dequantize_epilogue``'s order);
- then ``kernels.epilogue.store_epilogue``: bias, optional ``"gelu_tanh"`` / ``"silu"``, ``* gate``
  (``[N]``, ``[B, 1, N]`` for ``[B, T, N]``, or per row), ``+ residual``, one cast to ``out_dtype``.

Tolerances (what ``tests/kernels/test_fp8_gemm.py`` checks):

- the GEMM: every e4m3 x e4m3 product is exact in fp32, the sum is not; against the exact sum
  (``fp8.fp8_gemm_ref``) an fp32 summation in any order is within ``fp8.gemm_bound`` (K·2^-24 of
  ``|xq| @ |wq|.T``). Under ``TRITON_INTERPRET=1`` Triton decodes e4m3 exactly to fp16 and calls
  ``np.matmul(..., dtype=float32)`` per K block: an fp32 sum, within the bound (measured well inside
  it). On sm_90 Triton's default for fp8 dots (``max_num_imprecise_acc = 2^30``) leaves the whole K
  sum in the tensor core's accumulator, whose precision is below fp32 (the accumulation keeps about
  14 bits, DeepSeek-V3 §3.3.2); ``PROMOTE_EVERY`` below bounds it instead: every ``PROMOTE_EVERY``
  K elements the wgmma partial sum is added to the fp32 accumulator on the CUDA cores. Not measured
  on a GPU yet (none was lent); the GPU tests assert ``gemm_bound`` x 2^10 for the reduced-precision
  partial sums of ``PROMOTE_EVERY`` products;
- the scales and the epilogue: the reference's fp32 operations in its order (bit-exact given the
  same accumulator; ptxas may contract ``acc * xs * ws + bias`` into an FMA on the GPU).

Limits (``config/capabilities.py``, ``fp8_unsupported_reason``): K a multiple of 16 (16-byte rows:
vectorized loads), and on CUDA compute capability 8.9 or more (e4m3 tensor cores: Ada's
``mma.sync`` e4m3, Hopper's wgmma); ``supports`` says whether a shape and device are taken, and
``ops/cuda.py`` runs the reference otherwise (logged, in ``fallbacks()``). CUDA tensors, or CPU
tensors with ``TRITON_INTERPRET=1`` set before this module is imported (one fixed block config
then; slow, for tests only).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from viditq_compile.config.capabilities import FP8_MIN_ARCH  # noqa: F401  (re-exported: the route's rule)
from viditq_compile.config.capabilities import fp8_unsupported_reason as _unsupported_reason
from viditq_compile.kernels.epilogue import store_epilogue, tail_operands
from viditq_compile.kernels.launch import device_guard
from viditq_compile.numerics import fp8
from viditq_compile.numerics import quant as numerics
from viditq_compile.numerics.contracts import check_qlinear_fused_args

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE = os.environ.get("VIDITQ_AUTOTUNE", "1") != "0"
"""``VIDITQ_AUTOTUNE=0`` (read at import): launch the first config the pruning keeps instead of
autotuning over all of them."""

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), for DiT shapes: M (tokens x batch) 256..65536,
# K/N in {1152, 3072, 4608, 12288, 15360} (multiples of 128). BLOCK_K = 128 bytes as the int8
# kernel's 64..128 (e4m3 wgmma steps K by 32). Large M wants the 128 x 256 / 256 x 128 tiles, small
# M the 64-wide ones so that enough programs fill the SMs.
FP8_CONFIGS = [
    (128, 256, 128, 8, 3),
    (256, 128, 128, 8, 3),
    (128, 128, 128, 8, 4),
    (128, 128, 128, 4, 4),
    (64, 256, 128, 4, 4),
    (128, 64, 128, 4, 4),
    (64, 128, 128, 4, 4),
    (64, 64, 128, 4, 4),
]
GROUP_M = 8
"""Grouped program order: ``GROUP_M`` row blocks sweep the N blocks together, so the weight tiles
they share stay in L2."""
PROMOTE_EVERY = 128
"""``max_num_imprecise_acc`` of the dot on sm_90: the tensor core's partial sum is added to the
fp32 accumulator every 128 K elements (one ``BLOCK_K`` step; ignored below sm_90)."""

# Under TRITON_INTERPRET=1 (CPU tests): one config (the e4m3 dot needs K >= 32).
INTERPRET_CONFIG = (32, 64, 32)

ACTIVATIONS = numerics.EPILOGUE_ACTIVATIONS
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # fp64: exact cast of fp32
SHARED_BYTES = {90: 227 * 1024, 89: 99 * 1024}
"""Shared memory one block may use (H100 and Ada opt-in maxima): the pruning drops the configs whose
operand ring (``num_stages x (BLOCK_M + BLOCK_N) x BLOCK_K`` bytes) does not fit."""


@triton.jit
def _fp8_qlinear_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, g_ptr, r_ptr, out_ptr,
    M, N, K, M_BUCKET, ROWS_PER_GATE,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_b, stride_gm, stride_gn,
    stride_rm, stride_rn, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_GATE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PROMOTE_EVERY: tl.constexpr,
):
    """out[M, N] = epilogue(x[M, K] e4m3 @ w[N, K].T * xs[:, None] * ws[None, :]), one
    [BLOCK_M, BLOCK_N] tile per program, programs in grouped order (``GROUP_M`` row blocks a group).

    x: [M, K] e4m3 (float8_e4m3fn); xs: [M] fp32; w: [N, K] e4m3; ws: [N] fp32; b: [N] float at
    stride stride_b (HAS_BIAS); g: float, row m reads gate row m // ROWS_PER_GATE (HAS_GATE);
    r: [M, N] float (HAS_RESIDUAL); out: [M, N] fp32/bf16/fp16/fp64. The K tail is masked.
    Row offsets are int64 (M·K, N·K, M·N may pass 2^31); offsets inside a row stay int32.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows_m = offs_m.to(tl.int64)
    rows_n = offs_n.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + rows_n[None, :] * stride_wn  # [BK, BN], K-major

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k < K - k0)[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=(offs_k < K - k0)[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, max_num_imprecise_acc=PROMOTE_EVERY)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    xs = tl.load(xs_ptr + offs_m, mask=mask_m, other=0.0)
    ws = tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0)
    out = acc * xs[:, None] * ws[None, :]
    store_epilogue(out, offs_m, offs_n, mask_m, mask_n, b_ptr, g_ptr, r_ptr, out_ptr, ROWS_PER_GATE, stride_b,
                   stride_gm, stride_gn, stride_rm, stride_rn, stride_om, stride_on, HAS_BIAS, ACTIVATION, HAS_GATE,
                   HAS_RESIDUAL)


def tile_fits(block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int, arch: int,
              promote_every: int | None = PROMOTE_EVERY) -> bool:
    """Whether a config compiles without spilling in the K loop and fits shared memory on
    ``sm_<arch>`` (``tests/kernels/test_fp8_gemm.py``'s AOT tests compile every kept config):

    - fp32 accumulators of ``BLOCK_M * BLOCK_N / (32 * num_warps)`` registers a thread each: one,
      and on sm_90 with ``promote_every`` a second (the wgmma partial sum beside the fp32 total);
      together at most 128 registers beside Hopper's wgmma loop (operands in shared memory), 64
      beside Ada's ``mma.sync`` (operand fragments in registers too), the int8 kernel's budget
      (``int_gemm.tile_fits``). Measured (triton 3.9, sm_90, promoting every 128): 128 x 256 and
      64 x 256 spill 60 / 76 local accesses in the K loop, 128 x 128 with 4 warps 2;
    - the operand ring, ``num_stages * (BLOCK_M + BLOCK_N) * BLOCK_K`` bytes, within ``SHARED_BYTES``;
    - ``BLOCK_K`` a multiple of ``promote_every`` (the dot's ``max_num_imprecise_acc`` <= its K)."""
    promoting = promote_every is not None and arch >= 90
    acc = block_m * block_n // (32 * num_warps) * (2 if promoting else 1)
    if acc > (128 if arch >= 90 else 64) or (promote_every is not None and block_k % promote_every):
        return False
    return num_stages * (block_m + block_n) * block_k <= SHARED_BYTES[90 if arch >= 90 else 89]


def prune_configs(configs, arch: int) -> list:
    """The configs autotuning compiles on ``sm_<arch>`` (``tile_fits``)."""
    return [cfg for cfg in configs
            if tile_fits(cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"], cfg.num_warps,
                         cfg.num_stages, arch)]


def autotune_configs() -> list:
    """``FP8_CONFIGS`` as ``triton.Config`` objects (before pruning)."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in FP8_CONFIGS]


def device_arch(device: torch.device) -> int:
    """``10 * major + minor`` of a CUDA device's compute capability; 90 for any other device (the
    interpreter, meta tensors: the configs of the Hopper target)."""
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _prune_configs(configs, nargs, **kwargs):
    """``early_config_prune`` of the autotuner: ``prune_configs`` for the device holding x; only the
    first with ``VIDITQ_AUTOTUNE=0``."""
    x = nargs.get("x_ptr") if nargs else None
    arch = device_arch(x.device) if isinstance(x, Tensor) else 90
    pruned = prune_configs(configs, arch)
    return pruned if AUTOTUNE else pruned[:1]


if INTERPRET:
    _launch_kernel = None
else:
    _launch_kernel = triton.autotune(
        configs=autotune_configs(), key=["M_BUCKET", "N", "K"],
        prune_configs_by={"early_config_prune": _prune_configs},
    )(_fp8_qlinear_kernel)


def supports(m: int, n: int, k: int, device: torch.device | str = "cuda") -> bool:
    """Whether ``fp8_qlinear_triton`` takes this shape on ``device`` (a CUDA device needs compute
    capability 8.9+; the CPU only under the interpreter). Else route to the reference."""
    device = torch.device(device)
    if device.type == "cuda":
        return _unsupported_reason(m, n, k, device_arch(device)) is None
    return INTERPRET and _unsupported_reason(m, n, k, None) is None


def fp8_qlinear_triton(xq: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None,
                       out_dtype: torch.dtype, activation: str = "none", gate: Tensor | None = None,
                       residual: Tensor | None = None) -> Tensor:
    """``numerics.qlinear(..., gemm=fp8.fp8_gemm_fast)`` then ``numerics.epilogue`` as one launch.

    xq: [..., K] float8_e4m3fn; x_scale: [..., 1] fp32 (per token); w_q: [N, K] float8_e4m3fn;
    w_scale: [N] fp32 (per output channel); bias: [N] float or None; out_dtype: fp32/bf16/fp16 (or
    fp64, the fp32 result widened); activation: "none", "gelu_tanh" or "silu" (after the bias);
    gate: float broadcast along the rows ([N], [B, 1, N] for [B, T, N], or the output's shape) or
    None; residual: float of the output's shape or None. Returns [..., N] of out_dtype.
    Raises ``ValueError`` for operands ``viditq.qlinear_fused`` refuses (``numerics.contracts``),
    for integer operands, and for shapes or devices this kernel does not take (``supports``).
    """
    check_qlinear_fused_args(xq, x_scale, w_q, w_scale, None, bias, 8, 0, out_dtype, activation, gate, residual,
                             False)
    if not fp8.is_fp8(w_q):
        raise ValueError(f"fp8_qlinear_triton: w_q must be float8_e4m3fn, got {w_q.dtype} "
                         "(integer weights: kernels.int_gemm.qlinear_triton)")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"fp8_qlinear_triton: out_dtype={out_dtype} (supported: {OUT_DTYPES})")
    operands = [xq, x_scale, w_q, w_scale] + [t for t in (bias, gate, residual) if t is not None]
    if any(t.device != xq.device for t in operands):
        raise ValueError("fp8_qlinear_triton: all operands must be on one device, got "
                         f"{sorted({str(t.device) for t in operands})}")
    if xq.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"fp8_qlinear_triton: needs CUDA tensors (got {xq.device}) or TRITON_INTERPRET=1 "
                         "set before importing viditq_compile.kernels.fp8_gemm")
    n, k = w_q.shape
    lead = xq.shape[:-1]
    x2 = xq.reshape(-1, k)
    m = x2.shape[0]
    reason = _unsupported_reason(m, n, k, device_arch(xq.device) if xq.device.type == "cuda" else None)
    if reason is not None:
        raise ValueError(f"fp8_qlinear_triton: unsupported: {reason}; use numerics.qlinear")
    out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m == 0:
        return out.reshape(*lead, n)
    args, flags = kernel_args(x2, x_scale, w_q, w_scale, bias, gate, residual, out, activation, lead)
    with device_guard(xq.device):
        if INTERPRET:
            bm, bn, bk = INTERPRET_CONFIG
            grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
            flags["PROMOTE_EVERY"] = min(PROMOTE_EVERY, bk)  # the dot checks it is <= its K
            _fp8_qlinear_kernel[grid](*args, **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        else:
            def tuned_grid(meta):
                return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
            _launch_kernel[tuned_grid](*args, **flags)  # type: ignore[index]  # set when not INTERPRET
    return out.reshape(*lead, n)


def kernel_args(x2: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None,
                gate: Tensor | None, residual: Tensor | None, out: Tensor, activation: str,
                lead: tuple[int, ...]) -> tuple[tuple, dict]:
    """The positional arguments and constexpr flags of ``_fp8_qlinear_kernel`` (block sizes aside)
    for checked operands: x2 the activations flattened to 2-D, out the [M, N] output, ``lead`` the
    activations' leading dims. Shared by the launch and by ``kernels.aot`` (which compiles the same
    specialization for a GPU target, from meta tensors)."""
    m, n = out.shape
    k = w_q.shape[1]
    xs = x_scale.reshape(-1).contiguous()
    ws = w_scale.contiguous()
    b, stride_b, rows_per_gate, g2, stride_g, r2, stride_r = tail_operands(bias, gate, residual, out, lead, ws)
    args = (x2, xs, w_q, ws, b, g2, r2, out, m, n, k, triton.next_power_of_2(max(min(m, 65536), 16)),
            rows_per_gate, x2.stride(0), x2.stride(1), w_q.stride(0), w_q.stride(1), stride_b, *stride_g,
            *stride_r, out.stride(0), out.stride(1))
    flags = dict(HAS_BIAS=bias is not None, ACTIVATION=activation, HAS_GATE=gate is not None,
                 HAS_RESIDUAL=residual is not None, GROUP_M=GROUP_M, PROMOTE_EVERY=PROMOTE_EVERY)
    return args, flags
