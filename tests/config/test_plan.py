"""Plan files: bytes-based loading, hostile JSON refused as PlanError naming the file, atomic saves."""

import json
import math
import os

import pytest
import torch

from viditq_compile.calibration.stats import CalibrationError, CalibrationStats
from viditq_compile.config.plan import LayerPlan, Plan, PlanError
from viditq_compile.io import atomic
from viditq_compile.io.atomic import UnsafePathError


def _plan(calibration=False, bits=8):
    plan = Plan(recipe="w8a8", layers={
        "blocks.0.fc1": LayerPlan("blocks.0.fc1", 16, 32, weight_bits=bits, act_bits=8),
        "proj_out": LayerPlan("proj_out", 32, 16, reason="kept by remain_fp_regex")})
    if calibration:
        plan.calibration = CalibrationStats({"blocks.0.fc1": torch.ones(2, 16) * bits},
                                            {"blocks.0.fc1": torch.tensor([900.0, math.nan])}, 2)
    return plan


def _good_json():
    return _plan().to_dict()


def test_loads_round_trips_and_load_is_a_thin_wrapper(tmp_path):
    p = tmp_path / "plan.json"
    _plan(calibration=True).save(p)
    names = []

    def read_sibling(name):
        names.append(name)
        return (tmp_path / name).read_bytes()

    a = Plan.loads(p.read_bytes(), source="art/plan.json", read_sibling=read_sibling)
    b = Plan.load(p)
    assert a == b == _plan() and names == ["plan.calibration.safetensors"]
    assert torch.equal(a.calibration.absmax_per_call["blocks.0.fc1"], torch.ones(2, 16) * 8)
    assert Plan.loads(json.dumps(_good_json()), source="text") == _plan()


def test_a_plan_naming_calibration_without_read_sibling_is_refused(tmp_path):
    data = json.dumps({**_good_json(), "calibration_file": "plan.calibration.safetensors"})
    with pytest.raises(PlanError, match="art/plan.json names calibration_file.*read_sibling"):
        Plan.loads(data, source="art/plan.json")


@pytest.mark.parametrize("name", ["..", ".", "", "../x.safetensors", "/etc/passwd", "a\\b", 3, ["x"]])
def test_calibration_file_must_be_a_plain_name_beside_the_plan(name):
    data = json.dumps({**_good_json(), "calibration_file": name})
    with pytest.raises(PlanError, match="calibration_file must be a file name"):
        Plan.loads(data, source="p.json", read_sibling=lambda n: pytest.fail("read a refused name"))


def _row(**changes):
    row = dict(_good_json()["layers"][0])
    row.update(changes)
    return row


HOSTILE = {
    "deep list": b"[" * 100_000,
    "deep object": b'{"a":' * 100_000,
    "binary": b"\x89PNG\r\n\x1a\n\x00\xff\xfe",
    "not json": b'{"format": 3, "recipe": ',
    "huge int": b'{"format": 3, "recipe": "x", "layers": [], "timestep_bounds": [' + b"9" * 5000 + b"]}",
    "huge bound": json.dumps({**_good_json(), "timestep_bounds": [10**400]}).encode(),
    "inf bound": b'{"format": 3, "recipe": "x", "layers": [], "timestep_bounds": [1e999]}',
    "duplicate key": b'{"format": 3, "recipe": "x", "recipe": "y", "layers": []}',
    "top is a list": b"[1, 2]",
    "layers not a list": json.dumps({**_good_json(), "layers": {"a": 1}}).encode(),
    "row is a list": json.dumps({**_good_json(), "layers": [["blocks.0.fc1", 16, 32]]}).encode(),
    "name is a number": json.dumps({**_good_json(), "layers": [_row(name=7)]}).encode(),
    "in_features is a string": json.dumps({**_good_json(), "layers": [_row(in_features="16")]}).encode(),
    "in_features huge": json.dumps({**_good_json(), "layers": [_row(in_features=10**30)]}).encode(),
    "weight_sym is a number": json.dumps({**_good_json(), "layers": [_row(weight_sym=1)]}).encode(),
    "alpha is a string": json.dumps({**_good_json(), "layers": [_row(balance="smooth", alpha="x")]}).encode(),
    "reason is a list": json.dumps({**_good_json(), "layers": [_row(weight_bits=None, reason=[1])]}).encode(),
    "group is a float": json.dumps({**_good_json(), "layers": [_row(weight_group=2.0)]}).encode(),
    "widths not lists": json.dumps({**_good_json(), "layers": [_row(timestep_widths=[8, 8])]}).encode(),
    "layer twice": json.dumps({**_good_json(), "layers": [_row(), _row()]}).encode(),
    "recipe is an object": json.dumps({**_good_json(), "recipe": {"a": 1}}).encode(),
    "timestep_input number": json.dumps({**_good_json(), "timestep_input": 5}).encode(),
    "format is a list": json.dumps({**_good_json(), "format": [3]}).encode(),
    "unknown key": json.dumps({**_good_json(), "exec": "rm -rf /"}).encode(),
}
MATCH = {"deep list": "nested too deeply", "deep object": "nested too deeply", "binary": "not UTF-8",
         "not json": "not valid JSON", "huge int": "not valid JSON", "duplicate key": "duplicate key 'recipe'",
         "row is a list": "layer #0 must be an object", "name is a number": "'name' must be a string",
         "in_features is a string": "'blocks.0.fc1': 'in_features' must be an int",
         "alpha is a string": "'alpha' must be a number", "layer twice": "listed twice",
         "weight_sym is a number": "'weight_sym' must be true/false", "unknown key": "unknown key"}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_plan_files_are_plan_errors_naming_the_file(tmp_path, case):
    p = tmp_path / "plan.json"
    p.write_bytes(HOSTILE[case])
    with pytest.raises(PlanError, match=MATCH.get(case)) as e:
        Plan.load(p)
    assert str(p) in str(e.value) and len(str(e.value)) < 500
    with pytest.raises(PlanError, match="art/plan.json"):
        Plan.loads(HOSTILE[case], source="art/plan.json")


def test_missing_directory_and_oversized_plan_files_are_plan_errors(tmp_path, monkeypatch):
    with pytest.raises(PlanError, match="does not exist"):
        Plan.load(tmp_path / "absent.json")
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(PlanError, match="is a directory"):
        Plan.load(tmp_path / "dir.json")
    import viditq_compile.config.plan as plan_module

    monkeypatch.setattr(plan_module, "MAX_PLAN_BYTES", 100)
    (tmp_path / "big.json").write_text(json.dumps(_good_json()))
    with pytest.raises(PlanError, match="larger than 100 bytes"):
        Plan.load(tmp_path / "big.json")


def test_a_corrupt_calibration_sibling_is_an_error_naming_it(tmp_path):
    p = tmp_path / "plan.json"
    _plan(calibration=True).save(p)
    (tmp_path / "plan.calibration.safetensors").write_bytes(b"\xff" * 20)
    with pytest.raises(CalibrationError, match="plan.calibration.safetensors"):
        Plan.load(p)
    (tmp_path / "plan.calibration.safetensors").unlink()
    with pytest.raises(PlanError, match="plan.calibration.safetensors.*does not exist"):
        Plan.load(p)


# ----------------------------------------------------------------------------------------------
# saving
def _files(d):
    return {n: (d / n).read_bytes() for n in sorted(os.listdir(d))}


def test_a_save_that_fails_midway_keeps_the_previous_plan_and_calibration(tmp_path, monkeypatch):
    p = tmp_path / "plan.json"
    _plan(calibration=True).save(p)
    before = _files(tmp_path)
    monkeypatch.setattr(atomic.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(OSError, match="No space left"):
        _plan(calibration=True, bits=4).save(p)
    monkeypatch.undo()
    assert _files(tmp_path) == before
    assert Plan.load(p) == _plan()

    def broken(self):
        raise RuntimeError("serializer died")

    monkeypatch.setattr(CalibrationStats, "to_bytes", broken)
    with pytest.raises(RuntimeError, match="serializer died"):
        _plan(calibration=True, bits=4).save(p)
    assert _files(tmp_path) == before


def test_saving_over_a_symlink_is_refused_and_its_target_kept(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "plan.json").symlink_to(victim)
    with pytest.raises(UnsafePathError, match="symlink"):
        _plan().save(tmp_path / "plan.json")
    (tmp_path / "plan.json").unlink()
    (tmp_path / "plan.calibration.safetensors").symlink_to(victim)
    with pytest.raises(UnsafePathError, match="calibration.safetensors.*symlink"):
        _plan(calibration=True).save(tmp_path / "plan.json")
    assert victim.read_bytes() == b"precious" and not (tmp_path / "plan.json").exists()


def test_repeated_saves_replace_content_and_leave_no_temporary_files(tmp_path):
    p = tmp_path / "plan.json"
    _plan(calibration=True).save(p)
    _plan(calibration=True, bits=4).save(p)
    assert Plan.load(p).layers["blocks.0.fc1"].weight_bits == 4
    assert sorted(os.listdir(tmp_path)) == ["plan.calibration.safetensors", "plan.json"]
