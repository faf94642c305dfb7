"""The saved form of a quantized model: a directory.

    manifest.json        format name and version, torch version, sha256 of every file below
    program.pt2          the ExportedProgram (``torch.export.save``), loadable on its own with
                         ``torch.export.load`` after ``import viditq_compile``
    weights.safetensors  every tensor of the program (state_dict and constants)
    plan.json            the per-layer plan
    report.txt           the report, for people

A timestep-aware program keeps one weight per distinct weight format of each dispatching layer
(``<layer>.viditq_w_q`` for range 0, ``<layer>.viditq_w_q_r<i>`` for the others) and calls
``viditq.qlinear_timestep``, whose operands are plain tensors and lists, so its ``program.pt2``
passes the same pickle check.

``load`` never runs code from the artifact: the manifest and plan are JSON, tensors come from
safetensors, and every pickle inside ``program.pt2`` is checked (``safe_pt2.check_pt2``) before
``torch.export.load`` sees it. Tensors from safetensors replace the program's, after their names,
shapes and dtypes are checked against it.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Union

import torch

ARTIFACT_FORMAT = "viditq-compile-artifact"
ARTIFACT_VERSION = 1
FILES = ("program.pt2", "weights.safetensors", "plan.json")


class ArtifactError(ValueError):
    """A saved artifact that is missing, corrupt, of another version, or does not fit."""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _tensors(ep) -> dict[str, torch.Tensor]:
    out = {}
    for k, t in ep.state_dict.items():
        out[f"state_dict/{k}"] = t
    for k, t in ep.constants.items():
        if isinstance(t, torch.Tensor):
            out[f"constants/{k}"] = t
    return out


def save(qm, path: Union[str, os.PathLike]) -> None:
    """Write ``qm`` (a ``QuantizedModel``) to the directory ``path`` (created if missing)."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    torch.export.save(qm.program, os.path.join(path, "program.pt2"))
    seen, flat = set(), {}
    for k, t in _tensors(qm.program).items():
        t = t.detach()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        # safetensors refuses tensors that share storage: give repeats their own copy
        flat[k] = t.contiguous().clone() if ptr in seen or not t.is_contiguous() else t
        if ptr is not None:
            seen.add(ptr)
    save_file(flat, os.path.join(path, "weights.safetensors"))
    qm.plan.save(os.path.join(path, "plan.json"))
    with open(os.path.join(path, "report.txt"), "w", encoding="utf-8") as f:
        f.write(str(qm.report) + "\n")
    manifest = {"format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION,
                "torch": torch.__version__,
                "sha256": {name: _sha256(os.path.join(path, name)) for name in FILES}}
    with open(os.path.join(path, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)


def _read_manifest(path: str) -> dict:
    mpath = os.path.join(path, "manifest.json")
    if not os.path.isdir(path):
        raise ArtifactError(f"artifact directory not found: {path}")
    if not os.path.isfile(mpath):
        raise ArtifactError(f"{path} is not a viditq_compile artifact: manifest.json is missing")
    try:
        with open(mpath, encoding="utf-8") as f:
            m = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath} is not valid JSON: {e}") from None
    if not isinstance(m, dict) or m.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{mpath}: format is {m.get('format') if isinstance(m, dict) else m!r}"
                            f", expected {ARTIFACT_FORMAT!r}")
    if m.get("version") != ARTIFACT_VERSION:
        raise ArtifactError(f"{path}: artifact format version {m.get('version')!r}; this "
                            f"viditq_compile reads version {ARTIFACT_VERSION}")
    sums = m.get("sha256")
    if not isinstance(sums, dict):
        raise ArtifactError(f"{mpath}: 'sha256' must map file names to digests")
    for name in FILES:
        fpath = os.path.join(path, name)
        if not os.path.isfile(fpath):
            raise ArtifactError(f"{path}: {name} is missing")
        if sums.get(name) != _sha256(fpath):
            raise ArtifactError(f"{path}: {name} does not match its checksum in manifest.json "
                                f"(corrupt or edited)")
    return m


def load(path: Union[str, os.PathLike]):
    """Read a directory written by ``save``; returns a ``QuantizedModel``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .api import QuantizedModel
    from .passes.quantize import version_suffixes
    from .plan import Plan, PlanError
    from .safe_pt2 import UnsafeArtifactError, check_pt2

    path = os.fspath(path)
    _read_manifest(path)
    try:
        plan = Plan.load(os.path.join(path, "plan.json"))
    except PlanError as e:
        raise ArtifactError(f"{path}: plan.json: {e}") from None
    try:
        tensors = load_file(os.path.join(path, "weights.safetensors"))
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{path}: weights.safetensors cannot be read: {e}") from None
    program = os.path.join(path, "program.pt2")
    try:
        check_pt2(program)
    except UnsafeArtifactError as e:
        raise ArtifactError(f"{path}: program.pt2 refused: {e}") from e
    ep = torch.export.load(program)
    expected = _tensors(ep)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ArtifactError(f"{path}: weights.safetensors does not fit the program: missing "
                            f"{missing[:5]}, unexpected {extra[:5]}")
    for key, ref in expected.items():
        t = tensors[key]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            raise ArtifactError(f"{path}: weight {key!r} is {t.dtype} {tuple(t.shape)}, the "
                                f"program expects {ref.dtype} {tuple(ref.shape)}")
        kind, name = key.split("/", 1)
        if kind == "state_dict":
            if isinstance(ref, torch.nn.Parameter):
                t = torch.nn.Parameter(t, requires_grad=False)
            ep.state_dict[name] = t
        else:
            ep.constants[name] = t
    for lp in plan.quantized:
        if f"state_dict/{lp.name}.viditq_w_q" not in expected:
            raise ArtifactError(f"{path}: plan quantizes {lp.name!r} but the program has no "
                                f"quantized weight for it")
        for i, suffix in enumerate(version_suffixes(lp)):
            if suffix and f"state_dict/{lp.name}.viditq_w_q{suffix}" not in expected:
                raise ArtifactError(f"{path}: plan gives {lp.name!r} its own weight in timestep "
                                    f"range {i}, but the program has no such weight")
    return QuantizedModel(ep, plan)
