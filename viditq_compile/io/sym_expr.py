"""A small grammar for the two kinds of code a ``.pt2`` program carries as text.

torch's deserializer hands symbolic sizes (``expr_str``) to ``sympy.sympify``, which evaluates
Python, and ``ExportedProgram.module()`` executes ``guards_code`` strings. Neither may see text an
attacker wrote. Both are parsed here by a grammar that knows only integers, symbol names, a fixed
set of sympy constructors and arithmetic / comparison operators, and are then **printed back from
the parse tree**: what torch evaluates is text this module generated, never the file's.

- ``canonical_sym_expr(text)``: sympy expressions as torch serializes them, in ``srepr`` form
  (``Mul(Integer(64), Symbol('s27', positive=True, integer=True))``) or infix form
  (``64*s27``, ``FloorDiv(s0, 2)``, older torch releases).
- ``canonical_guard(text)``: shape guards as ``ShapeGuardPythonPrinter`` emits them
  (``L['x'].size()[0] == L['scale'].size()[0]``, ``2 <= L['x'].size()[1]``).

Anything else raises ``SymExprError``. Both are bounded in length, depth and node count.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = ["SymExprError", "canonical_guard", "canonical_sym_expr", "MAX_EXPR_CHARS"]

MAX_EXPR_CHARS = 4096
_MAX_DEPTH = 64

# sympy / torch.utils._sympy constructors a serialized size may use (what torch's deserializer
# puts in sympify's namespace, minus the float ones, plus sympy's own spelling of integers and
# relations). None of them does anything but build an expression.
SYMPY_FUNCTIONS = frozenset({
    "Symbol", "Integer", "Add", "Mul", "Pow", "Min", "Max", "Abs",
    "FloorDiv", "CeilDiv", "CleanDiv", "Mod", "PythonMod", "ModularIndexing", "IntTrueDiv",
    "PowByNatural", "Where", "CeilToInt", "FloorToInt", "TruncToInt", "Identity",
    "Equality", "Unequality", "StrictLessThan", "LessThan", "StrictGreaterThan", "GreaterThan",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not",
})
_SYMPY_CONSTANTS = frozenset({"true", "false", "oo", "zoo", "nan", "True", "False"})
_SYMBOL_KWARGS = frozenset({"positive", "integer", "nonnegative", "negative", "real", "finite",
                            "nonzero", "zero", "commutative"})
# torch's symbol names: s0, s27, u3, zuf0, ... (a short lowercase prefix and a number)
_SYMBOL_NAME = re.compile(r"[a-z]{1,4}[0-9]{1,9}\Z")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,200}\Z")
_GUARD_CALLS = frozenset({"max", "min", "abs", "math.trunc", "math.floor", "math.ceil", "math.sqrt",
                          "torch.sym_float", "torch.sym_int", "torch.sym_max", "torch.sym_min",
                          "torch.sym_not", "torch.sym_sqrt", "torch._sym_sqrt"})

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<float>[0-9]+\.[0-9]+(?:e[-+]?[0-9]+)?)
  | (?P<int>[0-9]+)
  | (?P<str>'[A-Za-z_][A-Za-z0-9_]*')
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>//|\*\*|==|!=|<=|>=|[-+*/%<>(),\[\].=])
""", re.VERBOSE)


class SymExprError(ValueError):
    """A symbolic expression or guard outside the grammar (the message quotes it, truncated)."""


@dataclass(frozen=True)
class _Tok:
    kind: str
    text: str


def _short(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")


def _tokens(text: str) -> list[_Tok]:
    if not isinstance(text, str):
        raise SymExprError(f"expected a string, got {type(text).__name__}")
    if len(text) > MAX_EXPR_CHARS:
        raise SymExprError(f"expression of {len(text)} characters (at most {MAX_EXPR_CHARS})")
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise SymExprError(f"unexpected character {text[pos]!r} at {pos} in {_short(text)}")
        pos = m.end()
        if m.lastgroup != "ws":
            out.append(_Tok(m.lastgroup or "", m.group()))
    return out


class _Parser:
    """Precedence climbing over the tokens; every method returns canonical text."""

    _BINARY = {"or": 1, "and": 2, "==": 4, "!=": 4, "<": 4, "<=": 4, ">": 4, ">=": 4,
               "+": 5, "-": 5, "*": 6, "//": 6, "%": 6, "/": 6, "**": 8}

    def __init__(self, text: str, guard: bool):
        self.text, self.guard = text, guard
        self.toks = _tokens(text)
        self.i = 0
        self.depth = 0

    def fail(self, why: str) -> SymExprError:
        return SymExprError(f"{why} in {_short(self.text)}")

    def peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, text: str | None = None, kind: str | None = None) -> _Tok:
        t = self.peek()
        if t is None or (text is not None and t.text != text) or (kind is not None and t.kind != kind):
            raise self.fail(f"expected {text or kind}, found {t.text if t else 'the end'!r}")
        self.i += 1
        return t

    def parse(self) -> str:
        out = self.expr(0)
        if (nxt := self.peek()) is not None:
            raise self.fail(f"unexpected {nxt.text!r}")
        return out

    def expr(self, min_prec: int) -> str:
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise self.fail(f"nesting deeper than {_MAX_DEPTH}")
        left = self.unary()
        while True:
            t = self.peek()
            op = t.text if t is not None and (t.kind == "op" or t.text in ("and", "or")) else None
            prec = self._BINARY.get(op) if op else None
            if prec is None or prec < min_prec:
                break
            if op in ("and", "or") and not self.guard:
                raise self.fail(f"operator {op!r}")
            if op == "/" and self.guard:
                raise self.fail("true division")
            self.i += 1
            right = self.expr(prec + 1 if op != "**" else prec)
            left = f"{left} {op} {right}"
        self.depth -= 1
        return left

    def unary(self) -> str:
        t = self.peek()
        if t is not None and t.text == "-":
            self.i += 1
            return f"-{self.unary()}"
        if t is not None and t.text == "not" and self.guard:
            self.i += 1
            return f"not {self.unary()}"
        return self.atom()

    def atom(self) -> str:
        t = self.take()
        if t.kind == "int":
            if len(t.text) > 40:
                raise self.fail("integer literal too long")
            return str(int(t.text))
        if t.kind == "float":
            value = float(t.text)
            if not self.guard or len(t.text) > 40 or not math.isfinite(value):
                raise self.fail(f"float literal {t.text!r}")
            return repr(value)
        if t.text == "(":
            inner = self.expr(0)
            self.take(")")
            return f"({inner})"
        if t.kind != "name":
            raise self.fail(f"unexpected {t.text!r}")
        return self.guard_name(t.text) if self.guard else self.sympy_name(t.text)

    def sympy_name(self, name: str) -> str:
        nxt = self.peek()
        if nxt is not None and nxt.text == "(":
            if name not in SYMPY_FUNCTIONS:
                raise self.fail(f"function {name!r} is not a sympy constructor torch emits")
            return self.sympy_call(name)
        if name in _SYMPY_CONSTANTS:
            return name
        if _SYMBOL_NAME.match(name) is None:
            raise self.fail(f"name {name!r} is not a symbol name (s0, u3, ...)")
        return name

    def sympy_call(self, name: str) -> str:
        self.take("(")
        args: list[str] = []
        if name == "Symbol":
            s = self.take(kind="str").text
            if _SYMBOL_NAME.match(s[1:-1]) is None:
                raise self.fail(f"symbol name {s} is not a symbol name (s0, u3, ...)")
            args.append(s)
            while (nxt := self.peek()) is not None and nxt.text == ",":
                self.take(",")
                key = self.take(kind="name").text
                if key not in _SYMBOL_KWARGS:
                    raise self.fail(f"Symbol assumption {key!r}")
                self.take("=")
                value = self.take(kind="name").text
                if value not in ("True", "False"):
                    raise self.fail(f"Symbol assumption {key}={value}")
                args.append(f"{key}={value}")
        elif (nxt := self.peek()) is not None and nxt.text != ")":
            args.append(self.expr(0))
            while (nxt := self.peek()) is not None and nxt.text == ",":
                self.take(",")
                args.append(self.expr(0))
        self.take(")")
        if name == "Integer" and (len(args) != 1 or re.fullmatch(r"-?[0-9]+", args[0]) is None):
            raise self.fail("Integer() takes one integer literal")
        return f"{name}({', '.join(args)})"

    def guard_name(self, name: str) -> str:
        if name == "L":
            self.take("[")
            key = self.take(kind="str").text
            self.take("]")
            out = f"L[{key}]"
            while (nxt := self.peek()) is not None and nxt.text == "[":  # into tuples / dicts of inputs
                self.take("[")
                t = self.take()
                if t.kind not in ("int", "str"):
                    raise self.fail(f"index {t.text!r}")
                self.take("]")
                out += f"[{int(t.text) if t.kind == 'int' else t.text}]"
            self.take(".")
            method = self.take(kind="name").text
            self.take("(")
            self.take(")")
            if method in ("size", "stride"):
                self.take("[")
                index = self.take(kind="int").text
                self.take("]")
                return f"{out}.{method}()[{int(index)}]"
            if method == "storage_offset":
                return f"{out}.storage_offset()"
            raise self.fail(f"tensor method {method!r}")
        if name in ("True", "False"):
            return name
        if name in ("math", "torch") and (nxt := self.peek()) is not None and nxt.text == ".":
            self.take(".")
            name = f"{name}.{self.take(kind='name').text}"
        if name in _GUARD_CALLS:
            self.take("(")
            args = [self.expr(0)]
            while (nxt := self.peek()) is not None and nxt.text == ",":
                self.take(",")
                args.append(self.expr(0))
            self.take(")")
            return f"{name}({', '.join(args)})"
        raise self.fail(f"name {name!r}")


def canonical_sym_expr(text: str) -> str:
    """``text`` (a serialized sympy expression) re-printed from its parse tree, or ``SymExprError``."""
    return _Parser(text, guard=False).parse()


def canonical_guard(text: str) -> str:
    """``text`` (a guard from ``guards_code``) re-printed from its parse tree, or ``SymExprError``."""
    return _Parser(text, guard=True).parse()


def is_identifier(name: object) -> bool:
    """A plain Python identifier (what torch uses for node, argument and symbol names)."""
    import keyword

    return isinstance(name, str) and _IDENT.match(name) is not None and not keyword.iskeyword(name)
