"""Tools to tamper with a saved artifact as an attacker would: edit a file, then recompute the
manifest's sizes and checksums so that only the loader's own checks stand in the way."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Callable
from pathlib import Path

MODEL_JSON = "models/model.json"


def resum(path: Path, **changes) -> None:
    """Recompute the manifest entry of every file it lists (plus ``changes`` to its top level)."""
    mpath = path / "manifest.json"
    m = json.loads(mpath.read_text())
    m.update(changes)
    if "files" in m:
        for name in m["files"]:
            data = (path / name).read_bytes()
            m["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    else:
        for name in m["sha256"]:
            m["sha256"][name] = hashlib.sha256((path / name).read_bytes()).hexdigest()
    mpath.write_text(json.dumps(m))


def rebuild_zip(members: list[tuple[str, bytes]], compress: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compress) as z:
        for name, data in members:
            z.writestr(zipfile.ZipInfo(name), data, compress_type=compress)
    return buf.getvalue()


def members(pt2: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(pt2)) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


def edit_pt2(path: Path, edit: Callable[[str, bytes], bytes | None]) -> None:
    """Rewrite ``program.pt2`` member by member (``edit(name, data)``: new bytes, or None to drop)."""
    pt2 = path / "program.pt2"
    out = []
    for name, data in members(pt2.read_bytes()):
        new = edit(name, data)
        if new is not None:
            out.append((name, new))
    pt2.write_bytes(rebuild_zip(out))
    resum(path)


def edit_program_json(path: Path, edit: Callable[[dict], None]) -> None:
    """Apply ``edit`` to the program JSON (``models/model.json``) in place."""

    def change(name: str, data: bytes) -> bytes:
        if name.endswith(MODEL_JSON):
            d = json.loads(data)
            edit(d)
            return json.dumps(d).encode()
        return data

    edit_pt2(path, change)


def edit_plan(path: Path, edit: Callable[[dict], None]) -> None:
    d = json.loads((path / "plan.json").read_text())
    edit(d)
    (path / "plan.json").write_text(json.dumps(d))
    resum(path)


def nodes(d: dict) -> list[dict]:
    return d["graph_module"]["graph"]["nodes"]
