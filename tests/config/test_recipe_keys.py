"""Every parsed recipe key is used, refused or reported (``config/recipe.py``'s docstring):
``calib_data.save_path`` is where the statistics live (read by ``vq.quantize``, the backend and
the CLI, written by ``viditq quantize --calibration N``); ``model.*`` and granularity names are
reported as not applied, once, by a warning naming the key."""

import glob
import logging
import os

import pytest
import torch

import viditq_compile as vq
from viditq_compile.backend import last_report
from viditq_compile.calibration.stats import CalibrationError
from viditq_compile.cli import main
from viditq_compile.config.recipe import Recipe

RECIPE_LOGGER = "viditq_compile.config.recipe"
CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "viditq_configs")


def _recipe(save_path=None, **extra):
    data = {"weight": {"n_bits": 8}, "act": {"n_bits": 8}, "viditq": {"alpha": 0.5, "layer_name_regex": "."}}
    if save_path is not None:
        data["calib_data"] = {"save_path": str(save_path)}
    return Recipe.from_dict({**data, **extra}, name="keys")


def _calls(m, n=3):
    g = torch.Generator().manual_seed(1)
    return [((torch.randn(2, 16, 64, generator=g), torch.randn(2, 64, generator=g)), {}) for _ in range(n)]


def _balances(report):
    return {r.name: r.balance for r in report.rows if r.quantized}


def test_calibration_path_swaps_the_reference_pickle_suffix():
    assert _recipe("./calib_data.pth").calibration_path == "./calib_data.safetensors"
    assert _recipe("out/stats.PT").calibration_path == "out/stats.safetensors"
    assert _recipe("stats.safetensors").calibration_path == "stats.safetensors"
    assert _recipe().calibration_path is None and Recipe.preset("w8a8").calibration_path is None
    ref = Recipe.from_yaml(os.path.join(CONFIGS, "opensora_config_cuda_kernel.yaml"))
    assert ref.calibration_path == "./calib_data.safetensors"


def test_quantize_reads_the_statistics_at_calib_data_save_path(mlp_block, tmp_path):
    m, args = mlp_block
    path = tmp_path / "calib.pth"
    vq.calibrate(m, _calls(m), progress=False).save(tmp_path / "calib.safetensors")
    qm = vq.quantize(m, args, recipe=_recipe(path))
    assert set(_balances(qm.report).values()) == {"smooth+rotate a=0.5"}


def test_quantize_warns_when_calib_data_save_path_is_missing(mlp_block, tmp_path, caplog):
    m, args = mlp_block
    with caplog.at_level(logging.WARNING):
        qm = vq.quantize(m, args, recipe=_recipe(tmp_path / "absent.safetensors"))
    assert "calib_data.save_path" in caplog.text and "absent.safetensors does not exist" in caplog.text
    assert set(_balances(qm.report).values()) == {"rotate"}  # no statistics: smoothing skipped


def test_a_given_calibration_wins_over_calib_data_save_path(mlp_block, tmp_path):
    m, args = mlp_block
    (tmp_path / "calib.safetensors").write_bytes(b"\x00" * 3)  # never read
    qm = vq.quantize(m, args, recipe=_recipe(tmp_path / "calib.safetensors"), calibration=_calls(m))
    assert set(_balances(qm.report).values()) == {"smooth+rotate a=0.5"}


def test_an_unreadable_file_at_calib_data_save_path_is_refused_naming_the_key(mlp_block, tmp_path):
    m, args = mlp_block
    (tmp_path / "calib.safetensors").write_bytes(b"\x80\x04pickle")
    with pytest.raises(CalibrationError, match="recipe key 'calib_data.save_path'.*not a readable safetensors"):
        vq.quantize(m, args, recipe=_recipe(tmp_path / "calib.pth"))


def test_the_backend_reads_calib_data_save_path(mlp_block, tmp_path):
    m, args = mlp_block
    vq.calibrate(m, _calls(m), progress=False).save(tmp_path / "calib.safetensors")
    with torch.no_grad():
        torch.compile(m, backend="viditq", options={"recipe": _recipe(tmp_path / "calib.safetensors")})(*args)
    assert set(_balances(last_report()).values()) == {"smooth+rotate a=0.5"}


def test_model_tags_and_granularity_names_are_reported_once_naming_the_key(caplog):
    r = _recipe(model={"model_id": "opensora", "model_type": "opensora"},
                weight={"n_bits": 8, "group": "tensor"}, act={"n_bits": 8, "group": "token"})
    notes = r.not_applied()
    assert len(notes) == 2
    assert notes[0].startswith("model.model_id, model.model_type: informational tags, not applied")
    assert notes[1].startswith("weight.group: 'tensor' is not applied: weights are quantized per output channel")
    with caplog.at_level(logging.WARNING, logger=RECIPE_LOGGER):
        r.check_supported()
        r.check_supported()
    assert [rec.getMessage().split(": ", 1)[1] for rec in caplog.records] == notes  # once each
    assert _recipe(weight={"n_bits": 8, "group": "channel"}, act={"n_bits": 8, "group": "tensor"}).not_applied() \
        == ["act.group: 'tensor' is not applied: activations are quantized per token"]
    assert all(not p.not_applied() for p in map(Recipe.preset, ("fp", "w8a8", "w4a8", "w4a8-mp")))


def test_keys_that_are_refused_name_themselves():
    assert any(p.startswith("act.group:") for p in _recipe(act={"n_bits": 8, "group": 64}).unsupported())
    assert any(p.startswith("act.sym:") for p in _recipe(act={"n_bits": 8, "sym": False}).unsupported())
    with pytest.raises(vq.RecipeError, match="'calib_data.save_path': expected a path string"):
        Recipe.from_dict({"weight": {"n_bits": 8}, "act": {"n_bits": 8}, "calib_data": {"save_path": 7}})


YAML = """model:
  model_id: tiny
weight:
  n_bits: 8
act:
  n_bits: 8
viditq:
  alpha: 0.5
  layer_name_regex: '.'
calib_data:
  save_path: ./calib_data.pth
"""


def test_the_cli_writes_then_reads_calib_data_save_path(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.chdir(tmp_path)  # relative to the working directory, as the reference scripts run
    (tmp_path / "r.yaml").write_text(YAML)
    common = ["quantize", "--model", "tiny", "--recipe", "r.yaml", "--no-bench"]
    assert main([*common, "--calibration", "2", "--out", "a"]) == 0
    first = capsys.readouterr()
    assert "calibration statistics saved to ./calib_data.safetensors" in first.out
    assert "model.model_id: informational tags, not applied" in caplog.text  # stderr outside pytest
    assert (tmp_path / "calib_data.safetensors").is_file() and not (tmp_path / "calib_data.pth").exists()
    code = main([*common, "--out", "b"])
    second = capsys.readouterr()
    assert code == 0, second.err
    second = second.out
    assert "calibration: statistics from ./calib_data.safetensors" in second
    assert "smooth+rotate a=0.5" in second and "smoothing skipped" not in second
    assert vq.load(tmp_path / "b").plan.layers == vq.load(tmp_path / "a").plan.layers


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "docs",
                                                               "recipes", "*.yaml"))))
def test_the_documented_recipes_parse_and_use_every_key(path):
    r = Recipe.from_yaml(path)
    r.check_supported()
    assert r.not_applied() == [] and r.balance, path
    assert r.fold_balance or r.attention.quantizes, path
