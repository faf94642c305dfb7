"""An ``ExportedProgram`` from the bytes of an untrusted ``.pt2`` and tensors from safetensors.

``torch.export.load`` is for trusted files only: it unpickles, resolves targets by attribute
walks, ``sympify``-s sizes and executes guard strings (see ``program_schema``). Here torch never
reads the user's archive:

1. the archive bytes (already in memory, checksummed by the caller) go through ``StrictZip``:
   one reader, ambiguity refused, only the members torch's format defines;
2. only the program JSON is taken from it, and only after ``program_schema.validate_program``
   has checked it and rewritten every executable string from its own parse;
3. every tensor comes from ``weights.safetensors`` (the caller's dict), matched to the program's
   signature by name, dtype and shape; the archive's own weight payloads, pickled sample inputs
   and configs are never read (they are there so that a trusted ``torch.export.load`` works);
4. the validated parts are handed, in memory, to torch's ``ExportedProgramDeserializer`` (the
   function ``torch.export.load`` ends in), with no sample inputs.

The rebuilt program is therefore made only of validated data: no archive, pickle or string of
the file's reaches torch. ``ArtifactError``-style messages come as ``ProgramError``.
"""

from __future__ import annotations

import re
import sys
from typing import Any

import torch

from viditq_compile.io.program_schema import ProgramError, validate_program
from viditq_compile.io.zip_reader import StrictZip, ZipFormatError

__all__ = ["MAX_PROGRAM_JSON", "load_program", "program_tensor_names"]

MAX_PROGRAM_JSON = 1 << 30
_SMALL = 1 << 10
# What torch.export.save (torch 2.6 - 2.13) writes under the archive's root folder.
_MEMBERS = re.compile(r"""(?x)
    models/model\.json | archive_format | archive_version | byteorder | \.data/version
  | \.data/serialization_id | data/weights/model_weights_config\.json | data/weights/weight_[0-9]{1,9}
  | data/constants/model_constants_config\.json | data/constants/tensor_[0-9]{1,9}
  | data/sample_inputs/model\.pt
""")


def _members(z: StrictZip) -> tuple[str, dict[str, str]]:
    """The archive's root folder and its members by path below the root; anything else refused."""
    roots = {name.split("/", 1)[0] for name in z.names()}
    if len(roots) != 1:
        raise ProgramError(f"{z.source}: members under {len(roots)} root folders (one expected)")
    (root,) = roots
    out = {}
    for name in z.names():
        rel = name[len(root) + 1:] if name.startswith(root + "/") else ""
        if not _MEMBERS.fullmatch(rel):
            raise ProgramError(f"{z.source}: member {name!r} is not part of a torch.export program "
                               f"(AOTInductor code, extra files, other models and custom objects are "
                               f"not accepted)")
        out[rel] = name
    if "models/model.json" not in out:
        raise ProgramError(f"{z.source}: no models/model.json (not a torch.export program)")
    return root, out


def _spec_tensors(serialized) -> dict[str, str]:
    """``state_dict/<fqn>`` / ``constants/<fqn>`` -> input kind, from the program's signature."""
    out = {}
    for spec in serialized.graph_module.signature.input_specs:
        kind = spec.type
        body = getattr(spec, kind)
        if kind == "parameter":
            out[f"state_dict/{body.parameter_name}"] = kind
        elif kind == "buffer":
            out[f"{'state_dict' if body.persistent else 'constants'}/{body.buffer_name}"] = kind
        elif kind == "tensor_constant":
            out[f"constants/{body.tensor_constant_name}"] = kind
    return out


def program_tensor_names(serialized) -> list[str]:
    return sorted(_spec_tensors(serialized))


def load_program(pt2: bytes, tensors: dict[str, torch.Tensor], source: str, *,
                 subset: bool = False) -> Any:
    """The ``ExportedProgram`` in ``pt2`` (bytes) with its tensors from ``tensors``
    (``state_dict/<fqn>`` and ``constants/<fqn>``, as ``artifact.save`` writes them).
    ``subset``: ``tensors`` may hold more than the program reads (a resolution bucket's table,
    whose caller checks that every entry is read by some bucket)."""
    from torch._export.serde.serialize import ExportedProgramDeserializer

    try:
        z = StrictZip(pt2, source=source)
        _, members = _members(z)
        small = {rel: z.read(members[rel], max_size=_SMALL) for rel in ("archive_format", "byteorder")
                 if rel in members}
        if small.get("archive_format", b"pt2") != b"pt2":
            raise ProgramError(f"{source}: archive_format is {small['archive_format'][:20]!r}, not pt2")
        if small.get("byteorder", sys.byteorder.encode()) != sys.byteorder.encode():
            raise ProgramError(f"{source}: written on a {small['byteorder'][:10]!r}-endian machine")
        text = z.read(members["models/model.json"], max_size=MAX_PROGRAM_JSON)
    except ZipFormatError as e:
        raise ProgramError(str(e)) from None
    serialized = validate_program(text, f"{source}: models/model.json")
    kinds = _spec_tensors(serialized)
    missing = sorted(set(kinds) - set(tensors))
    extra = [] if subset else sorted(set(tensors) - set(kinds))
    if missing or extra:
        raise ProgramError(f"{source}: weights.safetensors does not fit the program: missing "
                           f"{missing[:5]}, unexpected {extra[:5]}")
    state_dict: dict[str, torch.Tensor] = {}
    constants: dict[str, torch.Tensor] = {}
    for key, kind in kinds.items():
        where, name = key.split("/", 1)
        t = tensors[key]
        if t.numel() and t.data_ptr() % 64:
            # safetensors' tensors from bytes sit at the file's (8-byte) offsets; a fresh, aligned
            # copy runs the same kernels as the program that was saved, so outputs are bit-exact
            t = t.clone()
        if kind == "parameter":
            t = torch.nn.Parameter(t, requires_grad=False)
        (state_dict if where == "state_dict" else constants)[name] = t
    try:
        ep = ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, None)
    except Exception as e:  # noqa: BLE001
        # The trust boundary: torch's deserializer, given validated data, may still fail on a program
        # that is well-formed but inconsistent (a name used before it is defined, an impossible
        # shape); whatever it raises, the artifact is refused, naming torch's reason.
        raise ProgramError(f"{source}: torch cannot rebuild the program: {type(e).__name__}: "
                           f"{str(e)[:300]}") from None
    _check_tensor_meta(ep, source)
    return ep


def _check_tensor_meta(ep, source: str) -> None:
    """Each weight's dtype and shape are those the graph was traced with."""
    sig = ep.graph_signature
    by_input = {**sig.inputs_to_parameters, **sig.inputs_to_buffers,
                **sig.inputs_to_lifted_tensor_constants}
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in by_input:
            continue
        fqn = by_input[node.name]
        t = ep.state_dict.get(fqn, ep.constants.get(fqn))
        val = node.meta.get("val")
        if not isinstance(t, torch.Tensor) or not isinstance(val, torch.Tensor):
            continue
        if t.dtype != val.dtype or tuple(t.shape) != tuple(val.shape):
            raise ProgramError(f"{source}: weight {fqn!r} is {t.dtype} {tuple(t.shape)}, the program "
                               f"expects {val.dtype} {tuple(val.shape)}")
