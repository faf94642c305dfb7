"""Static safety check of a ``.pt2`` archive before ``torch.export.load`` touches it.

``torch.export.load`` (torch 2.13, ``torch/export/pt2_archive/_package.py`` and
``torch/_export/serde/serialize.py``) unpickles parts of the archive with code
execution possible:

* weights / tensor constants whose payload config says ``use_pickle`` go through
  ``torch.load(weights_only=False)``;
* opaque constants (``opaque_obj_*``) go through ``pickle.loads``;
* custom objects (``custom_obj_*``) go through ``torch._C._pickle_load_obj``;
* the sample inputs (``data/sample_inputs/<model>.pt``) go through
  ``torch.load(weights_only=True)`` and, when that fails, ``weights_only=False``;
* AOTInductor members (``data/aotinductor/``) are shared libraries that get
  ``dlopen``-ed.

So a planted ``.pt2`` runs arbitrary code on load. :func:`check_pt2` inspects every
member *without unpickling anything* (``pickletools.genops`` only) and raises
:class:`UnsafeArtifactError` unless every pickle torch could unpickle references
nothing but the handful of globals that plain tensor storage needs; AOTInductor
native code and TorchScript archives are refused outright.

Only raw tensor payloads (``use_pickle: false`` in the archive's payload configs)
are exempt: torch copies their bytes into a storage and never unpickles them,
even if they happen to look like a pickle.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickletools
import struct
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["ALLOWED_GLOBALS", "UnsafeArtifactError", "check_pt2"]


class UnsafeArtifactError(ValueError):
    """A ``.pt2`` archive was refused because loading it could execute code.

    Raised when the archive cannot be read, contains a pickle that references a
    global outside the allowlist (e.g. ``posix.system``), contains a pickle that
    cannot be parsed, or carries native code (AOTInductor shared libraries,
    TorchScript archives). The message names the archive, the member and the cause.
    """


# Archive layout, mirroring torch/export/pt2_archive/constants.py. Spelled out
# rather than imported because it is an on-disk format (stable) and the module
# is absent from older torch releases we still support.
WEIGHTS_DIR = "data/weights/"
CONSTANTS_DIR = "data/constants/"
SAMPLE_INPUTS_DIR = "data/sample_inputs/"
AOTINDUCTOR_DIR = "data/aotinductor/"
WEIGHTS_CONFIG_SUFFIX = "_weights_config.json"  # WEIGHTS_CONFIG_FILENAME_FORMAT
CONSTANTS_CONFIG_SUFFIX = "_constants_config.json"  # CONSTANTS_CONFIG_FILENAME_FORMAT
TENSOR_CONSTANT_FILENAME_PREFIX = "tensor_"
CUSTOM_OBJ_FILENAME_PREFIX = "custom_obj_"
OPAQUE_OBJ_FILENAME_PREFIX = "opaque_obj_"

_ZIP_MAGIC = b"PK\x03\x04"  # what torch.serialization._is_zipfile tests for

_TYPED_STORAGES = (
    "DoubleStorage", "FloatStorage", "HalfStorage", "BFloat16Storage",
    "LongStorage", "IntStorage", "ShortStorage", "CharStorage", "ByteStorage",
    "BoolStorage", "ComplexDoubleStorage", "ComplexFloatStorage",
)


def _dtype_names() -> set[str]:
    # torch pickles a dtype as the global ``torch.<name>`` (e.g. torch.float8_e4m3fn).
    return {name for name, value in vars(torch).items() if isinstance(value, torch.dtype)}


#: ``(module, qualified name)`` pairs a pickle may reference: exactly what
#: ``torch.save`` emits for dense tensors, parameters, devices, dtypes and
#: containers of them (sample inputs, tensor-subclass-free weights). Everything
#: here only builds values; none of it can reach an interpreter, the file system
#: or an import of an arbitrary module. Not here: the fake-tensor reducer
#: ``torch.export.save`` uses for fake sample inputs
#: (``torch._export.serde.serialize._reconstruct_fake_tensor``), whose JSON
#: argument goes through sympy's evaluator.
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor_v3"),  # dtypes without a typed storage (float8, uint16...)
        ("torch._utils", "_rebuild_parameter"),
        ("collections", "OrderedDict"),  # the (empty) backward-hooks argument of every tensor
        ("torch.storage", "UntypedStorage"),
        ("torch", "device"),
        ("torch", "Size"),
    }
    | {("torch", name) for name in _TYPED_STORAGES}
    | {("torch", name) for name in _dtype_names()}
)


class _Refusal(Exception):
    """Internal: why one pickle stream was refused (wrapped into UnsafeArtifactError)."""


class _Malformed(_Refusal):
    """Internal: the stream is not a parseable pickle."""


# Sentinels of the abstract pickle stack: a MARK, and a value we do not track.
_MARK = object()
_UNKNOWN = object()

# Opcodes that push a str the real unpickler may hand to STACK_GLOBAL
# (torch.load decodes py2 STRING/BINSTRING to str too).
_STRING_OPS = frozenset(
    {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"}
)
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
# copyreg's extension registry maps these codes to arbitrary globals.
_EXT_OPS = frozenset({"EXT1", "EXT2", "EXT4"})


def _genops(stream: io.BytesIO) -> Iterator[tuple[pickletools.OpcodeInfo, Any]]:
    ops = pickletools.genops(stream)
    while True:
        try:
            opcode, arg, _pos = next(ops)
        except StopIteration:
            return
        except (ValueError, struct.error, EOFError, OverflowError) as exc:
            raise _Malformed(f"is a malformed pickle ({exc})") from exc
        yield opcode, arg


def _check_global(module: str, name: str, allowed: frozenset[tuple[str, str]]) -> None:
    if (module, name) not in allowed:
        raise _Refusal(f"references forbidden global '{module}.{name}'")


def _scan_one_pickle(stream: io.BytesIO, allowed: frozenset[tuple[str, str]]) -> None:
    """Walk one pickle (up to STOP) and refuse any global outside ``allowed``.

    Globals are checked as they are met, so a stream that breaks off later is
    still refused if the part the real unpickler would execute first is unsafe.
    STACK_GLOBAL takes its names from the stack, so the stack and memo are
    simulated abstractly: strings are tracked, everything else is _UNKNOWN.
    """
    stack: list[object] = []
    memo: dict[int, object] = {}

    # Like the unpickler, a value is never taken from below a MARK; where it would
    # raise we stop too, so our stack never drifts from the real one.
    def top() -> object:
        if not stack or stack[-1] is _MARK:
            raise _Malformed("is a malformed pickle (stack underflow)")
        return stack[-1]

    def pop() -> object:
        value = top()
        stack.pop()
        return value

    def pop_mark() -> None:
        while stack:
            if stack.pop() is _MARK:
                return
        raise _Malformed("is a malformed pickle (no MARK)")

    for opcode, arg in _genops(stream):
        name = opcode.name
        if name in _EXT_OPS:
            raise _Refusal(f"uses copyreg extension code {arg} (opcode {name})")
        if name in ("GLOBAL", "INST"):
            # pickletools joins the two newline-terminated names with a space.
            parts = str(arg).split(" ")
            if len(parts) != 2:
                raise _Refusal(f"references forbidden global {str(arg)!r}")
            _check_global(parts[0], parts[1], allowed)
        if name == "STACK_GLOBAL":
            qualname, module = pop(), pop()
            if not (isinstance(module, str) and isinstance(qualname, str)):
                raise _Refusal("uses STACK_GLOBAL with names that cannot be resolved statically")
            _check_global(module, qualname, allowed)
            stack.append(_UNKNOWN)
        elif name in _STRING_OPS:
            stack.append(arg)
        elif name == "DUP":
            stack.append(top())
        elif name == "MEMOIZE":
            # Same numbering as the unpickler: the number of memo entries so far.
            memo[len(memo)] = top()
        elif name in _PUT_OPS:
            memo[arg] = top()
        elif name in _GET_OPS:
            if arg not in memo:
                raise _Malformed(f"is a malformed pickle (memo key {arg} never stored)")
            stack.append(memo[arg])
        elif name == "MARK":
            stack.append(_MARK)
        elif name == "POP" and stack and stack[-1] is _MARK:
            stack.pop()  # the unpickler's POP discards a bare MARK
        else:
            before = opcode.stack_before
            if pickletools.markobject in before:
                # Everything above the mark, the mark, then what sits below it (e.g. the list of APPENDS).
                pop_mark()
                for _ in range(before.index(pickletools.markobject)):
                    pop()
            else:
                for _ in before:
                    pop()
            stack.extend(_UNKNOWN for _ in opcode.stack_after)


def _scan_pickle_stream(data: bytes, allowed: frozenset[tuple[str, str]]) -> None:
    """Scan every pickle in ``data``, back to back.

    Legacy ``torch.load`` reads several consecutive pickles from one stream, so
    bytes after the first STOP must be pickles too.
    """
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        _scan_one_pickle(stream, allowed)


def _ascii_lower(name: str) -> str:
    # torch's zip reader (miniz, flags 0) looks records up ASCII-case-insensitively.
    return "".join(c.lower() if c.isascii() else c for c in name)


def _record_name(member: str) -> str:
    """The name torch's reader uses for a member: without the archive's root folder."""
    root, sep, rest = member.partition("/")
    return _ascii_lower(rest if sep else root)


def _read(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    with zf.open(info) as fh:
        return fh.read()


_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, RuntimeError,
               NotImplementedError, ValueError, zlib.error)


class _PayloadRefs:
    """Which payload files the archive's configs declare raw vs pickled (record names)."""

    def __init__(self) -> None:
        self.raw: set[str] = set()
        self.pickled: set[str] = set()

    def add_config(self, text: bytes, directory: str, is_constants: bool) -> None:
        config = json.loads(text)["config"]
        if not isinstance(config, dict):
            raise TypeError("'config' is not an object")
        for entry in config.values():
            path_name = entry["path_name"]
            if not isinstance(path_name, str):
                raise TypeError("'path_name' is not a string")
            record = _ascii_lower(os.path.join(directory, path_name))  # as torch joins it
            # torch tests the flag for truthiness, so only a literal false is raw; among
            # constants only tensor_* payloads are ever read raw.
            raw = entry.get("use_pickle", True) is False
            if is_constants and not path_name.startswith(TENSOR_CONSTANT_FILENAME_PREFIX):
                raw = False
            (self.raw if raw else self.pickled).add(record)

    def is_raw(self, record: str) -> bool:
        return record in self.raw and record not in self.pickled


def _is_unpickled_by_torch(record: str, refs: _PayloadRefs) -> bool:
    """Whether torch.export.load (or its legacy-format fallback) would unpickle this record."""
    base = record.rsplit("/", 1)[-1]
    return (
        record.endswith((".pt", ".pkl"))  # sample inputs, legacy weights/constants/.pt files
        or record.startswith(SAMPLE_INPUTS_DIR)
        or (record.startswith(CONSTANTS_DIR)
            and base.startswith((OPAQUE_OBJ_FILENAME_PREFIX, CUSTOM_OBJ_FILENAME_PREFIX)))
        or record in refs.pickled
    )


def _scan_nested_zip(data: bytes, allowed: frozenset[tuple[str, str]]) -> tuple[str, str] | None:
    """Scan each .pkl inside a torch.save / _pickle_save zip; return (inner name, reason) to refuse."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as inner:
            infos = inner.infolist()
            if any(_record_name(info.filename) == "constants.pkl" for info in infos):
                # torch.load hands such an archive to torch.jit.load (TorchScript code).
                return "", "is a TorchScript archive, which torch.load would run through torch.jit.load"
            for info in infos:
                if not _ascii_lower(info.filename).endswith(".pkl"):
                    continue  # storages (data/0, ...) are raw bytes, never unpickled
                try:
                    _scan_pickle_stream(_read(inner, info), allowed)
                except _Refusal as exc:
                    return info.filename, str(exc)
    except _ZIP_ERRORS as exc:
        return "", f"is a zip torch would open but that cannot be read ({exc})"
    return None


def _member_refusal(data: bytes, strict: bool, allowed: frozenset[tuple[str, str]]) -> tuple[str, str] | None:
    """Return (inner member, reason) if ``data`` must be refused, else None."""
    if data.startswith(_ZIP_MAGIC):
        # torch.load decides zip vs pickle on these four bytes alone.
        return _scan_nested_zip(data, allowed)
    try:
        _scan_pickle_stream(data, allowed)
    except _Malformed as exc:
        if strict:
            return "", str(exc)
        # Not a pickle. The prefix before the parse error was still checked, which
        # is all an unpickler would have executed.
        logger.debug("member is not a pickle: %s", exc)
    except _Refusal as exc:
        return "", str(exc)
    return None


def check_pt2(
    path: str | os.PathLike[str],
    *,
    extra_allowed_globals: Iterable[tuple[str, str]] = (),
) -> None:
    """Refuse a ``.pt2`` archive that could execute code when ``torch.export.load``-ed.

    Every member is inspected statically (nothing is unpickled): any pickle torch
    might unpickle, raw or inside a nested ``torch.save`` zip, may only reference
    :data:`ALLOWED_GLOBALS` (plus ``extra_allowed_globals``, ``(module, qualname)``
    pairs, e.g. for a trusted tensor subclass). Raw tensor payloads declared
    ``use_pickle: false`` are skipped.

    Raises:
        UnsafeArtifactError: naming the archive, the member and the cause.
    """
    shown = os.fspath(path)
    allowed = ALLOWED_GLOBALS | frozenset((m, q) for m, q in extra_allowed_globals)

    def refuse(member: str, inner: str, reason: str) -> UnsafeArtifactError:
        where = f" ({inner})" if inner else ""
        return UnsafeArtifactError(f"{shown}: member '{member}'{where} {reason}")

    try:
        zf = zipfile.ZipFile(path)
    except _ZIP_ERRORS as exc:
        raise UnsafeArtifactError(f"{shown}: not a readable .pt2 zip archive ({exc})") from exc

    with zf:
        infos = zf.infolist()
        # Duplicate (case-insensitive) names would let torch read another copy than we checked.
        seen: set[str] = set()
        for info in infos:
            key = _ascii_lower(info.filename)
            if key in seen:
                raise refuse(info.filename, "", "is duplicated (names compare case-insensitively)")
            seen.add(key)

        def read(info: zipfile.ZipInfo) -> bytes:
            try:
                return _read(zf, info)
            except _ZIP_ERRORS as exc:
                raise refuse(info.filename, "", f"cannot be read ({exc})") from exc

        refs = _PayloadRefs()
        for info in infos:
            record = _record_name(info.filename)
            for directory, suffix in ((WEIGHTS_DIR, WEIGHTS_CONFIG_SUFFIX), (CONSTANTS_DIR, CONSTANTS_CONFIG_SUFFIX)):
                if record.startswith(directory) and record.endswith(suffix):
                    text = read(info)
                    try:
                        refs.add_config(text, directory, is_constants=directory == CONSTANTS_DIR)
                    except (ValueError, KeyError, TypeError, AttributeError) as exc:
                        raise refuse(info.filename, "", f"is not a valid payload config ({exc!r})") from exc

        scanned = 0
        for info in infos:
            record = _record_name(info.filename)
            if info.is_dir():
                continue
            if record.startswith(AOTINDUCTOR_DIR):
                raise refuse(info.filename, "", "is AOTInductor native code, which torch.export.load would load")
            strict = _is_unpickled_by_torch(record, refs)
            if not strict and refs.is_raw(record):
                continue  # raw tensor bytes: copied into a storage, never unpickled
            refusal = _member_refusal(read(info), strict, allowed)
            if refusal is not None:
                raise refuse(info.filename, *refusal)
            scanned += 1
    logger.debug("%s: %d members checked, %d scanned for pickles", shown, len(infos), scanned)
