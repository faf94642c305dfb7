"""Ahead-of-time compilation of the Triton kernels for a GPU target, on a machine without a GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` runs the whole pipeline
(TTIR, TTGIR, LLVM, PTX, and ptxas to a cubin: ptxas, cuobjdump and nvdisasm ship in the triton
wheel), so what a GPU would build can be inspected in CI. ``compile_qlinear`` / ``compile_quantize``
build one binary from the same arguments a launch passes (``int_gemm.kernel_args``; the quantize
wrappers' own launch, captured on meta tensors; ``compile_rowsum`` the zero points' row-sum
kernel), specialized as Triton's launcher specializes them
(ints equal to 1 become constants, multiples of 16 and 16-byte-aligned pointers get divisibility
hints), and ``inspect`` reads the cubin:

- ``regs``: registers per thread (cuobjdump's ``REG``; the hardware cap is 255);
- ``stack``: bytes of local memory per thread (``STACK``: what spilled registers live in);
- ``shared``: bytes of shared memory per block (Triton's dynamic allocation, ``metadata.shared``);
- ``mma``: the tensor-core instruction the dots became in SASS: ``"wgmma"`` (Hopper's warpgroup
  ``HGMMA`` / ``IGMMA`` / ``QGMMA``), ``"mma"`` (``HMMA`` / ``IMMA``, sm_80's ``mma.sync``; ``QMMA``,
  sm_89's e4m3 one), or
  ``None`` (no dot, or not on tensor cores);
- ``spills`` / ``loop_spills``: local loads and stores (``LDL`` / ``STL``) in the whole kernel and
  inside the outermost loop that holds an MMA instruction (the K loop, or the group loop around
  it for grouped weights): a spill there is paid every K step;
- ``loop_instructions``: SASS instructions of the innermost loop that holds an MMA (one K step);
- ``loop_sts`` / ``loop_lds``: shared-memory stores (``STS``) and loads (``LDS``, ``LDSM``) in that
  loop: a tile computed in registers (unpacked int4) and stored for an MMA that reads shared
  memory, and fragments loaded back (sm_80's ``mma.sync`` operands; wgmma reads shared directly).
  Asynchronous copies (``LDGSTS``, TMA) are neither.

Nothing here runs a kernel. Used by ``tests/kernels/test_aot_compile.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any
from unittest import mock

import torch

MAX_REGS = 255
"""Registers per thread the hardware allows (every NVIDIA GPU since sm_35)."""

SHARED_LIMIT = {90: 227 * 1024, 89: 99 * 1024, 80: 163 * 1024}
"""Shared memory one block may use, per compute capability (H100 / Ada / A100 opt-in maximum)."""

DIT_SHAPE = (8192, 4608, 1152)
"""(M, N, K) the sweep specializes on: PixArt-Σ's MLP up projection over 2 x 4096 tokens. The
binary depends on the shape only through the launcher's divisibility hints, the same for every DiT
width (all multiples of 16)."""

_MMA_WGMMA = re.compile(r"\b[HIQB]GMMA\.")
_MMA_SYNC = re.compile(r"\b[HIQ]MMA\.")  # QMMA: sm_89's e4m3 mma.sync
_LOCAL = re.compile(r"\b(LDL|STL)\b")
_SHARED_STORE = re.compile(r"\bSTS\b")
_SHARED_LOAD = re.compile(r"\b(LDS|LDSM)\b")
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*?`\((\.L_x_\d+)\)")


@dataclasses.dataclass(frozen=True)
class QlinearVariant:
    """One specialization of ``_qlinear_kernel`` the library launches (its constexpr flags)."""

    weight_bits: int = 8
    packed_act: bool = False      # W4A4: activations packed two per byte
    group: int = 0                # 0: per output channel
    zero: bool = False            # asymmetric weights (zero points)
    bias: bool = True
    activation: str = "none"      # "none", "gelu_tanh", "silu"
    gate: bool = False
    residual: bool = False
    out_dtype: torch.dtype = torch.bfloat16

    def configs(self, arch: int) -> list:
        """The pruned autotune configs of this variant on ``sm_<arch>`` (``qlinear_configs``)."""
        return qlinear_configs(self.group, arch, self.zero, self.split, self.packed_act)

    @property
    def split(self) -> bool:
        """Whether the weights are in the split int4 layout (``int_gemm.split_int4``)."""
        from viditq_compile.config.capabilities import int4_split_applies

        return int4_split_applies(self.weight_bits, self.group)

    @property
    def name(self) -> str:
        parts = [f"w{self.weight_bits}a{4 if self.packed_act else 8}", f"g{self.group}" if self.group else "ch"]
        parts += ["asym" if self.zero else "sym"]
        tail = [t for t, on in (("bias", self.bias), (self.activation, self.activation != "none"),
                                ("gate", self.gate), ("res", self.residual)) if on]
        out = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[self.out_dtype]
        return "-".join(parts) + ("+" + "+".join(tail) if tail else "") + f"->{out}"


@dataclasses.dataclass(frozen=True)
class Binary:
    """What one compiled kernel is (see the module docstring for each figure)."""

    kernel: str
    variant: str
    config: str
    arch: int
    regs: int
    stack: int
    shared: int
    mma: str | None
    spills: int
    loop_spills: int
    loop_instructions: int
    loop_sts: int = 0
    loop_lds: int = 0

    def row(self) -> dict:
        return dataclasses.asdict(self)


class CompileError(RuntimeError):
    """Triton or ptxas refused the kernel (the message is the compiler's)."""


def unavailable_reason() -> str | None:
    """Why this machine cannot compile for CUDA targets (no triton, no CUDA backend, no ptxas),
    or None."""
    try:
        import triton  # noqa: F401
        from triton.backends import backends
    except Exception as exc:  # ImportError or a broken install
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    if "nvidia" not in backends:
        return "the installed triton has no CUDA (nvidia) backend"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1: the kernels are interpreted functions, not compilable"
    try:
        _tool("ptxas")
        _tool("cuobjdump")
        _tool("nvdisasm")
    except FileNotFoundError as exc:
        return str(exc)
    if not hasattr(_jit_function(), "_pack_args"):
        return f"triton {triton.__version__}: no JITFunction._pack_args (the launcher's specialization)"
    return None


def _jit_function():
    from triton.runtime.jit import JITFunction

    return JITFunction


@functools.cache
def _tool(name: str) -> str:
    from triton.backends import nvidia

    path = os.path.join(os.path.dirname(nvidia.__file__), "bin", name)
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"{name} not found in the triton wheel ({path})")
    return path


def _compile(fn, args: tuple, kwargs: dict, arch: int):
    """``fn`` compiled for ``sm_<arch>`` with the specialization a launch with these arguments gets."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    src = triton.compiler.ASTSource(fn, signature, constexprs, attrs)
    try:
        return triton.compile(src, target=target, options=options.__dict__)
    except Exception as exc:  # triton.CompilationError, ptxas errors (RuntimeError), MLIR pass failures
        root: BaseException = exc  # a CompilationError wraps, per inlined call, the one that says why
        while (root.__cause__ or root.__context__) is not None:
            root = root.__cause__ or root.__context__  # type: ignore[assignment]
        text = str(root).strip().splitlines()
        raise CompileError(f"{type(root).__name__}: {text[-1] if text else ''}") from exc


def inspect(compiled, kernel: str, variant: str, config: str, arch: int) -> Binary:
    """The figures of one compiled kernel, from its cubin (cuobjdump, nvdisasm)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True)
        sass = subprocess.run([_tool("nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout
    usage = re.search(r"REG:(\d+)\s+STACK:(\d+)", res.stdout)
    if usage is None:
        raise CompileError(f"cuobjdump -res-usage printed no REG/STACK line:\n{res.stdout}")
    stats = sass_stats(sass)
    return Binary(kernel=kernel, variant=variant, config=config, arch=arch, regs=int(usage[1]),
                  stack=int(usage[2]), shared=int(compiled.metadata.shared), **stats)


def sass_stats(sass: str) -> dict:
    """``mma``, ``spills``, ``loop_spills``, ``loop_instructions``, ``loop_sts`` and ``loop_lds`` of a SASS listing
    (``nvdisasm -c``). A loop is the address range from a branch's target back up to the branch
    (ptxas lays loops out in order, the back edge last)."""
    instrs: list[tuple[int, str]] = []
    labels: dict[str, int] = {}
    pending: list[str] = []
    for line in sass.splitlines():
        label = _LABEL.match(line.strip())
        if label:
            pending.append(label[1])
            continue
        m = _INSTR.search(line)
        if m:
            addr = int(m[1], 16)
            instrs.append((addr, m[2]))
            for name in pending:
                labels[name] = addr
            pending = []
    loops = []
    for addr, text in instrs:
        b = _BRANCH.search(text)
        if b and b[1] in labels and labels[b[1]] <= addr:
            loops.append((labels[b[1]], addr))
    wg = [a for a, t in instrs if _MMA_WGMMA.search(t)]
    sync = [a for a, t in instrs if _MMA_SYNC.search(t)]
    mma_addrs = wg or sync
    around = [(lo, hi) for lo, hi in loops if any(lo <= a <= hi for a in mma_addrs)]

    def count(lo: int, hi: int, pattern: re.Pattern) -> int:
        return sum(1 for a, t in instrs if lo <= a <= hi and pattern.search(t))

    outer = max(around, key=lambda r: r[1] - r[0]) if around else None
    inner = min(around, key=lambda r: r[1] - r[0]) if around else None
    return {"mma": "wgmma" if wg else "mma" if sync else None,
            "spills": sum(1 for _, t in instrs if _LOCAL.search(t)),
            "loop_spills": count(*outer, _LOCAL) if outer else 0,
            "loop_instructions": sum(1 for a, _ in instrs if inner[0] <= a <= inner[1]) if inner else 0,
            "loop_sts": count(*inner, _SHARED_STORE) if inner else 0,
            "loop_lds": count(*inner, _SHARED_LOAD) if inner else 0}


# ----------------------------------------------------------------------------- qlinear


def config_name(cfg) -> str:
    kw = cfg.kwargs
    return f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}-w{cfg.num_warps}-s{cfg.num_stages}"


def qlinear_configs(group: int, arch: int, zero: bool = False, split: bool = False, packed_act: bool = False) -> list:
    """The autotune configs ``_qlinear_kernel`` runs with for this group (and zero points, and int4 weights in the
    split layout) on ``sm_<arch>``, after the library's pruning (``int_gemm.prune_configs``): what autotuning would
    compile."""
    import triton

    from viditq_compile.kernels import int_gemm

    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
               for bm, bn, bk, w, s in int_gemm.QLINEAR_CONFIGS]
    return int_gemm.prune_configs(configs, group, arch, zero, split, packed_act)


def qlinear_meta_args(v: QlinearVariant, shape: tuple[int, int, int] = DIT_SHAPE) -> tuple[tuple, dict]:
    """``_qlinear_kernel``'s arguments for a launch of variant ``v`` at ``(M, N, K)``: meta tensors
    in the layouts ``qlinear_triton`` passes (PixArt-Σ's ``[2, M/2, ...]`` with a ``[2, 1, N]``
    gate)."""
    from viditq_compile.config.capabilities import INT4_SPLIT_CHUNK
    from viditq_compile.kernels import int_gemm

    m, n, k = shape
    lead = (2, m // 2)
    xq = torch.empty(m, k // 2 if v.packed_act else k, dtype=torch.uint8 if v.packed_act else torch.int8, device="meta")
    kw = -(-k // INT4_SPLIT_CHUNK) * INT4_SPLIT_CHUNK // 2 if v.split else k // 2 if v.weight_bits == 4 else k
    wq = torch.empty(n, kw, dtype=torch.uint8 if v.weight_bits == 4 else torch.int8, device="meta")
    sshape = (n, k // v.group) if v.group else (n,)
    ws = torch.empty(sshape, dtype=torch.float32, device="meta")
    wz = torch.empty(sshape, dtype=torch.int32, device="meta") if v.zero else None
    bias = torch.empty(n, dtype=torch.bfloat16, device="meta") if v.bias else None
    gate = torch.empty(2, 1, n, dtype=torch.bfloat16, device="meta") if v.gate else None
    residual = torch.empty(*lead, n, dtype=torch.bfloat16, device="meta") if v.residual else None
    out = torch.empty(m, n, dtype=v.out_dtype, device="meta")
    rowsum = torch.empty(m, k // v.group if v.group else 1, dtype=torch.int32, device="meta") if v.zero else None
    return int_gemm.kernel_args(xq, torch.empty(m, 1, device="meta"), wq, ws, wz, bias, gate, residual, out,
                                v.weight_bits, v.group, v.activation, v.packed_act, lead, rowsum)


def compile_qlinear(v: QlinearVariant, cfg, arch: int, shape: tuple[int, int, int] = DIT_SHAPE) -> Binary:
    """Variant ``v`` of ``_qlinear_kernel`` with autotune config ``cfg`` (a ``triton.Config``),
    compiled for ``sm_<arch>`` and inspected. Raises ``CompileError`` when it does not build."""
    return inspect(build_qlinear(v, cfg, arch, shape), "_qlinear_kernel", v.name, config_name(cfg), arch)


def build_qlinear(v: QlinearVariant, cfg, arch: int, shape: tuple[int, int, int] = DIT_SHAPE):
    """The ``triton.compiler.CompiledKernel`` of ``compile_qlinear`` (``.asm``: ttir, ttgir, llir,
    ptx, cubin)."""
    from viditq_compile.kernels import int_gemm

    args, flags = qlinear_meta_args(v, shape)
    kwargs = dict(flags, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return _compile(int_gemm._qlinear_kernel, args, kwargs, arch)


def compile_rowsum(packed: bool, arch: int, shape: tuple[int, int, int] = DIT_SHAPE, seg: int = 0) -> Binary:
    """``int_gemm._rowsum_kernel`` (the zero points' activation row sums, ``activation_rowsums``) as
    launched for ``(M, N, K)`` activations (``packed``: two int4 per byte) over ``seg``-wide K segments
    (0: the whole row), compiled for ``sm_<arch>`` and inspected."""
    from viditq_compile.kernels import int_gemm

    m, _, k = shape
    seg = seg or k
    x2 = torch.empty(m, k // 2 if packed else k, dtype=torch.uint8 if packed else torch.int8, device="meta")
    out = torch.empty(m, k // seg, dtype=torch.int32, device="meta")
    args = (x2, out, seg, x2.stride(0), x2.stride(1), out.stride(0))
    kwargs = dict(ACT_PACKED=packed, **int_gemm.rowsum_launch_config(seg, packed))
    return inspect(_compile(int_gemm._rowsum_kernel, args, kwargs, arch), "_rowsum_kernel",
                   f"K{k}-seg{seg}" + ("-packed" if packed else ""), f"w{kwargs['num_warps']}", arch)


# ----------------------------------------------------------------------------- quantize_act


class _Capture:
    """Stands in for a ``@triton.jit`` function: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, fn):
        self.fn = fn
        self.calls: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


@contextlib.contextmanager
def _captured(module, name: str) -> Iterator[_Capture]:
    capture = _Capture(getattr(module, name))
    with mock.patch.object(module, name, capture):
        yield capture


@dataclasses.dataclass(frozen=True)
class QuantizeVariant:
    """One launch of ``quantize_act_triton``: K, x's dtype, smoothing, rotation (``kron_factors``
    of K, which ``rotation_in_kernel`` may take into the kernel), static scale, bits, row sums, packing."""

    k: int = 1152
    dtype: torch.dtype = torch.bfloat16
    smooth: bool = False
    rotate: bool = False
    static: bool = False
    act_bits: int = 8
    rowsum: bool = False
    pack: bool = False

    @property
    def name(self) -> str:
        dt = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[self.dtype]
        flags = [f for f, on in (("smooth", self.smooth), ("rot", self.rotate), ("static", self.static),
                                 ("rowsum", self.rowsum), ("pack", self.pack)) if on]
        return f"K{self.k}-{dt}-a{self.act_bits}" + ("+" + "+".join(flags) if flags else "")


def compile_quantize(v: QuantizeVariant, arch: int, m: int = 8192) -> Binary:
    """The kernel ``quantize_act_triton`` launches for variant ``v`` (the row kernel, or the
    rotating one when ``rotation_in_kernel`` takes the factors), compiled for ``sm_<arch>``."""
    from viditq_compile.kernels import quantize_act as qa
    from viditq_compile.numerics.hadamard import kron_factors

    x = torch.empty(m, v.k, dtype=v.dtype, device="meta")
    smooth = torch.empty(v.k, dtype=torch.float32, device="meta") if v.smooth else None
    rotation = [torch.empty(f.shape, dtype=torch.float32, device="meta") for f in kron_factors(v.k)] if v.rotate else []
    static = torch.empty((), dtype=torch.float32, device="meta") if v.static else None
    rotated = bool(rotation) and not v.pack and qa.rotation_in_kernel(x, rotation, static)
    name = "_quantize_rotated_row_kernel" if rotated else "_quantize_rows_kernel"
    with _captured(qa, name) as capture:
        qa.quantize_act_triton(x, smooth, rotation, static, v.act_bits, with_rowsum=v.rowsum, pack=v.pack)
    (args, kwargs), = capture.calls
    return inspect(_compile(capture.fn, args, kwargs, arch), name, v.name, f"w{kwargs.get('num_warps', 4)}", arch)



# ----------------------------------------------------------------------------- the sweep

_BASES = [QlinearVariant(weight_bits=wb, packed_act=pa, group=g, zero=z)
          for wb in (8, 4) for pa in (False, True) for g in (0, 128) for z in (False, True)]
_EPILOGUES: list[dict[str, Any]] = [
    dict(activation="gelu_tanh"), dict(activation="silu"), dict(gate=True, residual=True),
    dict(activation="gelu_tanh", gate=True, residual=True)]

QLINEAR_VARIANTS: list[QlinearVariant] = (
    _BASES
    + [QlinearVariant(weight_bits=4, group=g, zero=True) for g in (32, 64, 96)]
    + [dataclasses.replace(base, **epi) for epi in _EPILOGUES
       for base in (QlinearVariant(), QlinearVariant(weight_bits=4, group=128, zero=True))]
    + [QlinearVariant(out_dtype=torch.float32), QlinearVariant(out_dtype=torch.float16), QlinearVariant(bias=False)]
)
"""Every specialization of ``_qlinear_kernel`` the library launches, up to the epilogue combinations:
int8 / int4 weights x int8 / packed int4 activations x per channel / g128 x symmetric / zero points
(bias, bf16 out), the other group sizes ``supports`` takes, each fused epilogue (activation, gate +
residual, both) on W8A8 and W4A8 g128, and the other output dtypes. Group sizes ``supports`` refuses
are in ``REFUSED_GROUPS``."""

REFUSED_GROUPS = (16, 48, 80)
"""Group sizes that are odd multiples of 16: ``supports`` refuses them (the pruned BLOCK_K would be
16 and int8 ``tl.dot`` needs K >= 32); the AOT tests check that they indeed do not compile."""

QUANTIZE_VARIANTS: list[QuantizeVariant] = (
    [QuantizeVariant(k=k, dtype=dt, rotate=True, smooth=s, rowsum=r)
     for k in (1152, 3072, 4608, 12288, 15360) for dt in (torch.bfloat16, torch.float16)
     for s, r in ((False, False), (True, True))]
    + [QuantizeVariant(k=k, dtype=dt, smooth=s, static=st, rowsum=r)
       for k in (1152, 4608, 15360) for dt in (torch.float32, torch.bfloat16)
       for s, st, r in ((False, False, False), (True, False, True), (False, True, False))]
    + [QuantizeVariant(k=k, act_bits=4, pack=True) for k in (1152, 4608)]
    + [QuantizeVariant(k=1152, rotate=True, act_bits=4, pack=True),
       QuantizeVariant(k=1152, dtype=torch.float32, rotate=True)]
)
"""``quantize_act_triton`` launches: the rotating kernel at every DiT width (bf16 / fp16, with and
without smoothing and row sums), the row kernel (fp32 / bf16 x dynamic, smoothed with row sums,
static) and packed 4-bit output, and rotations the kernel leaves to torch (packed, fp32)."""


@dataclasses.dataclass(frozen=True)
class Failure:
    kernel: str
    variant: str
    config: str
    arch: int
    error: str

    def row(self) -> dict:
        return dataclasses.asdict(self)


def sweep_qlinear(variants=None, archs=(90, 80), groups_refused=REFUSED_GROUPS) -> list[Binary | Failure]:
    """Every variant x pruned autotune config x arch; refused groups compiled too (as failures)."""
    out: list[Binary | Failure] = []
    refused = [QlinearVariant(weight_bits=4, group=g, zero=True) for g in groups_refused]
    for v in list(QLINEAR_VARIANTS if variants is None else variants) + refused:
        for arch in archs:
            for cfg in v.configs(arch):
                try:
                    out.append(compile_qlinear(v, cfg, arch))
                except CompileError as exc:
                    out.append(Failure("_qlinear_kernel", v.name, config_name(cfg), arch, str(exc)))
    return out


# ----------------------------------------------------------------------------- e4m3 qlinear


@dataclasses.dataclass(frozen=True)
class Fp8Variant:
    """One specialization of ``fp8_gemm._fp8_qlinear_kernel`` (its epilogue flags and output)."""

    bias: bool = True
    activation: str = "none"      # "none", "gelu_tanh", "silu"
    gate: bool = False
    residual: bool = False
    out_dtype: torch.dtype = torch.bfloat16

    @property
    def name(self) -> str:
        tail = [t for t, on in (("bias", self.bias), (self.activation, self.activation != "none"),
                                ("gate", self.gate), ("res", self.residual)) if on]
        out = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[self.out_dtype]
        return "e4m3" + ("+" + "+".join(tail) if tail else "") + f"->{out}"


FP8_VARIANTS: list[Fp8Variant] = (
    [Fp8Variant()] + [Fp8Variant(**epi) for epi in _EPILOGUES]
    + [Fp8Variant(out_dtype=torch.float32), Fp8Variant(out_dtype=torch.float16), Fp8Variant(bias=False)])
"""Every specialization of the e4m3 kernel the library launches, up to the epilogue combinations:
bias + bf16 out, each fused epilogue (activation, gate + residual, both), the other output dtypes,
no bias."""

FP8_ARCHS = (90, 89)
"""Targets with e4m3 tensor cores (``capabilities.FP8_MIN_ARCH``); sm_80 refuses the kernel."""


def fp8_configs(arch: int, promote_every: int | None | str = "default") -> list:
    """The autotune configs of the e4m3 kernel on ``sm_<arch>`` after the pruning (``fp8_gemm.tile_fits``),
    for ``promote_every`` (``"default"``: the library's ``fp8_gemm.PROMOTE_EVERY``)."""
    from viditq_compile.kernels import fp8_gemm

    promote = fp8_gemm.PROMOTE_EVERY if promote_every == "default" else promote_every
    return [c for c in fp8_gemm.autotune_configs()
            if fp8_gemm.tile_fits(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps,
                                  c.num_stages, arch, promote)]  # type: ignore[arg-type]


def build_fp8(v: Fp8Variant, cfg, arch: int, shape: tuple[int, int, int] = DIT_SHAPE,
              promote_every: int | None | str = "default"):
    """The ``CompiledKernel`` of variant ``v`` of the e4m3 kernel with ``cfg``, for ``sm_<arch>``, from the
    arguments ``fp8_gemm.kernel_args`` gives a launch at ``(M, N, K)`` (meta tensors, PixArt-Σ's
    ``[2, M/2, ...]`` layout with a ``[2, 1, N]`` gate). Raises ``CompileError``."""
    from viditq_compile.kernels import fp8_gemm

    m, n, k = shape
    lead = (2, m // 2)
    e4m3, bf16 = torch.float8_e4m3fn, torch.bfloat16
    xq = torch.empty(m, k, dtype=e4m3, device="meta")
    wq = torch.empty(n, k, dtype=e4m3, device="meta")
    bias = torch.empty(n, dtype=bf16, device="meta") if v.bias else None
    gate = torch.empty(2, 1, n, dtype=bf16, device="meta") if v.gate else None
    residual = torch.empty(*lead, n, dtype=bf16, device="meta") if v.residual else None
    out = torch.empty(m, n, dtype=v.out_dtype, device="meta")
    args, flags = fp8_gemm.kernel_args(xq, torch.empty(m, 1, device="meta"), wq, torch.empty(n, device="meta"),
                                       bias, gate, residual, out, v.activation, lead)
    if promote_every != "default":
        flags["PROMOTE_EVERY"] = promote_every
    kwargs = dict(flags, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return _compile(fp8_gemm._fp8_qlinear_kernel, args, kwargs, arch)


def compile_fp8(v: Fp8Variant, cfg, arch: int, shape: tuple[int, int, int] = DIT_SHAPE,
                promote_every: int | None | str = "default") -> Binary:
    """``build_fp8`` inspected (``Binary``)."""
    return inspect(build_fp8(v, cfg, arch, shape, promote_every), "_fp8_qlinear_kernel", v.name,
                   config_name(cfg), arch)


def wgmma_pending(compiled) -> int:
    """The most warpgroup MMA groups a ``wgmma.wait_group N`` of the kernel's PTX leaves in flight:
    0 when every wgmma is waited for at once (synchronous), >= 1 when the next K step's wgmma is
    issued while the previous one runs (Triton's software-pipelined MMA). -1 without wgmma."""
    waits = [int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", compiled.asm["ptx"])]
    return max(waits) if waits else -1


def sweep_fp8(variants=None, archs=FP8_ARCHS) -> list[Binary | Failure]:
    """Every e4m3 variant x pruned config x target with e4m3 tensor cores."""
    out: list[Binary | Failure] = []
    for v in FP8_VARIANTS if variants is None else variants:
        for arch in archs:
            for cfg in fp8_configs(arch):
                try:
                    out.append(compile_fp8(v, cfg, arch))
                except CompileError as exc:
                    out.append(Failure("_fp8_qlinear_kernel", v.name, config_name(cfg), arch, str(exc)))
    return out


# ----------------------------------------------------------------------------- int_mm epilogue


def compile_int_mm_epilogue(v: QlinearVariant, cfg, arch: int, shape: tuple[int, int, int] = DIT_SHAPE) -> Binary:
    """``int_mm_epilogue._int_mm_epilogue_kernel`` (the tail after ``torch._int_mm``) with ``v``'s epilogue
    flags (zero points, bias, activation, gate, residual, output dtype; W8A8 per channel) and ``cfg`` (a
    ``triton.Config`` of ``int_mm_epilogue.autotune_configs``), from the arguments its launch passes at
    ``(M, N, K)`` (meta tensors, PixArt-Σ's ``[2, M/2, ...]`` layout), compiled for ``sm_<arch>`` and
    inspected. Raises ``CompileError``."""
    from viditq_compile.kernels import int_mm_epilogue as ime

    m, n, _ = shape
    lead, bf16 = (2, m // 2), torch.bfloat16
    ws = torch.empty(n, device="meta")
    args, flags = ime.kernel_args(
        torch.empty(m, n, dtype=torch.int32, device="meta"), torch.empty(m, 1, device="meta"), ws,
        torch.empty(n, dtype=torch.int32, device="meta") if v.zero else None,
        torch.empty(m, dtype=torch.int32, device="meta") if v.zero else None,
        torch.empty(n, dtype=bf16, device="meta") if v.bias else None,
        torch.empty(2, 1, n, dtype=bf16, device="meta") if v.gate else None,
        torch.empty(*lead, n, dtype=bf16, device="meta") if v.residual else None,
        torch.empty(m, n, dtype=v.out_dtype, device="meta"), v.activation, lead)
    kwargs = dict(flags, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    compiled = _compile(ime._int_mm_epilogue_kernel, args, kwargs, arch)
    name = f"{cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']}-w{cfg.num_warps}"
    return inspect(compiled, "_int_mm_epilogue_kernel", v.name, name, arch)
