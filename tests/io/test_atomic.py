"""Atomic saves: a failed or killed save keeps the old content byte for byte; symlinks are refused."""

import errno
import os
import subprocess
import sys
import textwrap

import pytest

from viditq_compile.io import atomic
from viditq_compile.io.atomic import UnsafePathError, atomic_directory, atomic_write_bytes, atomic_write_files


def _tree(root):
    """{relative path: bytes} of every file under ``root``."""
    out = {}
    for top, _, names in os.walk(root):
        for n in names:
            p = os.path.join(top, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out


def _leftovers(parent):
    return [n for n in os.listdir(parent) if ".tmp-" in n or ".old-" in n]


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


# ----------------------------------------------------------------------------------------------
# files
def test_write_bytes_creates_and_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "plan.json"
    atomic_write_bytes(p, b"one")
    atomic_write_bytes(str(p), b"two")
    assert p.read_bytes() == b"two"
    assert _leftovers(tmp_path) == []


def test_write_bytes_keeps_the_umask_mode_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "f", b"x")
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "f").st_mode & 0o777) == 0o644


@pytest.mark.parametrize("fail", ["fsync", "write"])
def test_a_full_disk_keeps_the_old_file_byte_identical(tmp_path, monkeypatch, fail):
    p = tmp_path / "calib.safetensors"
    p.write_bytes(b"old content")
    if fail == "fsync":
        monkeypatch.setattr(atomic.os, "fsync", _disk_full)
        data = b"new content"
    else:  # the write itself fails halfway, as on ENOSPC
        real_fdopen = os.fdopen

        class HalfWrite:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, data):
                self.f.write(data[: len(data) // 2])
                _disk_full()

        monkeypatch.setattr(atomic.os, "fdopen", lambda fd, mode: HalfWrite(real_fdopen(fd, mode)))
        data = b"new content"
    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(p, data)
    assert p.read_bytes() == b"old content"
    assert _leftovers(tmp_path) == []


def test_write_files_stages_every_file_before_replacing_any(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"old a")
    b.write_bytes(b"old b")

    def broken_writer(path):
        raise RuntimeError("serializer failed")

    with pytest.raises(RuntimeError, match="serializer failed"):
        atomic_write_files({a: b"new a", b: broken_writer})
    assert a.read_bytes() == b"old a" and b.read_bytes() == b"old b"
    assert _leftovers(tmp_path) == []

    def writer(path):
        with open(path, "wb") as f:
            f.write(b"new b")

    atomic_write_files({a: b"new a", b: writer})
    assert a.read_bytes() == b"new a" and b.read_bytes() == b"new b"


def test_a_symlink_target_file_is_refused_and_what_it_points_to_is_unchanged(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    link = tmp_path / "plan.json"
    link.symlink_to(victim)
    with pytest.raises(UnsafePathError, match="plan.json.*symlink"):
        atomic_write_bytes(link, b"evil")
    assert victim.read_bytes() == b"precious" and link.is_symlink()
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(UnsafePathError, match="symlink"):
        atomic_write_bytes(dangling, b"evil")
    assert not (tmp_path / "nowhere").exists()


def test_a_directory_target_file_is_refused(tmp_path):
    (tmp_path / "plan.json").mkdir()
    with pytest.raises(UnsafePathError, match="not a regular file"):
        atomic_write_bytes(tmp_path / "plan.json", b"x")


# ----------------------------------------------------------------------------------------------
# directories
def _save(path, files, **kwargs):
    with atomic_directory(path, **kwargs) as tmp:
        for name, data in files.items():
            os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)


OLD = {"manifest.json": b"{}", "weights.safetensors": b"w" * 1000, "sub/plan.json": b"[1]"}
NEW = {"manifest.json": b"{\"v\": 2}", "weights.safetensors": b"n" * 10, "report.txt": b"r"}


def test_directory_is_created_then_replaced_wholesale(tmp_path):
    out = tmp_path / "parent" / "artifact"
    _save(out, OLD)
    assert _tree(out) == OLD
    _save(out, NEW)
    assert _tree(out) == NEW  # stale files of the old save are gone
    assert _leftovers(out.parent) == []


def test_directory_replace_without_renameat2_falls_back_to_two_renames(tmp_path, monkeypatch):
    out = tmp_path / "artifact"
    _save(out, OLD)
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    _save(out, NEW)
    assert _tree(out) == NEW and _leftovers(tmp_path) == []


def test_renameat2_exchange_swaps_two_directories_where_linux_has_it(tmp_path):
    if atomic._renameat2() is None:
        pytest.skip("no renameat2 in this libc")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_bytes(b"A")
    (b / "x").write_bytes(b"B")
    if not atomic._exchange(str(a), str(b)):
        pytest.skip("this file system cannot exchange")
    assert (a / "x").read_bytes() == b"B" and (b / "x").read_bytes() == b"A"


def test_a_save_that_raises_halfway_keeps_the_old_directory(tmp_path):
    out = tmp_path / "artifact"
    _save(out, OLD)
    with pytest.raises(RuntimeError, match="halfway"):
        with atomic_directory(out) as tmp:
            with open(os.path.join(tmp, "manifest.json"), "wb") as f:
                f.write(b"half")
            raise RuntimeError("halfway")
    assert _tree(out) == OLD and _leftovers(tmp_path) == []


def test_a_full_disk_while_syncing_keeps_the_old_directory(tmp_path, monkeypatch):
    out = tmp_path / "artifact"
    _save(out, OLD)
    monkeypatch.setattr(atomic.os, "fsync", _disk_full)
    with pytest.raises(OSError, match="No space left"):
        _save(out, NEW)
    assert _tree(out) == OLD and _leftovers(tmp_path) == []


def test_a_process_killed_mid_save_leaves_the_old_directory_and_a_later_save_works(tmp_path):
    out = tmp_path / "artifact"
    _save(out, OLD)
    child = textwrap.dedent(f"""
        import os, signal
        from viditq_compile.io.atomic import atomic_directory
        with atomic_directory({str(out)!r}) as tmp:
            open(os.path.join(tmp, "manifest.json"), "wb").write(b"half")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    r = subprocess.run([sys.executable, "-c", child], capture_output=True)
    assert r.returncode == -9
    assert _tree(out) == OLD
    _save(out, NEW)
    assert _tree(out) == NEW


def test_symlink_directory_target_or_symlink_inside_is_refused(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_bytes(b"precious")
    link = tmp_path / "artifact"
    link.symlink_to(victim)
    with pytest.raises(UnsafePathError, match="symlink"):
        _save(link, NEW)
    assert _tree(victim) == {"keep.txt": b"precious"}

    out = tmp_path / "out"
    _save(out, OLD)
    (out / "weights.safetensors").unlink()
    (out / "weights.safetensors").symlink_to(victim / "keep.txt")
    with pytest.raises(UnsafePathError, match="weights.safetensors"):
        _save(out, NEW)
    assert (victim / "keep.txt").read_bytes() == b"precious" and (out / "weights.safetensors").is_symlink()
    assert _leftovers(tmp_path) == []


def test_a_file_target_and_a_foreign_directory_are_refused(tmp_path):
    f = tmp_path / "file"
    f.write_bytes(b"not a dir")
    with pytest.raises(UnsafePathError, match="not a directory"):
        _save(f, NEW)
    assert f.read_bytes() == b"not a dir"
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_bytes(b"years of work")
    with pytest.raises(UnsafePathError, match="without manifest.json"):
        _save(home, NEW, marker="manifest.json")
    assert _tree(home) == {"thesis.tex": b"years of work"}
    _save(tmp_path / "empty", NEW, marker="manifest.json")  # new and empty targets are fine
