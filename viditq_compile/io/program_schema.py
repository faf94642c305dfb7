"""The program JSON of a ``.pt2`` (``models/<name>.json``), validated before torch reads it.

torch's deserializer trusts this JSON: it resolves ``target`` strings by walking attributes of
``torch`` (``torch.serialization.os.system`` is reachable), hands symbolic sizes to
``sympy.sympify`` and guard strings to ``exec``, and ignores keys it does not know. Here the JSON
is checked against torch's own schema dataclasses **strictly** (known keys only, exact types, one
key per union, enum values in range) and converted to them by this module, then:

- every graph target is on the allowlist: ``viditq`` ops, ATen ops whose schema mutates nothing
  and that touch nothing outside the tensors they get (``aten.from_file`` and friends are out),
  a few ``operator`` / ``torch.sym_*`` functions of symbolic sizes; no higher-order ops, no
  subgraphs, no custom objects, no operator-valued arguments;
- every name torch turns into Python source (node, value, argument and forward-argument names)
  is a plain identifier; module paths are dotted identifiers;
- every symbolic expression and every guard is parsed by ``sym_expr``'s grammar and **replaced by
  the text printed back from the parse**; pytree specs are re-checked (containers registered in
  this process only, contexts of plain names and numbers); node metadata other than the module
  stack is dropped.

``validate_program`` returns the ``torch._export.serde.schema.ExportedProgram`` dataclass that
torch's ``ExportedProgramDeserializer`` takes. ``ProgramError`` names the JSON path and the cause.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import re
import typing
from enum import IntEnum
from typing import Any

import torch

from viditq_compile.io.files import parse_json_strict
from viditq_compile.io.sym_expr import SymExprError, canonical_guard, canonical_sym_expr, is_identifier
from viditq_compile.ops import schema as op_schema

__all__ = ["ProgramError", "allowed_target", "parse_json", "validate_program"]

_DOTTED = re.compile(r"[A-Za-z0-9_]{1,200}(\.[A-Za-z0-9_]{1,200}){0,64}\Z")
_MODULE_STACK = re.compile(r"[\x20-\x7e]{0,65536}\Z")  # split by torch, never run: printable ASCII
_KEPT_METADATA = frozenset({"nn_module_stack"})
_DROPPED_METADATA = frozenset({"stack_trace", "torch_fn", "from_node", "source_fn_stack", "custom",
                               "seq_nr", "partitioner_tag"})
_CONTEXT_STR = re.compile(r"[A-Za-z0-9_.\-]{0,200}\Z")
_OPERATOR_FUNCTIONS = frozenset({"getitem", "add", "sub", "mul", "floordiv", "mod", "truediv", "neg",
                                 "pos", "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_",
                                 "pow", "abs"})
_TORCH_FUNCTIONS = frozenset({"sym_max", "sym_min", "sym_not", "sym_float", "sym_int", "sym_ite",
                              "sym_sum", "_sym_sqrt"})
_MATH_FUNCTIONS = frozenset({"ceil", "floor", "trunc"})
# ATen ops that mutate nothing yet reach outside their tensors (files, the process, the host).
_ATEN_DENIED = frozenset({"from_file", "_print", "save", "_cufft_set_plan_cache_max_size",
                          "_cufft_clear_plan_cache", "set_num_threads", "_set_deterministic"})
_REFUSED_ARGUMENTS = frozenset({"as_graph", "as_custom_obj", "as_operator"})
_MAX_JSON_DEPTH = 200


class ProgramError(ValueError):
    """The program JSON is outside what ``vq.load`` accepts (the message names where and why)."""


def parse_json(data: bytes, source: str) -> Any:
    """Strict JSON (``files.parse_json_strict``): UTF-8, no duplicate keys, bounded nesting."""
    return parse_json_strict(data, ProgramError, source)


def allowed_target(target: object) -> bool:
    """Whether a graph node may call ``target`` (a serialized target string)."""
    if not isinstance(target, str) or len(target) > 300:
        return False
    parts = target.split(".")
    if parts[0] == "_operator":
        return len(parts) == 2 and parts[1] in _OPERATOR_FUNCTIONS
    if parts[0] == "math":
        return len(parts) == 2 and parts[1] in _MATH_FUNCTIONS
    if parts[:1] == ["torch"] and len(parts) == 2:
        return parts[1] in _TORCH_FUNCTIONS
    if parts[:2] != ["torch", "ops"] or len(parts) != 5 or not all(is_identifier(p) for p in parts):
        return False
    ns, name, overload = parts[2:]
    if ns not in ("aten", op_schema.NAMESPACE) or (ns == op_schema.NAMESPACE and name not in op_schema.BY_NAME):
        return False
    packet = getattr(getattr(torch.ops, ns), name, None) if hasattr(torch.ops, ns) else None
    op = getattr(packet, overload, None) if isinstance(packet, torch._ops.OpOverloadPacket) else None
    if not isinstance(op, torch._ops.OpOverload):
        return False
    if ns == op_schema.NAMESPACE:
        return True
    schema = op._schema
    if name in _ATEN_DENIED or schema.is_mutable or overload == "out" or name.endswith("_"):
        return False
    return not any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


class _Walker:
    """Checks and canonicalizes the JSON in place (see the module docstring)."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, path: str, why: str) -> ProgramError:
        return ProgramError(f"{self.source}: {path}: {why}")

    def ident(self, value: Any, path: str) -> None:
        if not is_identifier(value):
            raise self.fail(path, f"{_short(value)} is not a plain identifier")

    def dotted(self, value: Any, path: str, empty_ok: bool = False) -> None:
        if not (isinstance(value, str) and (_DOTTED.match(value) or (empty_ok and value == ""))):
            raise self.fail(path, f"{_short(value)} is not a dotted module path")

    def expr(self, holder: Any, key: Any, path: str, guard: bool = False) -> None:
        try:
            holder[key] = (canonical_guard if guard else canonical_sym_expr)(holder[key])
        except SymExprError as e:
            raise self.fail(path, str(e)) from None

    def sym(self, value: Any, path: str) -> None:
        """A SymInt / SymBool / SymFloat: ``{"as_expr": {"expr_str": ...}}`` or a literal."""
        if isinstance(value, dict) and isinstance(value.get("as_expr"), dict) and "expr_str" in value["as_expr"]:
            self.expr(value["as_expr"], "expr_str", f"{path}.as_expr.expr_str")

    def argument(self, arg: Any, path: str) -> None:
        if not isinstance(arg, dict) or len(arg) != 1:
            return  # the typed conversion reports it
        (kind, value), = arg.items()
        if kind in _REFUSED_ARGUMENTS:
            raise self.fail(path, f"argument kind {kind!r} (subgraphs, custom objects and operator "
                                  f"arguments are not accepted)")
        if kind in ("as_tensor", "as_optional_tensor"):
            self._named(value, path)
        elif kind in ("as_tensors", "as_optional_tensors"):
            for i, v in enumerate(value if isinstance(value, list) else []):
                self._named(v, f"{path}[{i}]")
        elif kind in ("as_sym_int", "as_sym_bool", "as_sym_float"):
            self._named(value, path)
        elif kind in ("as_sym_ints", "as_sym_bools", "as_sym_floats"):
            for i, v in enumerate(value if isinstance(value, list) else []):
                self._named(v, f"{path}[{i}]")
        elif kind == "as_string_to_argument" and isinstance(value, dict):
            for k, v in value.items():
                self.argument(v, f"{path}.{k}")

    def _named(self, value: Any, path: str) -> None:
        """``{"name": ...}`` / ``{"as_name": ...}`` / ``{"as_tensor": {"name": ...}}`` inside an argument."""
        if not isinstance(value, dict):
            return
        for key in ("name", "as_name"):
            if key in value:
                self.ident(value[key], f"{path}.{key}")
        if isinstance(value.get("as_tensor"), dict) and "name" in value["as_tensor"]:
            self.ident(value["as_tensor"]["name"], f"{path}.as_tensor.name")

    def treespec(self, text: Any, path: str) -> None:
        if not isinstance(text, str) or len(text) > 1 << 20:
            raise self.fail(path, "pytree spec must be a JSON string")
        try:
            spec = parse_json(text.encode(), f"{self.source}: {path}")
        except ProgramError as e:
            raise self.fail(path, f"pytree spec: {e}") from None
        if not (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[1], dict)):
            raise self.fail(path, "pytree spec is not [protocol, spec]")

        from torch.utils import _pytree as pytree

        def plain(v: Any) -> bool:
            # no objects: torch's context hook imports the module an {"__enum__": ...} object names
            if isinstance(v, list):
                return all(plain(x) for x in v)
            return v is None or type(v) in (bool, int, float) or (isinstance(v, str) and bool(_CONTEXT_STR.match(v)))

        def node(n: Any, where: str) -> None:
            if not isinstance(n, dict) or set(n) != {"type", "context", "children_spec"} \
                    or not isinstance(n["children_spec"], list):
                raise self.fail(where, "malformed pytree node")
            kind, context = n["type"], n["context"]
            if kind is None:
                if context not in (None, "null") or n["children_spec"]:
                    raise self.fail(where, "malformed pytree leaf")
                return
            # registered by code this process imported (containers, diffusers' output classes); a
            # registry look-up, never an import
            if not isinstance(kind, str) or kind not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE \
                    or kind == "collections.namedtuple":
                raise self.fail(where, f"pytree container type {_short(kind)} is not a registered container")
            if context is not None:
                if not isinstance(context, str):
                    raise self.fail(where, "pytree context must be JSON text")
                value = parse_json(context.encode(), where)
                if not plain(value):
                    raise self.fail(where, f"pytree context {_short(context)} holds more than names and numbers")
            for i, c in enumerate(n["children_spec"]):
                node(c, f"{where}.children_spec[{i}]")

        node(spec[1], path)

    def graph(self, g: dict, path: str) -> None:
        for key in ("inputs", "outputs"):
            for i, a in enumerate(_list(g.get(key))):
                self.argument(a, f"{path}.{key}[{i}]")
        for i, n in enumerate(_list(g.get("nodes"))):
            self.node(n, f"{path}.nodes[{i}]")
        for table in ("tensor_values", "sym_int_values", "sym_bool_values", "sym_float_values"):
            for name, meta in _dict(g.get(table)).items():
                where = f"{path}.{table}.{name}"
                self.ident(name, where)
                if table != "tensor_values":
                    self.sym(meta, where)
                    continue
                if not isinstance(meta, dict):
                    continue
                for field in ("sizes", "strides"):
                    for j, s in enumerate(_list(meta.get(field))):
                        self.sym(s, f"{where}.{field}[{j}]")
                self.sym(meta.get("storage_offset"), f"{where}.storage_offset")
                device = meta.get("device")
                if isinstance(device, dict) and device.get("type") not in ("cpu", "cuda", "meta", "xpu", "mps"):
                    raise self.fail(f"{where}.device.type", f"device {_short(device.get('type'))}")
        if _dict(g.get("custom_obj_values")):
            raise self.fail(f"{path}.custom_obj_values", "custom objects are not accepted")

    def node(self, n: Any, path: str) -> None:
        if not isinstance(n, dict):
            return
        target = n.get("target")
        if not allowed_target(target):
            raise self.fail(f"{path}.target", f"{_short(target)} is not an allowed operation (viditq ops, "
                                              f"side-effect-free ATen ops, symbolic size arithmetic)")
        if n.get("name") is not None:
            self.ident(n["name"], f"{path}.name")
        for i, a in enumerate(_list(n.get("inputs"))):
            if isinstance(a, dict):
                self.ident(a.get("name"), f"{path}.inputs[{i}].name")
                self.argument(a.get("arg"), f"{path}.inputs[{i}].arg")
        for i, a in enumerate(_list(n.get("outputs"))):
            self.argument(a, f"{path}.outputs[{i}]")
        meta = n.get("metadata")
        if isinstance(meta, dict):
            for key in list(meta):
                if key in _KEPT_METADATA:
                    if not isinstance(meta[key], str) or not _MODULE_STACK.match(meta[key]):
                        raise self.fail(f"{path}.metadata.{key}", "module stack with unexpected characters")
                elif key in _DROPPED_METADATA:
                    del meta[key]  # for people reading traces only; never needed to run
                else:
                    raise self.fail(f"{path}.metadata", f"unknown metadata key {_short(key)}")

    def program(self, d: dict) -> None:
        gm = _dict(d.get("graph_module"))
        self.graph(_dict(gm.get("graph")), "graph_module.graph")
        sig = _dict(gm.get("signature"))
        for i, spec in enumerate(_list(sig.get("input_specs"))):
            for kind, body in _dict(spec).items():
                where = f"graph_module.signature.input_specs[{i}].{kind}"
                if kind == "custom_obj":
                    raise self.fail(where, "custom objects are not accepted")
                body = _dict(body)
                if kind == "user_input":
                    self.argument(body.get("arg"), f"{where}.arg")
                else:
                    self._named(body.get("arg"), f"{where}.arg")
                if kind == "constant_input":
                    self.ident(body.get("name"), f"{where}.name")
                for field in ("parameter_name", "buffer_name", "tensor_constant_name"):
                    if field in body:
                        self.dotted(body[field], f"{where}.{field}")
        for i, spec in enumerate(_list(sig.get("output_specs"))):
            for kind, body in _dict(spec).items():
                where = f"graph_module.signature.output_specs[{i}].{kind}"
                if kind not in ("user_output", "buffer_mutation", "user_input_mutation", "token"):
                    raise self.fail(where, f"output kind {kind!r} is not accepted in an inference program")
                body = _dict(body)
                if kind == "user_output":
                    self.argument(body.get("arg"), f"{where}.arg")
                else:
                    self._named(body.get("arg"), f"{where}.arg")
                for field in ("buffer_name", "user_input_name"):
                    if field in body:
                        self.dotted(body[field], f"{where}.{field}")
        for i, entry in enumerate(_list(gm.get("module_call_graph"))):
            where = f"graph_module.module_call_graph[{i}]"
            entry = _dict(entry)
            self.dotted(entry.get("fqn"), f"{where}.fqn", empty_ok=True)
            s = entry.get("signature")
            if isinstance(s, dict):
                for key in ("in_spec", "out_spec"):
                    self.treespec(s.get(key), f"{where}.signature.{key}")
                for j, name in enumerate(_list(s.get("forward_arg_names"))):
                    self.ident(name, f"{where}.signature.forward_arg_names[{j}]")
                for key in ("inputs", "outputs"):
                    for j, a in enumerate(_list(s.get(key))):
                        self.argument(a, f"{where}.signature.{key}[{j}]")
        if _dict(gm.get("treespec_namedtuple_fields")):
            raise self.fail("graph_module.treespec_namedtuple_fields", "named tuples are not accepted")
        if _dict(gm.get("metadata")):
            raise self.fail("graph_module.metadata", "module metadata is not accepted")
        for name in _dict(d.get("range_constraints")):
            try:
                canonical_sym_expr(name)
            except SymExprError:
                raise self.fail("range_constraints", f"{_short(name)} is not a symbol name") from None
        guards = d.get("guards_code")
        for i in range(len(_list(guards))):
            self.expr(guards, i, f"guards_code[{i}]", guard=True)
        for i, v in enumerate(_list(d.get("verifiers"))):
            if v != "ATEN":
                raise self.fail(f"verifiers[{i}]", f"verifier {_short(v)} (only ATEN)")
        version = d.get("torch_version")
        if version is not None and not (isinstance(version, str) and re.fullmatch(r"[\w.+<=-]{1,64}", version)):
            raise self.fail("torch_version", f"{_short(version)}")


def _list(v: Any) -> list:
    return v if isinstance(v, list) else []


def _dict(v: Any) -> dict:
    return v if isinstance(v, dict) else {}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@functools.cache
def _hints(tp: type) -> dict:
    from torch._export.serde import schema

    return typing.get_type_hints(tp, globalns=vars(schema), include_extras=True)


@functools.cache
def _fields(tp: type) -> tuple[dict, frozenset]:
    """(field name -> field, names without a default) of a schema dataclass."""
    fields = {f.name: f for f in dataclasses.fields(tp)}
    required = frozenset(f.name for f in fields.values()
                         if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    return fields, required


def _convert(tp: Any, data: Any, path: str, source: str) -> Any:
    """``data`` as the schema type ``tp``; refuses unknown keys, wrong types, bad unions."""
    from torch._export.serde import schema
    from torch._export.serde.union import _Union

    def fail(why: str) -> ProgramError:
        return ProgramError(f"{source}: {path or 'program'}: {why}")

    if isinstance(tp, str):
        tp = getattr(schema, tp)
    if isinstance(tp, typing.ForwardRef):
        tp = getattr(schema, tp.__forward_arg__)
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _convert(typing.get_args(tp)[0], data, path, source)
    if origin is typing.Union or type(tp).__name__ == "UnionType":
        args = typing.get_args(tp)
        if data is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, data, path, source)
    if isinstance(tp, type) and issubclass(tp, _Union):
        if not isinstance(data, dict) or len(data) != 1:
            raise fail(f"expected an object with exactly one key, got {_short(data)}")
        (key, value), = data.items()
        hints = _hints(tp)  # type: ignore[arg-type]  # mypy: a class object vs Hashable (unbound __hash__)
        if key not in hints:
            raise fail(f"unknown {tp.__name__} kind {_short(key)}")
        return tp.create(**{key: _convert(hints[key], value, f"{path}.{key}", source)})
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(data, dict):
            raise fail(f"expected an object, got {type(data).__name__}")
        hints = _hints(tp)
        fields, required = _fields(tp)
        unknown = [k for k in data if k not in fields]
        if unknown:
            raise fail(f"unknown key {_short(unknown[0])} in {tp.__name__}")
        missing = sorted(required - set(data))
        if missing:
            raise fail(f"{tp.__name__} lacks {missing[0]!r}")
        return tp(**{k: _convert(hints[k], v, f"{path}.{k}", source) for k, v in data.items()})
    if origin is list:
        if not isinstance(data, list):
            raise fail(f"expected a list, got {type(data).__name__}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{path}[{i}]", source) for i, v in enumerate(data)]
    if origin is dict:
        if not isinstance(data, dict):
            raise fail(f"expected an object, got {type(data).__name__}")
        _, value_type = typing.get_args(tp)
        return {k: _convert(value_type, v, f"{path}.{k}", source) for k, v in data.items()}
    if isinstance(tp, type) and issubclass(tp, IntEnum):
        if type(data) is not int or data not in tp._value2member_map_:
            raise fail(f"{_short(data)} is not a {tp.__name__}")
        return data
    if tp is bool:
        if type(data) is not bool:
            raise fail(f"expected true/false, got {_short(data)}")
        return data
    if tp is int:
        if type(data) is not int:
            raise fail(f"expected an integer, got {_short(data)}")
        return data
    if tp is float:
        if type(data) not in (int, float):
            raise fail(f"expected a number, got {_short(data)}")
        return float(data)
    if tp is str:
        if not isinstance(data, str):
            raise fail(f"expected a string, got {_short(data)}")
        return data
    raise fail(f"schema type {tp!r} is not supported by this loader")


def validate_program(data: bytes, source: str) -> Any:
    """Parse, check and canonicalize a program JSON; returns ``schema.ExportedProgram``."""
    from torch._export.serde import schema

    d = parse_json(data, source)
    if not isinstance(d, dict):
        raise ProgramError(f"{source}: the program must be a JSON object")
    _Walker(source).program(d)  # tolerant of wrong types: the conversion below reports those
    return _convert(schema.ExportedProgram, d, "", source)


# ``operator`` is imported so the allowlist above names functions that exist in this Python.
assert all(hasattr(operator, f) for f in _OPERATOR_FUNCTIONS)
del operator
