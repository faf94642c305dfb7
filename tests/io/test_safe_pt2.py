"""check_pt2 refuses .pt2 archives that would execute code in torch.export.load."""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from viditq_compile.io.safe_pt2 import UnsafeArtifactError, check_pt2


class _Evil:
    """Unpickling this runs a shell command: the classic planted-pickle payload."""

    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _LinearRelu(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


class _WithKwargs(_LinearRelu):
    def forward(self, x: torch.Tensor, *, flag: bool = True, bias=None, k: int = 2) -> torch.Tensor:
        y = torch.relu(self.fc(x))
        return y * k if flag else y


class _WithBlob(_LinearRelu):
    """Holds a buffer whose raw bytes are a malicious pickle (stored raw, never unpickled)."""

    def __init__(self, blob: bytes) -> None:
        super().__init__()
        self.register_buffer("blob", torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x)) + self.blob[:1].float() * 0


def _batch_dim() -> dict:
    return {0: torch.export.Dim("batch", min=1, max=64)}


@pytest.fixture(scope="module")
def outdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pt2")


@pytest.fixture(scope="module")
def plain_pt2(outdir: Path) -> Path:
    ep = torch.export.export(_LinearRelu(), (torch.randn(2, 4),), dynamic_shapes={"x": _batch_dim()})
    path = outdir / "plain.pt2"
    torch.export.save(ep, path)
    return path


def _marker(tmp_path: Path) -> Path:
    return tmp_path / "pwned.txt"


def _evil_pickle(marker: Path, protocol: int = pickle.DEFAULT_PROTOCOL) -> bytes:
    return pickle.dumps(_Evil(f"echo pwned > {marker}"), protocol=protocol)


def _evil_torch_save(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save(_Evil(f"echo pwned > {marker}"), buf)
    return buf.getvalue()


def _root(zf: zipfile.ZipFile) -> str:
    return zf.namelist()[0].split("/", 1)[0]


def _rewrite(src: Path, dst: Path, replace: dict[str, bytes] | None = None) -> Path:
    """Copy every member of ``src`` into ``dst``; ``replace`` maps root-relative names
    to new bytes (names not present are added)."""
    replace = dict(replace or {})
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        root = _root(zin)
        for info in zin.infolist():
            rel = info.filename.split("/", 1)[1]
            zout.writestr(info.filename, replace.pop(rel) if rel in replace else zin.read(info))
        for rel, data in replace.items():
            zout.writestr(f"{root}/{rel}", data)
    return dst


def _read_member(path: Path, rel: str) -> bytes:
    with zipfile.ZipFile(path) as zf:
        return zf.read(f"{_root(zf)}/{rel}")


SAMPLE_INPUTS = "data/sample_inputs/model.pt"
WEIGHTS_CONFIG = "data/weights/model_weights_config.json"
CONSTANTS_CONFIG = "data/constants/model_constants_config.json"


# --- genuine archives pass -------------------------------------------------------------------


def test_genuine_export_passes(plain_pt2: Path) -> None:
    check_pt2(plain_pt2)
    check_pt2(str(plain_pt2))


def test_genuine_export_with_kwargs_passes(outdir: Path) -> None:
    dyn = {"x": _batch_dim(), "flag": None, "bias": None, "k": None}
    ep = torch.export.export(_WithKwargs(), (torch.randn(2, 4),), {"flag": False, "bias": None, "k": 3},
                             dynamic_shapes=dyn)
    path = outdir / "kwargs.pt2"
    torch.export.save(ep, path)
    check_pt2(path)


def test_fake_sample_inputs_are_refused(outdir: Path) -> None:
    # torch.export.save writes fake example inputs through its own reducer, whose JSON argument
    # reaches sympy's evaluator when unpickled: not on the allowlist.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        ep = torch.export.export(_LinearRelu(), (torch.randn(2, 4),))
    path = outdir / "fake.pt2"
    torch.export.save(ep, path)
    with pytest.raises(UnsafeArtifactError, match="_reconstruct_fake_tensor"):
        check_pt2(path)


def test_archive_layout_matches_torch() -> None:
    constants = pytest.importorskip("torch.export.pt2_archive.constants")
    from viditq_compile.io import safe_pt2

    assert constants.WEIGHTS_CONFIG_FILENAME_FORMAT == f"{safe_pt2.WEIGHTS_DIR}{{}}{safe_pt2.WEIGHTS_CONFIG_SUFFIX}"
    assert constants.CONSTANTS_CONFIG_FILENAME_FORMAT == (
        f"{safe_pt2.CONSTANTS_DIR}{{}}{safe_pt2.CONSTANTS_CONFIG_SUFFIX}")
    assert constants.SAMPLE_INPUTS_FILENAME_FORMAT.startswith(safe_pt2.SAMPLE_INPUTS_DIR)
    for name in ("AOTINDUCTOR_DIR", "TENSOR_CONSTANT_FILENAME_PREFIX", "CUSTOM_OBJ_FILENAME_PREFIX",
                 "OPAQUE_OBJ_FILENAME_PREFIX"):
        assert getattr(constants, name) == getattr(safe_pt2, name)


def test_raw_weight_that_looks_like_a_pickle_is_not_flagged(outdir: Path, tmp_path: Path) -> None:
    marker = _marker(tmp_path)
    blob = _evil_pickle(marker, protocol=2)
    assert blob.startswith(b"\x80")
    ep = torch.export.export(_WithBlob(blob), (torch.randn(2, 4),))
    path = outdir / "blob.pt2"
    torch.export.save(ep, path)

    config = json.loads(_read_member(path, WEIGHTS_CONFIG))["config"]
    meta = config["blob"]
    assert meta["use_pickle"] is False
    assert _read_member(path, f"data/weights/{meta['path_name']}") == blob

    check_pt2(path)
    # And torch indeed never unpickles it.
    torch.export.load(path)
    assert not marker.exists()


# --- planted archives are refused, and nothing runs ------------------------------------------


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL], ids=["GLOBAL", "STACK_GLOBAL"])
def test_malicious_sample_inputs_pickle_is_refused(plain_pt2: Path, tmp_path: Path, protocol: int) -> None:
    marker = _marker(tmp_path)
    bad = _rewrite(plain_pt2, tmp_path / "bad.pt2", {SAMPLE_INPUTS: _evil_pickle(marker, protocol)})
    with pytest.raises(UnsafeArtifactError) as err:
        check_pt2(bad)
    msg = str(err.value)
    assert "system" in msg and SAMPLE_INPUTS in msg and str(bad) in msg
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_planted_archive_really_runs_code_without_the_check(plain_pt2: Path, tmp_path: Path) -> None:
    # Control: shows the plant above is a real threat for plain torch.export.load.
    marker = _marker(tmp_path)
    bad = _rewrite(plain_pt2, tmp_path / "bad.pt2", {SAMPLE_INPUTS: _evil_pickle(marker)})
    with pytest.raises(Exception):  # noqa: B017 (whatever torch makes of the payload's return value)
        torch.export.load(bad)
    assert marker.exists()


def test_malicious_nested_torch_save_is_refused(plain_pt2: Path, tmp_path: Path) -> None:
    marker = _marker(tmp_path)
    bad = _rewrite(plain_pt2, tmp_path / "bad.pt2", {SAMPLE_INPUTS: _evil_torch_save(marker)})
    with pytest.raises(UnsafeArtifactError, match=r"system") as err:
        check_pt2(bad)
    assert SAMPLE_INPUTS in str(err.value) and "data.pkl" in str(err.value)
    assert not marker.exists()


def test_malicious_opaque_constant_is_refused(plain_pt2: Path, tmp_path: Path) -> None:
    marker = _marker(tmp_path)
    config = {"config": {"evil": {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                                  "tensor_meta": None}}}
    bad = _rewrite(plain_pt2, tmp_path / "bad.pt2", {
        CONSTANTS_CONFIG: json.dumps(config).encode(),
        "data/constants/opaque_obj_0": _evil_pickle(marker),
    })
    with pytest.raises(UnsafeArtifactError, match=r"opaque_obj_0.*system"):
        check_pt2(bad)
    assert not marker.exists()


@pytest.mark.parametrize("payload", ["pickle", "torch_save"])
def test_weight_switched_to_use_pickle_is_refused(plain_pt2: Path, tmp_path: Path, payload: str) -> None:
    marker = _marker(tmp_path)
    config = json.loads(_read_member(plain_pt2, WEIGHTS_CONFIG))
    meta = config["config"]["fc.weight"]
    meta["use_pickle"] = True
    evil = _evil_pickle(marker) if payload == "pickle" else _evil_torch_save(marker)
    bad = _rewrite(plain_pt2, tmp_path / "bad.pt2", {
        WEIGHTS_CONFIG: json.dumps(config).encode(),
        f"data/weights/{meta['path_name']}": evil,
    })
    with pytest.raises(UnsafeArtifactError, match=rf"data/weights/{meta['path_name']}'.*system"):
        check_pt2(bad)
    assert not marker.exists()


def test_pickled_reference_in_other_case_is_refused(plain_pt2: Path, tmp_path: Path) -> None:
    # torch's zip reader looks records up case-insensitively: 'WEIGHT_0' reaches 'weight_0',
    # which another entry declares raw.
    marker = _marker(tmp_path)
    config = json.loads(_read_member(plain_pt2, WEIGHTS_CONFIG))
    path_name = config["config"]["fc.weight"]["path_name"]
    config["config"]["alias"] = dict(config["config"]["fc.weight"], path_name=path_name.upper(), use_pickle=True)
    bad = _rewrite(plain_pt2, tmp_path / "bad.pt2", {
        WEIGHTS_CONFIG: json.dumps(config).encode(),
        f"data/weights/{path_name}": _evil_pickle(marker),
    })
    with pytest.raises(UnsafeArtifactError, match="system"):
        check_pt2(bad)


def test_truthy_non_bool_use_pickle_counts_as_pickled(plain_pt2: Path, tmp_path: Path) -> None:
    config = json.loads(_read_member(plain_pt2, WEIGHTS_CONFIG))
    meta = config["config"]["fc.weight"]
    meta["use_pickle"] = "false"  # torch tests truthiness
    bad = _rewrite(plain_pt2, tmp_path / "bad.pt2", {
        WEIGHTS_CONFIG: json.dumps(config).encode(),
        f"data/weights/{meta['path_name']}": _evil_pickle(_marker(tmp_path)),
    })
    with pytest.raises(UnsafeArtifactError, match="system"):
        check_pt2(bad)


def test_unknown_member_holding_a_pickle_is_scanned(plain_pt2: Path, tmp_path: Path) -> None:
    # Even cut off before STOP: the unpickler would already have run the REDUCE.
    evil = _evil_pickle(_marker(tmp_path), protocol=2)[:-1] + b"\xff\xff"
    bad = _rewrite(plain_pt2, tmp_path / "bad.pt2", {"extra/notes.bin": evil})
    with pytest.raises(UnsafeArtifactError, match=r"extra/notes.bin.*posix.system"):
        check_pt2(bad)


def test_memoized_names_are_resolved(plain_pt2: Path, tmp_path: Path) -> None:
    # A hand-made pickle whose last pushed strings are harmless while STACK_GLOBAL
    # really takes 'posix'/'system' from the memo.
    def s(text: str) -> bytes:
        return b"\x8c" + bytes([len(text)]) + text.encode()

    evil = (b"\x80\x04"
            + s("posix") + b"\x94" + b"0"          # memo[0] = 'posix'; POP
            + s("system") + b"\x94" + b"0"         # memo[1] = 'system'; POP
            + s("collections") + s("OrderedDict") + b"00"
            + b"h\x00" + b"h\x01" + b"\x93"        # BINGET 0, BINGET 1, STACK_GLOBAL
            + s("true") + b"\x85" + b"R" + b".")   # ('true',) REDUCE STOP
    bad = _rewrite(plain_pt2, tmp_path / "bad.pt2", {SAMPLE_INPUTS: evil})
    with pytest.raises(UnsafeArtifactError, match=r"posix\.system"):
        check_pt2(bad)


def test_torchscript_archive_is_refused(plain_pt2: Path, tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps(None, protocol=2))
        zf.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
    bad = _rewrite(plain_pt2, tmp_path / "bad.pt2", {SAMPLE_INPUTS: buf.getvalue()})
    with pytest.raises(UnsafeArtifactError, match="TorchScript"):
        check_pt2(bad)


def test_aotinductor_code_is_refused(plain_pt2: Path, tmp_path: Path) -> None:
    bad = _rewrite(plain_pt2, tmp_path / "bad.pt2", {"data/aotinductor/model/model.so": b"\x7fELF"})
    with pytest.raises(UnsafeArtifactError, match="AOTInductor"):
        check_pt2(bad)


def test_case_insensitive_duplicate_members_are_refused(plain_pt2: Path, tmp_path: Path) -> None:
    bad = _rewrite(plain_pt2, tmp_path / "bad.pt2", {SAMPLE_INPUTS.upper(): b""})
    with pytest.raises(UnsafeArtifactError, match="duplicated"):
        check_pt2(bad)


def test_extra_allowed_globals_extend_the_allowlist(plain_pt2: Path, tmp_path: Path) -> None:
    marker = _marker(tmp_path)
    bad = _rewrite(plain_pt2, tmp_path / "bad.pt2", {SAMPLE_INPUTS: _evil_pickle(marker, protocol=2)})
    check_pt2(bad, extra_allowed_globals=[("posix", "system")])  # only checks, never loads
    assert not marker.exists()


# --- unreadable input --------------------------------------------------------------------------


def test_non_zip_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt2"
    path.write_bytes(b"definitely not a zip archive")
    with pytest.raises(UnsafeArtifactError, match=r"model\.pt2.*not a readable"):
        check_pt2(path)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsafeArtifactError, match="missing.pt2"):
        check_pt2(tmp_path / "missing.pt2")


@pytest.mark.parametrize("payload", [b"\x80\x02}q\x00(X\x01\x00\x00", b"\x80\xff\x00garbage"],
                         ids=["truncated", "garbage"])
def test_malformed_pickle_is_refused(plain_pt2: Path, tmp_path: Path, payload: bytes) -> None:
    bad = _rewrite(plain_pt2, tmp_path / "bad.pt2", {SAMPLE_INPUTS: payload})
    with pytest.raises(UnsafeArtifactError, match=rf"{SAMPLE_INPUTS}.*malformed"):
        check_pt2(bad)


def test_error_type_is_a_value_error() -> None:
    assert issubclass(UnsafeArtifactError, ValueError)
