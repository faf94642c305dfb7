"""Inductor lowering on CPU, pinned by the generated code."""

import re

import torch
from torch._inductor.utils import run_and_get_code

from viditq_compile.numerics import sqnr_db


def test_quantization_fuses_into_its_producer_and_gemm_is_int_mm(mlp_block):
    m, args = mlp_block
    compiled = torch.compile(m, backend="viditq")
    with torch.no_grad():
        out, codes = run_and_get_code(compiled, *args)
    code = "\n".join(codes)
    # both quantized linears run as extern int8 GEMMs, no opaque op call remains
    assert len(re.findall(r"extern_kernels\._int_mm\(", code)) == 2
    assert "torch.ops.viditq.w8a8_linear" not in code
    # per-token quantization of fc1's input is computed in the LayerNorm/modulate kernel
    kernels = set(re.findall(r"def (cpp_fused_\w+)|(cpp_fused_\w+)\(", code))
    names = {a or b for a, b in kernels}
    assert any("native_layer_norm" in k and "w8a8_linear" in k for k in names), names
    # fc1's dequant epilogue, GELU and fc2's quantization share one kernel
    assert any("gelu" in k and "w8a8_linear" in k for k in names), names
    assert sqnr_db(m(*args), out) > 35
