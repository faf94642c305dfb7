"""Each family's CLI route: ``viditq quantize --model DIR`` on a tiny seeded model of the family
saved with ``save_pretrained``; the layers it keeps in floating point are the family's keep-FP
names, found in the program's graph."""

import json
import re

import pytest
import torch

import viditq_compile as vq
from tests import zoo
from viditq_compile.cli import main
from viditq_compile.families import registry

BUILDERS = {"pixart": zoo.build_pixart, "dit": zoo.build_dit, "latte": zoo.build_latte,
            "flux": zoo.build_flux, "cogvideox": zoo.build_cogvideox}


def _sqnrs(text):
    return [float(x) for x in re.findall(r"([\d.]+) dB", text)]


@pytest.mark.parametrize("family", ["pixart", "dit", pytest.param("latte", marks=pytest.mark.slow),
                                    "flux", "cogvideox"])
def test_quantize_a_saved_model_directory_of_each_family(family, tmp_path, capsys):
    pytest.importorskip("diffusers")
    model, _ = BUILDERS[family]()
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "artifact"
    code = main(["quantize", "--model", str(tmp_path / "model"), "--no-bench", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert min(_sqnrs(captured.out)) > 30, captured.out
    assert "artifact verified" in captured.out
    report = vq.load(out).report
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    keep = {n for n in linears if re.search(registry.get(family).keep_fp_regex, n)}
    assert {r.name for r in report.rows if not r.quantized} == keep
    assert {r.name for r in report.rows if r.quantized} == linears - keep


def test_an_opensora_config_is_named_and_refused_with_the_python_api_as_the_way(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["STDiT3"], "model_type": "STDiT3"}))
    assert main(["quantize", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "OpenSORA STDiT3" in err and "Python API" in err and len(err.strip().splitlines()) == 1

