"""The one guard for regular expressions that come from a recipe, a plan, role overrides or the command line.

Python's ``re`` backtracks: ``^(([\\w.])+)+!$`` takes exponential time on a layer name of 30 word
characters with no ``!``. ``compile_user_regex`` parses the pattern (``re._parser`` in Python 3.11+,
``sre_parse`` before) and refuses, on the tree rather than the text, the shapes that make
backtracking exponential:

- a quantifier that can repeat (``*``, ``+``, ``{n,}``, ``{m,n}`` with n > 1) around a body that
  holds another variable quantifier: ``(a+)+``, ``(a*)*``, ``(([\\w.])+)+``, ``(\\w+\\.)*``,
  ``(a|b+)+`` (the last two are safe in fact; they are refused with the rest);
- such a quantifier around a body that can match the empty string: ``(a?){30}``, ``(a|)+``;
- such a quantifier around an alternation whose branches can begin with the same character
  (``(a|aa)+``, ``(ab|a|b)+``; a branch that can be empty is compared with what follows it).

Possessive quantifiers (``a++``) and atomic groups (``(?>...)``) never backtrack into what they
matched, so what they hold is checked as if it were not repeated. Not caught: polynomial
backtracking between adjacent quantifiers and backreferences: ``re.search`` of ``\\w*\\w*x`` costs
O(n**3) on n characters, of ``\\w*\\w*\\w*x`` O(n**4). They are bounded by ``MAX_SUBJECT_CHARS``:
``user_search`` refuses longer subjects (module paths are well under 100 characters; at 256 the
cubic pattern takes ~15 ms, the quartic about a second).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from typing import Any

try:  # Python 3.11+
    import re._constants as _c
    import re._parser as _p
except ImportError:  # Python 3.10
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _p  # type: ignore[no-redef]

MAX_PATTERN_CHARS = 1000
MAX_SUBJECT_CHARS = 256
MAX_GROUP_DEPTH = 50

__all__ = ["UserRegexError", "compile_user_regex", "user_search", "MAX_PATTERN_CHARS", "MAX_SUBJECT_CHARS"]


class UserRegexError(ValueError):
    """A user regex that is not a string, too long, invalid or prone to catastrophic backtracking.

    ``kind``: ``"type"``, ``"length"``, ``"invalid"``, ``"backtracking"`` or ``"subject"``;
    ``detail``: the reason without ``where`` and the pattern (for callers that word their own message).
    """

    def __init__(self, message: str, kind: str = "", detail: str = ""):
        super().__init__(message)
        self.kind = kind
        self.detail = detail or message


_HINT = "; such patterns backtrack exponentially: rewrite it without nested or ambiguous repetition"


class _Refused(Exception):
    """Internal: why the tree was refused (``compile_user_regex`` adds where and the pattern)."""


def _quote(pattern: Any, limit: int = 80) -> str:
    text = repr(pattern) if isinstance(pattern, str) else f"<{type(pattern).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def compile_user_regex(pattern: Any, where: str) -> re.Pattern:
    """``re.compile(pattern)`` after the checks of the module docstring; ``where`` names the key, file or
    flag the pattern came from in every error. Compiled patterns are cached."""
    if not isinstance(pattern, str):
        raise UserRegexError(f"{where}: expected a regex string, got {type(pattern).__name__}", "type")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise UserRegexError(f"{where}: regex {_quote(pattern)} has {len(pattern)} characters, more than "
                             f"the {MAX_PATTERN_CHARS} allowed", "length")
    try:
        return _compile_checked(pattern)
    except _Refused as e:
        raise UserRegexError(f"{where}: regex {_quote(pattern)} refused: {e}", "backtracking", str(e)) from None
    except (re.error, RecursionError, OverflowError, ValueError) as e:
        raise UserRegexError(f"{where}: invalid regex {_quote(pattern)}: {e}", "invalid", str(e)) from None


def user_search(pattern: re.Pattern, text: str, where: str) -> re.Match | None:
    """``pattern.search(text)``, refusing a ``text`` longer than ``MAX_SUBJECT_CHARS``."""
    if len(text) > MAX_SUBJECT_CHARS:
        raise UserRegexError(f"{where}: refusing to match regex {_quote(pattern.pattern)} against a "
                             f"{len(text)}-character name (more than {MAX_SUBJECT_CHARS}): {text[:60]!r}...", "subject")
    return pattern.search(text)


@functools.lru_cache(maxsize=1024)
def _compile_checked(pattern: str) -> re.Pattern:
    tree = _p.parse(pattern)
    flags = tree.state.flags if hasattr(tree, "state") else tree.pattern.flags
    _Checker(icase=bool(flags & _c.SRE_FLAG_IGNORECASE) or "(?i" in pattern).walk(list(tree), False, 0)
    return re.compile(pattern)


# ----------------------------------------------------------------------------------------------
# first-character sets: a frozenset of code points and category tags, or ANY
ANY = None
_WIDE_WORD, _WIDE_DIGIT, _WIDE_SPACE = "wide-word", "wide-digit", "wide-space"
_ASCII_DIGIT = frozenset(range(48, 58))
_ASCII_WORD = _ASCII_DIGIT | frozenset(range(65, 91)) | frozenset(range(97, 123)) | {95}
_ASCII_SPACE = frozenset(map(ord, " \t\n\r\f\v"))
_CATEGORY = {
    "CATEGORY_DIGIT": _ASCII_DIGIT | {_WIDE_DIGIT},
    "CATEGORY_WORD": _ASCII_WORD | {_WIDE_WORD, _WIDE_DIGIT},
    "CATEGORY_SPACE": _ASCII_SPACE | {_WIDE_SPACE},
}
_REPEATS = {_c.MAX_REPEAT, _c.MIN_REPEAT}
_POSSESSIVE = getattr(_c, "POSSESSIVE_REPEAT", None)
_ATOMIC = getattr(_c, "ATOMIC_GROUP", None)


def _union(a, b):
    return ANY if a is ANY or b is ANY else a | b


def _overlap(a, b) -> bool:
    if not a and a is not ANY or not b and b is not ANY:
        return False
    return a is ANY or b is ANY or bool(a & b)


def _can_repeat(hi: int) -> bool:
    return hi > 1  # MAXREPEAT for * + {n,}


class _Checker:
    def __init__(self, icase: bool):
        self.icase = icase

    # -- first sets -------------------------------------------------------------------------
    def _char(self, c: int) -> frozenset:
        out: set[int | str] = {c}
        if self.icase:
            out |= {ord(x) for x in (chr(c).lower(), chr(c).upper()) if len(x) == 1}
        if c >= 128:
            ch = chr(c)
            if ch.isalnum() or unicodedata.category(ch).startswith("M"):
                out.add(_WIDE_WORD)
            if ch.isdigit():
                out.add(_WIDE_DIGIT)
            if ch.isspace():
                out.add(_WIDE_SPACE)
        return frozenset(out)

    def _in(self, items) -> frozenset | None:
        out: frozenset = frozenset()
        for op, av in items:
            name = str(op)
            if name == "NEGATE":
                return ANY
            if name == "LITERAL":
                out |= self._char(av)
            elif name == "RANGE":
                lo, hi = av
                if hi - lo > 1024:
                    return ANY
                for c in range(lo, hi + 1):
                    out |= self._char(c)
            elif name == "CATEGORY":
                cat = _CATEGORY.get(str(av).replace("_UNI", ""))
                if cat is None:
                    return ANY
                out |= cat
            else:
                return ANY
        return out

    def first(self, items) -> tuple[frozenset | None, bool]:
        """(characters a match of the sequence ``items`` can begin with, whether it can be empty)."""
        acc: frozenset | None = frozenset()
        for op, av in items:
            f, nullable = self._first1(op, av)
            acc = _union(acc, f)
            if not nullable:
                return acc, False
        return acc, True

    def _first1(self, op, av) -> tuple[frozenset | None, bool]:
        if op == _c.LITERAL:
            return self._char(av), False
        if op == _c.IN:
            return self._in(av), False
        if op in (_c.ANY, _c.NOT_LITERAL):
            return ANY, False
        if op in (_c.AT, _c.ASSERT, _c.ASSERT_NOT):
            return frozenset(), True
        if op == _c.SUBPATTERN:
            return self.first(av[-1])
        if op == _ATOMIC:
            return self.first(av)
        if op in _REPEATS or op == _POSSESSIVE:
            f, nullable = self.first(av[2])
            return f, nullable or av[0] == 0
        if op == _c.BRANCH:
            acc, any_null = frozenset[Any](), False
            for b in av[1]:
                f, n = self.first(b)
                acc, any_null = _union(acc, f), any_null or n
            return acc, any_null
        return ANY, True  # GROUPREF, GROUPREF_EXISTS and anything newer: assume the worst

    # -- the walk ---------------------------------------------------------------------------
    def walk(self, items, in_repeat: bool, depth: int, body_first=frozenset()) -> None:
        """Check the sequence ``items``; ``in_repeat``: it lies inside a repeating quantifier whose body
        begins with ``body_first`` (what may follow the body's end: the next iteration)."""
        if depth > MAX_GROUP_DEPTH:
            raise _Refused(f"groups nested more than {MAX_GROUP_DEPTH} deep")
        for i, (op, av) in enumerate(items):
            if op in _REPEATS:
                lo, hi, body = av
                if in_repeat and _can_repeat(hi) and lo != hi:
                    raise _Refused("a repeated group holds another repeat (nested quantifiers)" + _HINT)
                if _can_repeat(hi):
                    f, nullable = self.first(body)
                    if nullable:
                        raise _Refused("a repeated group can match the empty string" + _HINT)
                    self.walk(body, True, depth + 1, f)
                else:
                    self.walk(body, in_repeat, depth + 1, body_first)
            elif op == _POSSESSIVE or op == _ATOMIC:
                self.walk(av[2] if op == _POSSESSIVE else av, False, depth + 1)
            elif op == _c.SUBPATTERN:
                self.walk(av[-1], in_repeat, depth + 1, body_first)
            elif op == _c.BRANCH:
                branches = av[1]
                if in_repeat:
                    follow, rest_nullable = self.first(items[i + 1:])
                    if rest_nullable:
                        follow = _union(follow, body_first)
                    self._check_branches(branches, follow)
                for b in branches:
                    self.walk(b, in_repeat, depth + 1, body_first)
            elif op in (_c.ASSERT, _c.ASSERT_NOT):
                self.walk(av[1], False, depth + 1)
            elif op == _c.GROUPREF_EXISTS:
                for b in av[1:]:
                    if b is not None:
                        self.walk(b, in_repeat, depth + 1, body_first)

    def _check_branches(self, branches, follow) -> None:
        firsts = []
        for b in branches:
            f, nullable = self.first(b)
            firsts.append(_union(f, follow) if nullable else f)
        for i in range(len(firsts)):
            for j in range(i + 1, len(firsts)):
                if _overlap(firsts[i], firsts[j]):
                    raise _Refused("a repeated alternation has branches that can match the same text" + _HINT)
