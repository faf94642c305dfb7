"""The directory artifact: exact round trip; everything a stranger could plant is refused cleanly,
without running anything, and a save never destroys the last good artifact.

Every hostile artifact here has its manifest recomputed (``hostile_artifacts.resum``), as an
attacker would, so that the checksums are no obstacle and the loader's own checks are tested.
"""

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import tracemalloc
import zlib

import pytest
import torch
from safetensors.torch import load_file, save_file

import viditq_compile as vq
from tests.io.hostile_artifacts import edit_plan, edit_program_json, edit_pt2, members, nodes, rebuild_zip, resum
from viditq_compile.io import artifact
from viditq_compile.io.artifact import ARTIFACT_VERSION


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    from tests.conftest import ModulatedMLP

    torch.manual_seed(0)
    m = ModulatedMLP().eval()
    args = (torch.randn(2, 16, 64), torch.randn(2, 64))
    qm = vq.quantize(m, args)
    path = tmp_path_factory.mktemp("original") / "art"
    qm.save(path)
    return qm, args, path


@pytest.fixture
def saved(original, tmp_path):
    qm, args, src = original
    path = tmp_path / "art"
    shutil.copytree(src, path)
    return qm, args, path


def _marker(tmp_path):
    return tmp_path / "pwned"


def _refused(path, match):
    with pytest.raises(vq.ArtifactError, match=match):
        vq.load(path)


# -- round trip ----------------------------------------------------------------------------------
def test_round_trip_is_exact(saved):
    qm, args, path = saved
    assert sorted(os.listdir(path)) == ["manifest.json", "plan.json", "program.pt2",
                                        "report.txt", "weights.safetensors"]
    loaded = vq.load(path)
    assert torch.equal(loaded(*args), qm(*args))
    assert loaded.plan.layers == qm.plan.layers
    x2 = (torch.randn(3, 11, 64), torch.randn(3, 64))  # dynamic dims survive
    assert torch.equal(loaded(*x2), qm(*x2))
    assert str(loaded.report) == str(qm.report)


_SLOW = pytest.mark.slow


@pytest.mark.parametrize("name", [pytest.param("pixart", marks=_SLOW), "dit", pytest.param("latte", marks=_SLOW),
                                  pytest.param("flux", marks=_SLOW), pytest.param("stdit3", marks=_SLOW),
                                  pytest.param("cogvideox", marks=_SLOW), pytest.param("cogvideox-bf16", marks=_SLOW)])
def test_save_load_is_exact_on_every_model_class(name, tmp_path):
    """Balanced W4A8 (smoothing vectors, rotations, packed int4): the loaded program computes
    bit for bit what the saved one did (its tensors are fresh, aligned copies, as at quantize)."""
    from tests import zoo

    if name.startswith("cogvideox"):
        model, kwargs = zoo.build_cogvideox(dtype=torch.bfloat16 if name.endswith("bf16") else torch.float32)
    else:
        model, kwargs = zoo.ALL_BUILDERS[name]()
    qm = vq.quantize(model, (), kwargs, recipe="w4a8")
    qm.save(tmp_path / "art")
    loaded = vq.load(tmp_path / "art")
    with torch.no_grad():
        a, b = qm(**kwargs), loaded(**kwargs)
    a, b = (a[0], b[0]) if isinstance(a, (tuple, list)) else (a, b)
    assert torch.equal(a, b)
    assert loaded.report.records() == qm.report.records()


def test_manifest_states_size_and_checksum_of_every_file(saved):
    _, _, path = saved
    m = json.loads((path / "manifest.json").read_text())
    assert m["version"] == ARTIFACT_VERSION
    assert set(m["files"]) == set(os.listdir(path)) - {"manifest.json"}
    for name, entry in m["files"].items():
        assert entry["size"] == (path / name).stat().st_size


def test_saved_program_carries_no_example_inputs(saved):
    _, _, path = saved
    sample = [d for n, d in members((path / "program.pt2").read_bytes()) if "sample_inputs" in n]
    assert sample == [b""]


def test_weights_come_from_safetensors(saved):
    qm, args, path = saved
    w = load_file(str(path / "weights.safetensors"))
    w["state_dict/fc1.viditq_w_scale"] = w["state_dict/fc1.viditq_w_scale"] * 2
    save_file(w, str(path / "weights.safetensors"))
    resum(path)
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


def test_format_1_artifacts_still_load(saved):
    """As viditq_compile 0.1 wrote them: the program with its (pickled) example inputs, checksums of
    three files, no sizes."""
    qm, args, path = saved
    assert qm.program.example_inputs is not None
    torch.export.save(qm.program, path / "program.pt2")
    assert any("sample_inputs" in n and d for n, d in members((path / "program.pt2").read_bytes()))
    m = json.loads((path / "manifest.json").read_text())
    v1 = {"format": m["format"], "version": 1, "torch": m["torch"],
          "sha256": {name: hashlib.sha256((path / name).read_bytes()).hexdigest() for name in artifact.FILES}}
    (path / "manifest.json").write_text(json.dumps(v1))
    assert torch.equal(vq.load(path)(*args), qm(*args))


# -- missing, foreign, edited --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["program.pt2", "weights.safetensors", "plan.json", "manifest.json"])
def test_missing_file_is_refused(saved, name):
    _, _, path = saved
    os.remove(path / name)
    _refused(path, "missing")


def test_wrong_format_version_is_refused_with_what_to_do(saved):
    _, _, path = saved
    resum(path, version=max(artifact.READABLE_VERSIONS) + 1)
    _refused(path, "version.*re-save it")


def test_edited_file_fails_its_checksum(saved):
    _, _, path = saved
    data = bytearray((path / "plan.json").read_bytes())
    data[-2] ^= 1
    (path / "plan.json").write_bytes(bytes(data))
    _refused(path, "checksum|bytes")


def test_file_longer_than_the_manifest_says_is_refused_unread(saved):
    _, _, path = saved
    with open(path / "program.pt2", "ab") as f:
        f.write(b"\0" * 10)
    _refused(path, "program.pt2 is .* bytes")


def test_weight_of_the_wrong_shape_is_refused(saved):
    _, _, path = saved
    w = load_file(str(path / "weights.safetensors"))
    w["state_dict/fc1.viditq_w_q"] = torch.zeros(255, 64, dtype=torch.int8)
    save_file(w, str(path / "weights.safetensors"))
    resum(path)
    _refused(path, "fc1.viditq_w_q")


def test_missing_or_extra_weight_is_refused(saved):
    _, _, path = saved
    w = load_file(str(path / "weights.safetensors"))
    del w["state_dict/fc2.viditq_w_scale"]
    w["state_dict/evil"] = torch.zeros(1)
    save_file(w, str(path / "weights.safetensors"))
    resum(path)
    _refused(path, "does not fit")


def test_not_an_artifact(tmp_path):
    with pytest.raises(vq.ArtifactError, match="not found"):
        vq.load(tmp_path / "nothing")
    (tmp_path / "d").mkdir()
    with pytest.raises(vq.ArtifactError, match="manifest.json"):
        vq.load(tmp_path / "d")
    (tmp_path / "d" / "manifest.json").write_text("{}")
    with pytest.raises(vq.ArtifactError, match="format"):
        vq.load(tmp_path / "d")
    (tmp_path / "d" / "manifest.json").write_bytes(b"\xff\xfe[[[")
    with pytest.raises(vq.ArtifactError, match="UTF-8"):
        vq.load(tmp_path / "d")
    (tmp_path / "d" / "manifest.json").write_text("[" * 100_000)
    with pytest.raises(vq.ArtifactError, match="deep|JSON"):
        vq.load(tmp_path / "d")


def test_symlinked_file_in_the_artifact_is_not_followed(saved, tmp_path):
    _, _, path = saved
    target = tmp_path / "elsewhere.json"
    shutil.move(path / "plan.json", target)
    os.symlink(target, path / "plan.json")
    _refused(path, "plan.json cannot be opened.*symlink")


# -- 1, 2, 6: code or side effects from the program JSON ---------------------------------------------
def _payload(marker) -> str:
    return f"__import__('os').system('touch {marker}')"


def _inject(path, where):
    def edit(d):
        where(d)
    edit_program_json(path, edit)


@pytest.mark.parametrize("case", ["guard", "guard_or", "forward_arg", "node_name", "tensor_name",
                                  "sym_expr", "sym_expr_symbol", "range_constraint", "target_walk",
                                  "module_stack", "treespec_type", "treespec_key", "treespec_enum"])
def test_executable_strings_in_the_program_are_refused(saved, tmp_path, case):
    _, _, path = saved
    marker = _marker(tmp_path)
    p = _payload(marker)

    def edit(d):
        gm = d["graph_module"]
        sig = gm["module_call_graph"][0]["signature"]
        tv = gm["graph"]["tensor_values"]
        dyn = next(s for v in tv.values() for s in v["sizes"] if "as_expr" in s)
        if case == "guard":
            d["guards_code"] = [p]
        elif case == "guard_or":
            d["guards_code"] = [f"L['x'].size()[0] == 2 or {p}"]
        elif case == "forward_arg":
            sig["forward_arg_names"] = [f"x=({p})", "scale"]
        elif case == "node_name":
            nodes(d)[0]["name"] = f"a = {p}\n"
        elif case == "tensor_name":
            tv[f"x; {p}"] = tv.pop("x")
        elif case == "sym_expr":
            dyn["as_expr"]["expr_str"] = p
        elif case == "sym_expr_symbol":
            dyn["as_expr"]["expr_str"] = f"Symbol({p!r})"
        elif case == "range_constraint":
            d["range_constraints"][p] = {"min_val": 2, "max_val": None}
        elif case == "target_walk":
            nodes(d)[0]["target"] = "torch.serialization.os.system"
        elif case == "module_stack":
            nodes(d)[0]["metadata"]["nn_module_stack"] = f"L__self__,,x\n{p}"
        elif case == "treespec_type":
            sig["in_spec"] = sig["in_spec"].replace("builtins.tuple", "os.system", 1)
        elif case == "treespec_enum":  # torch's context hook would import the module named here
            spec = json.loads(sig["out_spec"])
            spec[1] = {"type": "builtins.list", "context": json.dumps([{"__enum__": True, "fqn": "antigravity:x",
                                                                        "name": "y"}]),
                       "children_spec": [spec[1]]}
            sig["out_spec"] = json.dumps(spec)
        elif case == "treespec_key":
            spec = json.loads(sig["in_spec"])
            spec[1]["children_spec"][1]["context"] = json.dumps([f"k=({p})"])
            sig["in_spec"] = json.dumps(spec)

    edit_program_json(path, edit)
    _refused(path, "program.pt2 refused")
    assert not marker.exists()


def test_side_effect_ops_are_refused(saved, tmp_path):
    """aten.from_file(shared=True) would create (or extend) a file of the attacker's choosing and
    still give the right outputs; it is not on the allowlist."""
    _, _, path = saved
    marker = _marker(tmp_path)

    def edit(d):
        nodes(d).insert(0, {
            "target": "torch.ops.aten.from_file.default",
            "inputs": [{"name": "filename", "arg": {"as_string": str(marker)}, "kind": 1},
                       {"name": "shared", "arg": {"as_bool": True}, "kind": 1},
                       {"name": "size", "arg": {"as_int": 4096}, "kind": 1}],
            "outputs": [{"as_tensor": {"name": "planted"}}], "metadata": {}, "name": "planted"})
        d["graph_module"]["graph"]["tensor_values"]["planted"] = dict(
            d["graph_module"]["graph"]["tensor_values"]["p_fc1_bias"])

    edit_program_json(path, edit)
    _refused(path, "aten.from_file.*not an allowed operation")
    assert not marker.exists()


@pytest.mark.parametrize("op", ["torch.ops.aten.copy_.default", "torch.ops.aten.add.out",
                                "torch.ops.higher_order.cond", "torch.ops.profiler._record_function_enter.default",
                                "builtins.eval", "#custom::op"])
def test_only_allowlisted_targets_run(saved, op):
    _, _, path = saved
    edit_program_json(path, lambda d: nodes(d)[1].__setitem__("target", op))
    _refused(path, "not an allowed operation")


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.__setitem__("payload", 1), "unknown key 'payload'"),
    (lambda d: nodes(d)[0].__setitem__("extra", {}), "unknown key 'extra'"),
    (lambda d: nodes(d)[0]["inputs"][0].__setitem__("arg", {"as_int": 1, "as_float": 2.0}), "exactly one key"),
    (lambda d: nodes(d)[0]["inputs"][0].__setitem__("arg", {"as_graph": {"name": "g", "graph": {}}}),
     "argument kind 'as_graph'"),
    (lambda d: d["graph_module"]["graph"]["tensor_values"]["x"].__setitem__("dtype", 999), "ScalarType"),
    (lambda d: d["graph_module"].__setitem__("treespec_namedtuple_fields", {"os.system": {"field_names": []}}),
     "named tuples"),
    (lambda d: nodes(d)[0]["metadata"].__setitem__("unknown", "x"), "unknown metadata key"),
])
def test_program_json_outside_the_schema_is_refused(saved, edit, match):
    _, _, path = saved
    edit_program_json(path, edit)
    _refused(path, match)


def test_duplicate_json_keys_in_the_program_are_refused(saved):
    _, _, path = saved

    def edit(name, data):
        if name.endswith("models/model.json"):
            return data[:-1] + b', "guards_code": ["True"]}'
        return data

    edit_pt2(path, edit)
    _refused(path, "duplicate key 'guards_code'")


def test_dropped_metadata_is_never_needed(saved):
    """stack traces and the like are dropped on load; the program still runs the same."""
    qm, args, path = saved
    loaded = vq.load(path)
    assert all("stack_trace" not in n.meta for n in loaded.program.graph.nodes)
    assert torch.equal(loaded(*args), qm(*args))


# -- 3, 4, 5: pickles, zip differentials, files swapped between checks -----------------------------
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_in_the_program_is_refused_without_running(saved, tmp_path):
    _, _, path = saved
    marker = _marker(tmp_path)
    evil = pickle.dumps(_Evil(marker), protocol=2)
    edit_pt2(path, lambda n, d: evil if "sample_inputs" in n else d)
    _refused(path, "system")
    assert not marker.exists()


def test_the_fake_tensor_reducer_is_off_the_allowlist(saved):
    """``_reconstruct_fake_tensor`` takes JSON that reaches sympy's evaluator."""
    _, _, path = saved

    class Reducer:
        def __reduce__(self):
            from torch._export.serde.serialize import _reconstruct_fake_tensor
            return (_reconstruct_fake_tensor, (b"{}", {}))

    blob = pickle.dumps(Reducer(), protocol=2)
    edit_pt2(path, lambda n, d: blob if "sample_inputs" in n else d)
    _refused(path, "_reconstruct_fake_tensor")


@pytest.mark.parametrize("case", ["case_duplicate", "aotinductor", "extra_model", "prepended", "appended",
                                  "gap", "local_name"])
def test_ambiguous_archives_are_refused(saved, case):
    """Shapes of archive where two zip readers could disagree on what is inside."""
    _, _, path = saved
    pt2 = path / "program.pt2"
    ms = members(pt2.read_bytes())
    root = ms[0][0].split("/")[0]
    model = next(d for n, d in ms if n.endswith("models/model.json"))
    if case == "case_duplicate":
        data = rebuild_zip(ms + [(f"{root}/models/Model.JSON", model)])
    elif case == "aotinductor":
        data = rebuild_zip(ms + [(f"{root}/data/aotinductor/model/x.so", b"\x7fELF")])
    elif case == "extra_model":
        data = rebuild_zip(ms + [(f"{root}/models/other.json", model)])
    elif case == "prepended":
        data = b"PK\x03\x04" + b"\0" * 60 + rebuild_zip(ms)
    elif case == "appended":
        data = rebuild_zip(ms) + b"PK\x03\x04junk"
    elif case == "gap":
        data = rebuild_zip(ms)
        # shift the second member's recorded offset: bytes between members
        import io
        import zipfile
        z = zipfile.ZipFile(io.BytesIO(data))
        second = z.infolist()[1].header_offset
        data = data[:second] + b"\0" * 8 + data[second:]
    else:
        data = rebuild_zip(ms)
        i = data.index(b"models/model.json")  # the local header's copy of the name
        data = data[:i] + b"models/modeL.json" + data[i + 17:]
    pt2.write_bytes(data)
    resum(path)
    _refused(path, "program.pt2 refused")


def test_each_file_is_opened_once(saved, monkeypatch):
    _, _, path = saved
    opened = []
    real_open = os.open

    def counting_open(p, *a, **k):
        opened.append(os.path.basename(os.fspath(p)))
        return real_open(p, *a, **k)

    monkeypatch.setattr(os, "open", counting_open)
    vq.load(path)
    counts = {n: opened.count(n) for n in set(opened) & set(os.listdir(path))}
    assert counts == {"manifest.json": 1, "plan.json": 1, "weights.safetensors": 1, "program.pt2": 1}


def test_a_file_swapped_after_its_check_is_never_loaded(saved, tmp_path, monkeypatch):
    """The checked bytes are the loaded bytes: replacing program.pt2 right after it was read
    (with a planted archive whose checksum does not match) changes nothing."""
    qm, args, path = saved
    marker = _marker(tmp_path)
    from viditq_compile.io import program_loader

    real = program_loader.load_program
    evil = rebuild_zip([("x/data/sample_inputs/model.pt", pickle.dumps(_Evil(marker), protocol=2))])

    def swap_then_load(*a, **k):
        (path / "program.pt2").write_bytes(evil)
        return real(*a, **k)

    monkeypatch.setattr(program_loader, "load_program", swap_then_load)
    loaded = vq.load(path)
    assert torch.equal(loaded(*args), qm(*args))
    assert not marker.exists()


# -- 7: bounded memory --------------------------------------------------------------------------------
def _deflate_zeros(n: int) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = b"\0" * (1 << 24)
    out = [c.compress(chunk) for _ in range(n // len(chunk))]
    return b"".join(out) + c.flush()


def test_a_zip_bomb_costs_no_memory(saved):
    """A ~1 MiB member that inflates to 1 GiB is refused from its header, never inflated."""
    _, _, path = saved
    bomb = _deflate_zeros(1 << 30)
    assert len(bomb) < 2 << 20
    ms = members((path / "program.pt2").read_bytes())
    root = ms[0][0].split("/")[0]
    # a deflated member whose central entry states its true 1 GiB size (the CRC is never reached)
    data = _append_raw_member(rebuild_zip(ms), f"{root}/data/weights/weight_99", bomb, 1 << 30, 0)
    (path / "program.pt2").write_bytes(data)
    resum(path)
    tracemalloc.start()
    try:
        _refused(path, "ratio")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * len(data) + (64 << 20)


def _append_raw_member(archive: bytes, name: str, payload: bytes, size: int, crc: int) -> bytes:
    """Add a deflated member with the given header values to a stored-only archive."""
    import io
    import struct
    import zipfile

    n = len(zipfile.ZipFile(io.BytesIO(archive)).infolist()) + 1
    cd_off = archive.rindex(b"PK\x05\x06")
    cd_start = struct.unpack_from("<I", archive, cd_off + 16)[0]
    body, central = archive[:cd_start], archive[cd_start:cd_off]
    nb = name.encode()
    local = struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 8, 0, 0, crc, len(payload), size,
                        len(nb), 0) + nb
    entry = struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, 8, 0, 0, crc, len(payload),
                        size, len(nb), 0, 0, 0, 0, 0, len(body)) + nb
    new_body = body + local + payload
    new_central = central + entry
    eocd = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, n, n, len(new_central), len(new_body), 0)
    return new_body + new_central + eocd


# -- 8, 9: saves -------------------------------------------------------------------------------------
def _snapshot(path):
    return {n: (path / n).read_bytes() for n in sorted(os.listdir(path))}


@pytest.mark.parametrize("fail_in", ["program", "plan", "disk_full"])
def test_a_failed_save_keeps_the_previous_artifact(saved, monkeypatch, fail_in):
    qm, args, path = saved
    before = _snapshot(path)
    if fail_in == "program":
        monkeypatch.setattr(torch.export, "save", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        exc = KeyboardInterrupt
    elif fail_in == "plan":
        monkeypatch.setattr(type(qm.plan), "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("killed")))
        exc = RuntimeError
    else:
        import errno

        real = os.fsync

        def full(fd):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "fsync", full)
        exc = OSError
        del real
    with pytest.raises(exc):
        qm.save(path)
    monkeypatch.undo()
    assert _snapshot(path) == before
    assert [n for n in os.listdir(path.parent) if n.startswith(".")] == []
    assert torch.equal(vq.load(path)(*args), qm(*args))


def test_save_replaces_an_artifact_whole(saved):
    qm, args, path = saved
    (path / "stale.bin").write_bytes(b"x")
    qm.save(path)
    assert "stale.bin" not in os.listdir(path)
    assert torch.equal(vq.load(path)(*args), qm(*args))


def test_save_refuses_symlinks_and_writes_nothing_through_them(saved, tmp_path):
    qm, _, path = saved
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.remove(path / "report.txt")
    os.symlink(victim, path / "report.txt")
    with pytest.raises(vq.ArtifactError, match="symlink"):
        qm.save(path)
    assert victim.read_text() == "precious"
    link = tmp_path / "link"
    os.symlink(tmp_path / "elsewhere", link)
    with pytest.raises(vq.ArtifactError, match="symlink"):
        qm.save(link)
    assert not (tmp_path / "elsewhere").exists()


def test_save_refuses_a_directory_that_is_not_an_artifact(original, tmp_path):
    qm, _, _ = original
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("years of work")
    with pytest.raises(vq.ArtifactError, match="manifest.json"):
        qm.save(tmp_path / "home")
    assert (tmp_path / "home" / "thesis.tex").read_text() == "years of work"


# -- 10, 11: plan <-> program <-> weights -------------------------------------------------------------
def test_plan_claiming_fp_for_a_quantized_layer_is_refused(saved):
    _, _, path = saved

    def edit(d):
        row = next(r for r in d["layers"] if r["name"] == "fc1")
        row.update(weight_bits=None, act_bits=None, reason="kept FP (claimed)")

    edit_plan(path, edit)
    _refused(path, "fc1.*floating point.*W8A8")


def test_plan_claiming_other_widths_is_refused(saved):
    _, _, path = saved
    edit_plan(path, lambda d: next(r for r in d["layers"] if r["name"] == "fc2").update(weight_bits=4))
    _refused(path, "fc2.*widths")


def test_plan_claiming_a_quantized_layer_the_program_runs_in_fp_is_refused(saved):
    _, _, path = saved

    def edit(d):
        row = next(r for r in d["layers"] if r["name"] == "proj_out")
        row.update(weight_bits=8, act_bits=8, reason=None)

    edit_plan(path, edit)
    _refused(path, "proj_out.*no quantized op")


def test_a_calibration_file_must_be_in_the_manifest(saved):
    _, _, path = saved
    from viditq_compile.calibration.stats import CalibrationStats

    CalibrationStats({"fc1": torch.ones(1, 64)}, {"fc1": torch.zeros(1)}, 1).save(path / "calib.safetensors")
    edit_plan(path, lambda d: d.__setitem__("calibration_file", "calib.safetensors"))
    _refused(path, "calib.safetensors.*not listed")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -1.0])
def test_bad_scales_are_refused_naming_the_tensor(saved, value):
    _, _, path = saved
    w = load_file(str(path / "weights.safetensors"))
    w["state_dict/fc2.viditq_w_scale"][3] = value
    save_file(w, str(path / "weights.safetensors"))
    resum(path)
    _refused(path, "fc2.viditq_w_scale")
