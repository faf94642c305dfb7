"""Atomic saves: a file or a directory is either the old one or the new one, never half written.

``atomic_write_bytes`` and ``atomic_write_files`` stage each file in a temporary file beside it
(same directory, so the rename cannot cross file systems), write, flush and fsync it, then
``os.replace`` it into place and fsync the directory. ``atomic_directory`` does the same for a
whole directory: the caller fills a fresh temporary directory, which then replaces the target in
one rename (an exchange where Linux has ``renameat2``).

Symlinks are refused, never followed: a save to a path that is a symlink, or into a directory
that holds one, raises ``UnsafePathError``. (A rename replaces a symlink rather than writing
through it, so nothing would be written through it anyway; refusing tells the user their path
is not what they think.) A process killed mid-save leaves the old content and, at worst, a
hidden ``.<name>.tmp-XXXXXXXX`` entry beside it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import secrets
import shutil
import stat
import sys
from collections.abc import Callable, Iterator, Mapping

log = logging.getLogger(__name__)

PathLike = str | os.PathLike
Content = bytes | bytearray | memoryview | Callable[[str], None]
"""What ``atomic_write_files`` writes: the bytes, or a writer ``f(temp_path)`` for code that only
writes to a path (it must write the whole file at ``temp_path``)."""

AT_FDCWD = -100
RENAME_EXCHANGE = 2

__all__ = ["UnsafePathError", "atomic_write_bytes", "atomic_write_files", "atomic_directory"]


class UnsafePathError(ValueError):
    """A save target that is a symlink, holds one, or is not the kind of entry expected."""


# ----------------------------------------------------------------------------------------------
# helpers
def _temp_name(parent: str, base: str, kind: str) -> str:
    return os.path.join(parent, f".{base}.{kind}-{secrets.token_hex(4)}")


def _create_temp_file(parent: str, base: str) -> tuple[int, str]:
    """A new file beside the target, opened for writing. Not ``tempfile.mkstemp``: its 0600 mode
    would be kept by the rename; ``O_CREAT | O_EXCL`` with 0666 gives the user's umask, as ``open``
    does, and ``O_NOFOLLOW`` never opens through a planted link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = _temp_name(parent, base, "tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", os.path.join(parent, base))


def _create_temp_dir(parent: str, base: str, kind: str = "tmp") -> str:
    """A new directory beside the target (mode 0777 less the umask, unlike ``mkdtemp``'s 0700)."""
    for _ in range(100):
        tmp = _temp_name(parent, base, kind)
        try:
            os.mkdir(tmp, 0o777)
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", os.path.join(parent, base))


def _fsync_path(path: str, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if directory and e.errno in (errno.EACCES, errno.EPERM, errno.EISDIR):  # no directory fds here
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        # some file systems cannot fsync a directory; the data itself was fsynced before
        if not (directory and e.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF)):
            raise
    finally:
        os.close(fd)


def _split(path: PathLike) -> tuple[str, str, str]:
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    full = os.path.abspath(path)
    parent, base = os.path.split(full)
    if not base:
        raise UnsafePathError(f"cannot save to {path!r}: it names no file")
    return path, parent, base


def _refuse_symlink(path: str, what: str) -> None:
    if os.path.islink(path):
        raise UnsafePathError(f"refusing to save to {path}: {what} is a symlink (to {os.readlink(path)!r}); "
                              f"remove it or save elsewhere")


# ----------------------------------------------------------------------------------------------
# files
def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Replace the file ``path`` with ``data`` atomically (see the module docstring).

    Raises ``UnsafePathError`` when ``path`` is a symlink or an existing non-regular file. On any
    error the previous file is untouched and the temporary file is removed.
    """
    atomic_write_files({path: data})


def atomic_write_files(files: Mapping[PathLike, Content]) -> None:
    """Write several files, each atomically, all staged before any is put in place.

    Every file is written and fsynced to its temporary name first, so a failure while writing (a
    full disk, a serializer that raises) changes none of them. The renames that follow are each
    atomic but not together: a crash between two of them (microseconds) leaves some new and some
    old files.
    """
    targets = []
    for p in files:
        path, parent, base = _split(p)
        _refuse_symlink(path, "the target")
        if os.path.lexists(path) and not stat.S_ISREG(os.lstat(path).st_mode):
            raise UnsafePathError(f"refusing to save to {path}: it exists and is not a regular file")
        targets.append((path, parent, base, files[p]))
    staged: list[tuple[str, str]] = []
    try:
        for path, parent, base, content in targets:
            fd, tmp = _create_temp_file(parent, base)
            staged.append((tmp, path))
            _fill(fd, tmp, content)
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    for parent in sorted({t[1] for t in targets}):
        _fsync_path(parent, directory=True)


def _fill(fd: int, tmp: str, content: Content) -> None:
    if callable(content):
        os.close(fd)
        content(tmp)
        if os.path.islink(tmp) or not os.path.isfile(tmp):
            raise UnsafePathError(f"the writer of {tmp} replaced it with something that is not a regular file")
        _fsync_path(tmp)
        return
    with os.fdopen(fd, "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------
# directories
def _check_target_dir(path: str, marker: str | None) -> None:
    _refuse_symlink(path, "the target directory")
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path):
        raise UnsafePathError(f"refusing to save to {path}: it exists and is not a directory")
    entries = os.listdir(path)
    if marker is not None and entries and marker not in entries:
        raise UnsafePathError(f"refusing to replace {path}: it is a non-empty directory without {marker}, "
                              f"so not an earlier save; remove it or save elsewhere")
    for root, dirs, names in os.walk(path):
        for name in dirs + names:
            p = os.path.join(root, name)
            if os.path.islink(p):
                raise UnsafePathError(f"refusing to replace {path}: it holds a symlink, {p} -> "
                                      f"{os.readlink(p)!r}; remove it or save elsewhere")


def _fsync_tree(root: str) -> None:
    for top, _dirs, names in os.walk(root, topdown=False):
        for name in names:
            p = os.path.join(top, name)
            if stat.S_ISREG(os.lstat(p).st_mode):
                _fsync_path(p)
        _fsync_path(top, directory=True)


_RENAMEAT2: list = []


def _renameat2():
    """libc's ``renameat2`` (glibc >= 2.28), or ``None``."""
    if not _RENAMEAT2:
        fn = None
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(None, use_errno=True).renameat2
                fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                fn.restype = ctypes.c_int
            except (OSError, AttributeError):
                fn = None
        _RENAMEAT2.append(fn)
    return _RENAMEAT2[0]


def _exchange(a: str, b: str) -> bool:
    """Swap the entries ``a`` and ``b`` in one step; ``False`` where the system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # old kernel, or a file system without it
        return False
    raise OSError(err, os.strerror(err), b)


def _put_in_place(tmp: str, path: str, parent: str, base: str) -> None:
    if not os.path.lexists(path):
        os.rename(tmp, path)
        return
    if _exchange(tmp, path):
        shutil.rmtree(tmp)  # the old tree, now under the temporary name
        return
    # No exchange: move the old tree aside, then the new one in. Between the two renames (a few
    # microseconds) ``path`` does not exist; a crash there leaves the old tree at ``.<base>.old-*``.
    old = _temp_name(parent, base, "old")
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    shutil.rmtree(old)


@contextlib.contextmanager
def atomic_directory(path: PathLike, *, marker: str | None = None) -> Iterator[str]:
    """Yield a fresh temporary directory beside ``path``; on normal exit it replaces ``path``.

    The caller writes the files into the yielded directory. On exit every file and directory in it
    is fsynced and it is renamed to ``path`` (swapped with the old ``path`` where Linux has
    ``renameat2(RENAME_EXCHANGE)``, and the old tree deleted). If the block raises, the temporary
    directory is deleted and ``path`` is untouched. The parent directory is created if missing.

    Raises ``UnsafePathError`` when ``path`` is a symlink, exists and is not a directory, holds a
    symlink, or (with ``marker``, e.g. ``"manifest.json"``) is a non-empty directory without that
    file, i.e. not an earlier save that may be replaced wholesale.
    """
    path, parent, base = _split(path)
    _check_target_dir(path, marker)
    os.makedirs(parent, exist_ok=True)
    tmp = _create_temp_dir(parent, base)
    try:
        yield tmp
        _fsync_tree(tmp)
        _check_target_dir(path, marker)  # again: the block may have run for minutes
        _put_in_place(tmp, path, parent, base)
        _fsync_path(parent, directory=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
