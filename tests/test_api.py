"""``viditq_compile.quantize``: the exported-program path, end to end, and its refusals."""

import pytest
import torch

import viditq_compile as vq
from viditq_compile.numerics.quant import sqnr_db


def test_quantized_model_runs_like_the_module(mlp_block):
    m, args = mlp_block
    qm = vq.quantize(m, args)
    assert qm.report.num_quantized == 2 and qm.report.num_fp == 1
    assert sqnr_db(m(*args), qm(*args)) > 35
    # dynamic batch and token count: another shape runs without re-export
    x2 = (torch.randn(3, 40, 64), torch.randn(3, 64))
    assert sqnr_db(m(*x2), qm(*x2)) > 35
    assert isinstance(qm.program, torch.export.ExportedProgram)
    assert not any(p.requires_grad for p in qm.parameters())


def test_report_prints_a_table_and_gives_records(mlp_block):
    qm = vq.quantize(*mlp_block)
    text = str(qm.report)
    assert "fc1" in text and "viditq.w8a8_linear" in text and "kept by name" in text
    recs = qm.report.records()
    assert [r["name"] for r in recs] == ["fc1", "fc2", "proj_out"]
    assert recs[2]["weight_bits"] is None and recs[0]["weight_bits"] == 8


def test_quantized_weights_are_about_a_quarter_of_fp32():
    m = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.GELU(),
                            torch.nn.Linear(2048, 512)).eval()
    qm = vq.quantize(m, (torch.randn(2, 8, 512),))
    fp_bytes = sum(p.numel() * 4 for p in m.parameters())
    assert qm.report.num_quantized == 2
    assert qm.weight_bytes <= 0.27 * fp_bytes


def test_model_without_linears_runs_and_reports_zero():
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    x = torch.randn(2, 3, 8, 8)
    qm = vq.quantize(m, (x,))
    assert len(qm.report) == 0 and qm.report.num_quantized == 0
    torch.testing.assert_close(qm(x), m(x))


def test_non_exportable_model_names_the_cause():
    class DataDependent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return self.fc(x)
            return x

    with pytest.raises(vq.CaptureError, match="DataDependent"):
        vq.quantize(DataDependent(), (torch.randn(2, 8),))


def test_bad_arguments_are_refused(mlp_block):
    m, args = mlp_block
    with pytest.raises(vq.RecipeError, match="w3a3"):
        vq.quantize(m, args, recipe="w3a3")
    with pytest.raises(TypeError, match="Module"):
        vq.quantize(lambda x: x, args)
    with pytest.raises(TypeError, match="tuple"):
        vq.quantize(m, [*args])
    with pytest.raises(vq.CalibrationError, match="no forward calls"):
        vq.quantize(m, args, calibration=[])
    with pytest.raises(TypeError, match="int"):
        vq.quantize(m, args, calibration=3)
    with pytest.raises(vq.CaptureError, match="forward"):
        vq.quantize(m, args, {"bogus": 1})


def test_zero_nan_and_inf_rows_create_no_new_nan(mlp_block):
    m, (x, s) = mlp_block
    qm = vq.quantize(m, (x, s))
    x = x.clone()
    x[0, 0] = 0.0
    x[0, 1, 5] = float("nan")
    x[1, 2, 7] = float("inf")
    fp, q = m(x, s), qm(x, s)
    fp_bad = ~torch.isfinite(fp).all(-1)
    q_bad = ~torch.isfinite(q).all(-1)
    assert not torch.any(q_bad & ~fp_bad), "quantization made a non-finite row"
    assert torch.isfinite(q[0, 0]).all()


def test_the_user_model_is_not_changed(mlp_block):
    m, args = mlp_block
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.train()
    vq.quantize(m, args)
    assert m.training
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])


def test_bf16_model_keeps_bf16_activations(mlp_block):
    m, (x, s) = mlp_block
    mb = m.to(torch.bfloat16)
    xb, sb = x.bfloat16(), s.bfloat16()
    qm = vq.quantize(mb, (xb, sb))
    out = qm(xb, sb)
    assert out.dtype == torch.bfloat16
    assert sqnr_db(mb(xb, sb).float(), out.float()) > 30
    assert qm.program.state_dict["fc1.viditq_w_q"].dtype == torch.int8


class _Chain(torch.nn.Module):
    """Linear -> Linear -> Linear with nothing between: each input is the previous rewritten call."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(72, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-viditq"])
def test_directly_chained_linears_quantize_and_compile(recipe):
    m, x = _Chain().eval(), torch.randn(4, 72)
    qm = vq.quantize(m, (x,), recipe=recipe)
    assert qm.report.num_quantized == 3
    assert sqnr_db(m(x), qm(x)) > 30
    with torch.no_grad():
        out = torch.compile(m, backend="viditq", options={"recipe": recipe})(x)
    assert sqnr_db(m(x), out) > 30


def test_report_names_the_layers_that_run_the_reference_gemm_on_cuda():
    qm = vq.quantize(_Chain().eval(), (torch.randn(4, 72),), recipe="w8a8")
    notes = {r.name: r.note for r in qm.report.rows}
    assert "on CUDA the reference GEMM runs (K=72 is not a multiple of 16)" in notes["a"]
    assert "CUDA" not in notes["b"] and "CUDA" not in notes["c"]
