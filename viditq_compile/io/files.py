"""Reading a user's file once, capped, and parsing JSON strictly: the one copy every loader uses.

Each loader (plans, calibration statistics, recipes, artifact manifests, program JSON) has its
own error class; the functions here take it (``error``: message -> exception) so that every
failure surfaces as that loader's error, naming the file, and never as a raw ``OSError``,
``UnicodeDecodeError``, ``RecursionError`` or ``JSONDecodeError``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from viditq_compile.io.yaml_loader import short_repr

__all__ = ["parse_json_strict", "read_capped"]

ErrorFactory = Callable[[str], Exception]


class _Duplicate(Exception):
    """Internal: a duplicate key, raised through ``json.loads`` (not a ValueError, which it wraps)."""


def read_capped(path: str, limit: int, what: str, error: ErrorFactory) -> bytes:
    """The bytes of ``path`` (``what``, e.g. "plan file", names it in errors), read once; at most
    ``limit`` bytes (one more is read to tell a larger file)."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise error(f"{what} {path!r} does not exist (not found)") from None
    except (IsADirectoryError, NotADirectoryError):
        raise error(f"{what} {path!r} is a directory, not a file") from None
    except (OSError, ValueError) as e:  # permissions, a NUL in the path, ...
        raise error(f"{what} {path!r} cannot be read: {e}") from None
    if len(data) > limit:
        raise error(f"{what} {path!r} is larger than {limit} bytes")
    return data


def parse_json_strict(data: bytes | bytearray | memoryview | str, error: ErrorFactory,
                      source: str = "") -> Any:
    """JSON from UTF-8 bytes or text: no duplicate keys, nesting bounded by the parser's recursion
    guard, integers within Python's digit limit; every way that fails is ``error(...)``, prefixed
    with ``source: `` when given."""
    where = f"{source}: " if source else ""

    def no_duplicates(pairs: list) -> dict:
        out = {}
        for k, v in pairs:
            if k in out:
                raise _Duplicate(k)
            out[k] = v
        return out

    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise error(f"{where}not UTF-8 text (offset {e.start}); is it a binary file?") from None
    if not isinstance(data, str):
        raise error(f"{where}expected JSON bytes or text, got {type(data).__name__}")
    try:
        return json.loads(data, object_pairs_hook=no_duplicates)
    except _Duplicate as e:
        raise error(f"{where}duplicate key {short_repr(e.args[0])} in one object") from None
    except json.JSONDecodeError as e:
        raise error(f"{where}not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise error(f"{where}not valid JSON: nested too deeply") from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise error(f"{where}not valid JSON: {' '.join(str(e).split())[:200]}") from None
