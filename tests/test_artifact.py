"""The directory artifact: exact round trip, and refusal of anything missing, edited or foreign."""

import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch
from safetensors.torch import load_file, save_file

import viditq_compile as vq
from viditq_compile.artifact import ARTIFACT_VERSION, _sha256


@pytest.fixture
def saved(tmp_path, mlp_block):
    m, args = mlp_block
    qm = vq.quantize(m, args)
    path = tmp_path / "art"
    qm.save(path)
    return qm, args, path


def _rewrite_manifest(path, **changes):
    mpath = path / "manifest.json"
    m = json.loads(mpath.read_text())
    m.update(changes)
    for name in m["sha256"]:
        m["sha256"][name] = _sha256(str(path / name))
    mpath.write_text(json.dumps(m))


def test_round_trip_is_exact(saved):
    qm, args, path = saved
    assert sorted(os.listdir(path)) == ["manifest.json", "plan.json", "program.pt2",
                                        "report.txt", "weights.safetensors"]
    loaded = vq.load(path)
    assert torch.equal(loaded(*args), qm(*args))
    assert loaded.plan.layers == qm.plan.layers
    x2 = (torch.randn(3, 11, 64), torch.randn(3, 64))  # dynamic dims survive
    assert torch.equal(loaded(*x2), qm(*x2))


def test_weights_come_from_safetensors(saved):
    qm, args, path = saved
    w = load_file(str(path / "weights.safetensors"))
    w["state_dict/fc1.viditq_w_scale"] = w["state_dict/fc1.viditq_w_scale"] * 2
    save_file(w, str(path / "weights.safetensors"))
    _rewrite_manifest(path)
    loaded = vq.load(path)
    assert not torch.equal(loaded(*args), qm(*args))


def test_pt2_loads_with_torch_export_after_importing_the_package(saved):
    _, _, path = saved
    code = ("import torch, viditq_compile\n"
            f"ep = torch.export.load({str(path / 'program.pt2')!r})\n"
            "x = torch.randn(2, 5, 64); s = torch.randn(2, 64)\n"
            "print(ep.module()(x, s).shape)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "torch.Size([2, 5, 64])" in r.stdout


@pytest.mark.parametrize("name", ["program.pt2", "weights.safetensors", "plan.json",
                                  "manifest.json"])
def test_missing_file_is_refused(saved, name):
    _, _, path = saved
    os.remove(path / name)
    with pytest.raises(vq.ArtifactError, match="missing"):
        vq.load(path)


def test_wrong_format_version_is_refused(saved):
    _, _, path = saved
    _rewrite_manifest(path, version=ARTIFACT_VERSION + 1)
    with pytest.raises(vq.ArtifactError, match="version"):
        vq.load(path)


def test_edited_file_fails_its_checksum(saved):
    _, _, path = saved
    with open(path / "plan.json", "a") as f:
        f.write(" ")
    with pytest.raises(vq.ArtifactError, match="checksum"):
        vq.load(path)


def test_weight_of_the_wrong_shape_is_refused(saved):
    _, _, path = saved
    w = load_file(str(path / "weights.safetensors"))
    w["state_dict/fc1.viditq_w_q"] = torch.zeros(255, 64, dtype=torch.int8)
    save_file(w, str(path / "weights.safetensors"))
    _rewrite_manifest(path)
    with pytest.raises(vq.ArtifactError, match="fc1.viditq_w_q"):
        vq.load(path)


def test_missing_or_extra_weight_is_refused(saved):
    _, _, path = saved
    w = load_file(str(path / "weights.safetensors"))
    del w["state_dict/fc2.viditq_w_scale"]
    w["state_dict/evil"] = torch.zeros(1)
    save_file(w, str(path / "weights.safetensors"))
    _rewrite_manifest(path)
    with pytest.raises(vq.ArtifactError, match="does not fit"):
        vq.load(path)


def test_a_planted_pickle_in_the_program_is_refused_without_running(saved, tmp_path):
    _, _, path = saved
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle

    src = path / "program.pt2"
    dst = tmp_path / "planted.pt2"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if "sample_inputs" in item.filename:
                data = pickle.dumps(Evil(), protocol=2)
            zout.writestr(item, data)
    os.replace(dst, src)
    _rewrite_manifest(path)
    with pytest.raises(vq.ArtifactError, match="system"):
        vq.load(path)
    assert not marker.exists()


def test_not_an_artifact(tmp_path):
    with pytest.raises(vq.ArtifactError, match="not found"):
        vq.load(tmp_path / "nothing")
    (tmp_path / "d").mkdir()
    with pytest.raises(vq.ArtifactError, match="manifest.json"):
        vq.load(tmp_path / "d")
    (tmp_path / "d" / "manifest.json").write_text("{}")
    with pytest.raises(vq.ArtifactError, match="format"):
        vq.load(tmp_path / "d")
