"""The four diffusers DiT classes (tiny seeded configs): W8A8 through every entry point.

For each model: every eligible linear is replaced (count = linears - kept FP, and exactly the
expected layers), the W8A8 output is >= 30 dB SQNR against floating point, and the exported
(eager), ``torch.compile(backend="viditq")`` and save -> load paths agree.
"""

import pytest
import torch

import viditq_compile as vq
from tests.zoo import KEEP_FP, QUANTIZE, ZOO
from viditq_compile.backend import REPORTS
from viditq_compile.numerics.quant import sqnr_db

SQNR_FLOOR_DB = 30.0
# the three W8A8 paths run the same integer math; they differ only where Inductor's fused
# float ops round a value to the other side of an int8 rounding boundary
PATHS_AGREE_DB = 40.0


def _out(y):
    return y[0] if isinstance(y, (tuple, list)) else y


@pytest.fixture(scope="module", params=[pytest.param(n, marks=pytest.mark.slow) if n == "latte" else n
                                        for n in sorted(ZOO)])
def quantized(request, tmp_path_factory):
    name = request.param
    model, kwargs = ZOO[name]()
    with torch.no_grad():
        ref = _out(model(**kwargs))
    qm = vq.quantize(model, (), kwargs, recipe="w8a8")
    return name, model, kwargs, ref, qm, tmp_path_factory.mktemp(name)


def test_every_eligible_linear_is_replaced(quantized):
    name, model, _, _, qm, _ = quantized
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    got_q = {r.name for r in qm.report.rows if r.quantized}
    got_fp = {r.name for r in qm.report.rows if not r.quantized}
    assert got_q == set(QUANTIZE[name])
    assert got_fp == set(KEEP_FP[name])
    assert qm.report.num_quantized == len(linears) - len(KEEP_FP[name])
    w8a8 = torch.ops.viditq.w8a8_linear.default
    n_ops = sum(n.target == w8a8 for n in qm.program.graph.nodes)
    assert n_ops >= len(QUANTIZE[name])


def test_w8a8_output_sqnr_against_fp(quantized):
    name, _, kwargs, ref, qm, _ = quantized
    with torch.no_grad():
        out = _out(qm(**kwargs))
    assert sqnr_db(ref, out) >= SQNR_FLOOR_DB, name


def test_compiled_backend_agrees_with_exported_program(quantized):
    name, model, kwargs, ref, qm, _ = quantized
    n0 = len(REPORTS)
    with torch.no_grad():
        eager = _out(qm(**kwargs))
        compiled = _out(torch.compile(model, backend="viditq")(**kwargs))
    reps = list(REPORTS)[n0:]
    assert sum(r.num_quantized for r in reps) >= len(QUANTIZE[name])
    assert sqnr_db(eager, compiled) >= PATHS_AGREE_DB, name
    assert sqnr_db(ref, compiled) >= SQNR_FLOOR_DB, name


def test_save_load_reproduces_outputs_exactly(quantized):
    name, _, kwargs, _, qm, tmp = quantized
    qm.save(tmp / "artifact")
    loaded = vq.load(tmp / "artifact")
    with torch.no_grad():
        assert torch.equal(_out(qm(**kwargs)), _out(loaded(**kwargs)))
    assert loaded.report.records() == qm.report.records()
