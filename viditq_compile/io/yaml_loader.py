"""Bounded YAML: ``load_yaml`` parses a document that may come from anyone in bounded time and memory.

``yaml.safe_load`` constructs only plain data, but it still takes a document of any size, builds
aliases as shared references that a later ``str()`` or traversal expands exponentially (the
"billion laughs": 9 levels of 9 aliases, ~400 bytes, 9**9 leaves), recurses once per nesting level
(``'[' * 100000`` raises ``RecursionError``), keeps the last of two equal mapping keys silently and
lets ``ValueError`` escape from its int / timestamp constructors. ``load_yaml`` refuses all of
these with a ``YamlError`` naming the source, the line and, where there is one, the key.

Limits: ``MAX_BYTES`` of input, ``MAX_DEPTH`` nested collections, ``MAX_ALIASES`` aliases and
``MAX_NODES`` nodes counted with every alias expanded (so what the caller walks is bounded too).
"""

from __future__ import annotations

import reprlib
from typing import Any

import yaml

MAX_BYTES = 1 << 20
MAX_DEPTH = 100
MAX_ALIASES = 100
MAX_NODES = 100_000

__all__ = ["YamlError", "load_yaml", "short_repr"]


class YamlError(ValueError):
    """A YAML document that is malformed or over a limit. ``key`` / ``line`` (1-based) when known."""

    def __init__(self, message: str, key: Any = None, line: int | None = None):
        super().__init__(message)
        self.key = key
        self.line = line


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 3, 4, 6, 6, 6
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 60, 60, 40


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for quoting parsed values in error messages.
    ``reprlib`` stops at a few levels and items, so even a huge or shared value costs little."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _line(node_or_mark) -> int | None:
    mark = getattr(node_or_mark, "start_mark", node_or_mark)
    return mark.line + 1 if mark is not None else None


class _BoundedLoader(yaml.SafeLoader):
    """``SafeLoader`` with the limits of the module docstring and duplicate keys refused."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0
        self._sizes: dict[int, int] = {}  # id(node) -> nodes it stands for, aliases expanded

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise YamlError(f"more than {MAX_ALIASES} aliases (line {_line(mark)}); a recipe needs few or "
                                f"none", line=_line(mark))
            node = super().compose_node(parent, index)
            if id(node) not in self._sizes:  # the anchor's node is still being composed
                raise YamlError(f"recursive alias (line {_line(mark)})", line=_line(mark))
            return node
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise YamlError(f"nested more than {MAX_DEPTH} levels deep (line {_line(mark)})",
                                line=_line(mark))
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        size = 1
        if isinstance(node, yaml.SequenceNode):
            size += sum(self._sizes[id(c)] for c in node.value)
        elif isinstance(node, yaml.MappingNode):
            size += sum(self._sizes[id(k)] + self._sizes[id(v)] for k, v in node.value)
        if size > MAX_NODES:
            raise YamlError(f"expands to more than {MAX_NODES} nodes with its aliases resolved (line "
                            f"{_line(node)}): an alias bomb?", line=_line(node))
        self._sizes[id(node)] = size
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # '<<' merges may be overridden by explicit keys: not a duplicate
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:
                    continue  # unhashable: the base class refuses it with its own message
                if first is not key_node:
                    raise YamlError(f"duplicate key {short_repr(key)} (line {_line(key_node)}; first at line "
                                    f"{_line(first)})", key=key, line=_line(key_node))
        return super().construct_mapping(node, deep=deep)



def load_yaml(text_or_bytes: str | bytes, source: str) -> Any:
    """Parse one YAML document (``source`` names it in every error). Bytes are UTF-8 (a BOM is
    allowed); anything else is refused. Raises ``YamlError``."""
    if isinstance(text_or_bytes, (bytes, bytearray, memoryview)):
        data = bytes(text_or_bytes)
        if len(data) > MAX_BYTES:
            raise YamlError(f"{source}: {len(data)} bytes, more than the {MAX_BYTES} a YAML file may have")
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n") + 1
            raise YamlError(f"{source}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}, "
                            f"line {line}); is it a binary file?", line=line) from None
    elif isinstance(text_or_bytes, str):
        text = text_or_bytes
        if len(text) > MAX_BYTES:
            raise YamlError(f"{source}: {len(text)} characters, more than the {MAX_BYTES} a YAML file may have")
    else:
        raise YamlError(f"{source}: YAML must be str or bytes, got {type(text_or_bytes).__name__}")
    loader = _BoundedLoader(text)
    loader.name = source  # marks in messages name the file, not "<unicode string>"
    try:
        return loader.get_single_data()
    except YamlError as e:
        e.args = (f"{source}: {e}" if not str(e).startswith(source) else str(e),)
        raise
    except yaml.YAMLError as e:
        raise YamlError(f"{source}: not valid YAML: {_one_line(e)}", line=_line(getattr(e, "problem_mark", None))) \
            from None
    except (ValueError, OverflowError, TypeError) as e:  # int('1' * 5000), a bad !!timestamp or !!binary
        raise YamlError(f"{source}: a value cannot be read: {_one_line(e)}") from None
    except RecursionError:  # the depth limit should come first; this is the backstop
        raise YamlError(f"{source}: nested too deeply") from None
    finally:
        loader.dispose()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]
