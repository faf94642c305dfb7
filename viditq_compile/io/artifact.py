"""The saved form of a quantized model: a directory, safe to load from a stranger.

    manifest.json        format name and version, torch version, size and sha256 of every file
    program.pt2          the ExportedProgram (``torch.export.save``); ``torch.export.load`` of it
                         alone (after ``import viditq_compile``) is for trusted files only
    program.<i>.pt2      resolution bucket i >= 1, when there are several (format 3; the manifest's
                         ``programs`` lists them in order): the same plan at other input sizes
    weights.safetensors  every tensor of the program (state_dict and constants); a bucket's tensor
                         that is not bucket 0's under the same name is ``bucket<i>/<name>``
    plan.json            the per-layer plan (+ ``plan.calibration.safetensors`` when it has
                         statistics, ``plan.heatmap.png`` when it was searched)
    report.txt           the report, for people

A timestep-aware program keeps one weight per distinct weight format of each dispatching layer
(``<layer>.viditq_w_q`` for range 0, ``<layer>.viditq_w_q_r<i>`` for the others).

**Loading** (``load``) treats every byte as hostile. The manifest is read first (capped); each
file it lists is then opened once (no symlinks), read into memory up to the size the manifest
states, and checksummed on those bytes; everything after works on the bytes, never the path.
The plan and its calibration file are parsed from bytes; tensors come from safetensors only; the
program goes through ``io.program_loader`` (strict zip reader, strict schema, executable strings
regenerated, ops allowlisted, rebuilt in memory by torch's deserializer without unpickling
anything); ``io.consistency`` then checks that the plan, the program and the weights agree
(widths, balancing, finite positive scales) before a ``QuantizedModel`` is made. Nothing from the
artifact is executed and nothing is written.

**Saving** (``save``) writes into a temporary directory beside the target, fsyncs and swaps it
into place (``io.atomic.atomic_directory``): a save that fails or is killed leaves the previous
artifact loadable; a target that is a symlink, holds one, or is a non-empty directory that is not
an artifact is refused.

Format 1 (viditq_compile 0.1) artifacts still load: they carry no file sizes (the files are
capped by ``MAX_FILE_BYTES``) and no checksum for a plan's calibration file, which is then
read without one, with a warning; re-save them (``vq.load(path).save(path)``) to get format 2.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import stat

import torch

ARTIFACT_FORMAT = "viditq-compile-artifact"
ARTIFACT_VERSION = 2  # written for one program; BUCKETS_VERSION for several
BUCKETS_VERSION = 3
MAX_BUCKETS = 64  # resolution buckets (programs) per artifact; PixArt-Sigma's largest bin table has 40
READABLE_VERSIONS = (1, 2, 3)
PROGRAM, WEIGHTS, PLAN = "program.pt2", "weights.safetensors", "plan.json"
FILES = (PROGRAM, WEIGHTS, PLAN)
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 1 << 20
MAX_FILE_BYTES = 1 << 40
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,200}\Z")
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")

log = logging.getLogger(__name__)


class ArtifactError(ValueError):
    """A saved artifact that is missing, corrupt, of another version, unsafe, or does not fit."""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def program_file(i: int) -> str:
    return PROGRAM if i == 0 else f"program.{i}.pt2"


def _same(a: torch.Tensor, b: torch.Tensor | None) -> bool:
    """``b`` is ``a``'s storage at ``a``'s offset, shape and dtype (what ``buckets.share_tensors``
    leaves for a tensor two buckets share)."""
    if b is a:
        return True
    return (isinstance(b, torch.Tensor) and a.numel() > 0 and b.dtype == a.dtype
            and b.shape == a.shape and b.stride() == a.stride() and b.device == a.device
            and b.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
            and b.storage_offset() == a.storage_offset())


def _all_tensors(programs) -> dict[str, torch.Tensor]:
    """The weights file's entries: bucket 0's tensors by name, then each other bucket's tensors
    that are not bucket 0's under the same name, as ``bucket<i>/<name>``."""
    first = _tensors(programs[0])
    out = dict(first)
    for i, ep in enumerate(programs[1:], start=1):
        for k, t in _tensors(ep).items():
            if not _same(t, first.get(k)):
                out[f"bucket{i}/{k}"] = t
    return out


def _tensors(ep) -> dict[str, torch.Tensor]:
    out = {}
    for k, t in ep.state_dict.items():
        out[f"state_dict/{k}"] = t
    for k, t in ep.constants.items():
        if isinstance(t, torch.Tensor):
            out[f"constants/{k}"] = t
    return out


def save(qm, path: str | os.PathLike) -> None:
    """Write ``qm`` (a ``QuantizedModel``) to the directory ``path``, atomically (module docstring)."""
    from safetensors.torch import save_file

    from viditq_compile.io.atomic import UnsafePathError, atomic_directory

    path = os.fspath(path)
    try:
        with atomic_directory(path, marker=MANIFEST) as tmp:
            programs = list(qm.programs)
            for i, ep in enumerate(programs):
                # without the example inputs: they would ship the user's data, as a pickle
                program = copy.copy(ep)
                program._example_inputs = None
                torch.export.save(program, os.path.join(tmp, program_file(i)))
            seen, flat = set(), {}
            for k, t in _all_tensors(programs).items():
                t = t.detach()
                ptr = t.untyped_storage().data_ptr() if t.numel() else None
                # safetensors refuses tensors that share storage: give repeats their own copy
                flat[k] = t.contiguous().clone() if ptr in seen or not t.is_contiguous() else t
                if ptr is not None:
                    seen.add(ptr)
            save_file(flat, os.path.join(tmp, WEIGHTS))
            qm.plan.save(os.path.join(tmp, PLAN))
            with open(os.path.join(tmp, "report.txt"), "w", encoding="utf-8") as f:
                f.write(str(qm.report) + "\n")
                if len(programs) > 1:
                    f.write(f"\n{len(programs)} resolution buckets (one plan, shared weights):\n")
                    f.write("".join(f"bucket {i}: {s}\n" for i, s in enumerate(qm.bucket_shapes)))
            files = {name: {"size": os.path.getsize(os.path.join(tmp, name)),
                            "sha256": _sha256(os.path.join(tmp, name))}
                     for name in sorted(os.listdir(tmp))}
            manifest = {"format": ARTIFACT_FORMAT, "torch": torch.__version__, "files": files,
                        "version": ARTIFACT_VERSION if len(programs) == 1 else BUCKETS_VERSION}
            if len(programs) > 1:
                manifest["programs"] = [program_file(i) for i in range(len(programs))]
            with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
                json.dump(manifest, f, indent=1)
    except UnsafePathError as e:
        raise ArtifactError(f"cannot save to {path}: {e}") from None


class _Reader:
    """The artifact's files, each read once, size-capped and checksummed (see ``load``)."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isdir(path):
            raise ArtifactError(f"artifact directory not found: {path}")
        if not os.path.lexists(os.path.join(path, MANIFEST)):
            raise ArtifactError(f"{path} is not a viditq_compile artifact: {MANIFEST} is missing")
        from viditq_compile.io.program_schema import ProgramError, parse_json

        raw = self._open(MANIFEST, MAX_MANIFEST_BYTES, exact=None)
        try:
            m = parse_json(raw, f"{path}/{MANIFEST}")
        except ProgramError as e:
            raise ArtifactError(str(e)) from None
        self.manifest = self._check_manifest(m)
        self.read_names: list[str] = []

    def _check_manifest(self, m) -> dict[str, dict]:
        where = f"{self.path}/{MANIFEST}"
        if not isinstance(m, dict) or m.get("format") != ARTIFACT_FORMAT:
            shown = repr(m.get("format") if isinstance(m, dict) else m)[:80]
            raise ArtifactError(f"{where}: format is {shown}, expected {ARTIFACT_FORMAT!r}")
        self.version = m.get("version")
        if type(self.version) is not int or self.version not in READABLE_VERSIONS:
            raise ArtifactError(f"{self.path}: artifact format version {repr(self.version)[:40]}; this "
                                f"viditq_compile reads versions {list(READABLE_VERSIONS)}: re-save it "
                                f"with the viditq_compile that wrote it, or quantize the model again")
        if self.version == 1:
            sums = m.get("sha256")
            if not isinstance(sums, dict):
                raise ArtifactError(f"{where}: 'sha256' must map file names to digests")
            files = {name: {"sha256": digest, "size": None} for name, digest in sums.items()}
        else:
            files = m.get("files")  # type: ignore[assignment]  # checked next
            if not isinstance(files, dict):
                raise ArtifactError(f"{where}: 'files' must map file names to their size and sha256")
        for name, entry in files.items():
            if not isinstance(name, str) or not _FILE_NAME.match(name) or name == MANIFEST:
                raise ArtifactError(f"{where}: {repr(name)[:80]} is not a file name of the artifact")
            size = entry.get("size") if isinstance(entry, dict) else -1
            digest = entry.get("sha256") if isinstance(entry, dict) else None
            if not (isinstance(digest, str) and _SHA256.match(digest)):
                raise ArtifactError(f"{where}: {name}: sha256 must be 64 lowercase hex digits")
            if size is not None and not (type(size) is int and 0 <= size <= MAX_FILE_BYTES):
                raise ArtifactError(f"{where}: {name}: size must be an integer in [0, {MAX_FILE_BYTES}]")
        for name in FILES:
            if name not in files:
                raise ArtifactError(f"{where}: {name} is not listed")
        self.programs = self._check_programs(m.get("programs"), files, where)
        return files

    def _check_programs(self, programs, files: dict, where: str) -> list[str]:
        """The program files in bucket order: ``[program.pt2]`` before format 3; in format 3,
        ``program.pt2, program.1.pt2, ...`` exactly, each listed with its checksum."""
        if self.version != BUCKETS_VERSION:
            if programs is not None:
                raise ArtifactError(f"{where}: 'programs' is a format-{BUCKETS_VERSION} key, but the "
                                    f"artifact says format {self.version}")
            return [PROGRAM]
        if not isinstance(programs, list) or not 2 <= len(programs) <= MAX_BUCKETS:
            raise ArtifactError(f"{where}: 'programs' must list 2 to {MAX_BUCKETS} program files "
                                f"(one per resolution bucket)")
        expected = [program_file(i) for i in range(len(programs))]
        if programs != expected:
            raise ArtifactError(f"{where}: 'programs' is {repr(programs)[:200]}, expected {expected}")
        unlisted = [name for name in programs if name not in files]
        if unlisted:
            raise ArtifactError(f"{where}: {unlisted[0]} is not listed in 'files'")
        return programs

    def _open(self, name: str, cap: int, exact: int | None) -> bytes:
        fpath = os.path.join(self.path, name)
        try:
            fd = os.open(fpath, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0))
        except FileNotFoundError:
            raise ArtifactError(f"{self.path}: {name} is missing") from None
        except OSError as e:
            raise ArtifactError(f"{self.path}: {name} cannot be opened ({e.strerror}; symlinks are not "
                                f"followed)") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ArtifactError(f"{self.path}: {name} is not a regular file")
            limit = cap if exact is None else exact
            if st.st_size > limit:
                raise ArtifactError(f"{self.path}: {name} is {st.st_size} bytes, more than the "
                                    f"{limit} {'the manifest states' if exact is not None else 'accepted'}")
            data = f.read(st.st_size + 1)  # one byte more shows a file that grew since fstat
        if len(data) != st.st_size or (exact is not None and len(data) != exact):
            raise ArtifactError(f"{self.path}: {name} changed while it was read, or is not the "
                                f"{exact} bytes the manifest states")
        return data

    def read(self, name: str) -> bytes:
        """The bytes of ``name``, which the manifest must list, verified against its checksum."""
        entry = self.manifest.get(name)
        if entry is None:
            raise ArtifactError(f"{self.path}: {name} is read by the artifact but not listed in "
                                f"{MANIFEST} (no checksum)")
        data = self._open(name, MAX_FILE_BYTES, entry["size"])
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ArtifactError(f"{self.path}: {name} does not match its checksum in {MANIFEST} "
                                f"(corrupt or edited)")
        self.read_names.append(name)
        return data

    def read_sibling(self, name: str) -> bytes:
        """A file ``plan.json`` refers to (its calibration statistics)."""
        if self.version == 1 and name not in self.manifest:
            log.warning("%s: format-1 artifact: %s has no checksum in %s; re-save the artifact to "
                        "checksum it", self.path, name, MANIFEST)
            return self._open(name, MAX_FILE_BYTES, None)
        return self.read(name)


def read_artifact(path: str | os.PathLike):
    """Read a directory written by ``save``: its validated ``([ExportedProgram, ...], Plan)``,
    one program per resolution bucket (module docstring); ``viditq_compile.program.load`` makes
    the ``QuantizedModel`` of them.

    Raises ``ArtifactError`` naming the file and the cause for anything missing, corrupt,
    edited, unsafe or inconsistent.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    from viditq_compile.calibration.stats import CalibrationError
    from viditq_compile.config.plan import Plan, PlanError
    from viditq_compile.io.consistency import ConsistencyError, check_artifact
    from viditq_compile.io.program_loader import load_program
    from viditq_compile.io.program_schema import ProgramError

    path = os.fspath(path)
    r = _Reader(path)
    try:
        plan = Plan.loads(r.read(PLAN), source=f"{path}/{PLAN}", read_sibling=r.read_sibling)
    except (PlanError, CalibrationError) as e:
        raise ArtifactError(f"{path}: {PLAN}: {e}") from None
    weights = r.read(WEIGHTS)
    try:
        tensors = load_safetensors(weights)
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise ArtifactError(f"{path}: {WEIGHTS} cannot be read: {str(e)[:200]}") from None
    del weights
    tables = _bucket_tables(tensors, len(r.programs), path)
    programs: list = []
    for i, name in enumerate(r.programs):
        program = r.read(name)
        try:
            _check_sample_inputs(program, f"{path}/{name}")
            ep = load_program(program, tables[i], f"{path}/{name}", subset=i > 0)
            check_artifact(ep, plan)
        except ProgramError as e:
            raise ArtifactError(f"{path}: {name} refused: {e}") from None
        except ConsistencyError as e:
            raise ArtifactError(f"{path}: plan, {name} and weights disagree: {e}") from None
        except (KeyError, TypeError, AttributeError, IndexError) as e:  # a viditq op with malformed operands
            raise ArtifactError(f"{path}: plan, {name} and weights cannot be matched: "
                                f"{type(e).__name__}: {str(e)[:200]}") from None
        del program
        if programs:
            from viditq_compile.buckets import share_tensors

            share_tensors(programs, ep)  # one copy in memory of what the buckets share
        programs.append(ep)
    if len(programs) > 1:
        read = {f"bucket{i}/{k}" if f"bucket{i}/{k}" in tensors else k
                for i, ep in enumerate(programs) for k in _tensors(ep)}
        unread = sorted(set(tensors) - read)
        if unread:
            raise ArtifactError(f"{path}: {WEIGHTS} holds tensors no program reads: {unread[:5]}")
    return programs, plan


_BUCKET_KEY = re.compile(r"bucket([1-9][0-9]{0,2})/(.+)\Z", re.S)


def _bucket_tables(tensors: dict[str, torch.Tensor], n: int, path: str) -> list[dict[str, torch.Tensor]]:
    """Each bucket's ``state_dict/...`` / ``constants/...`` table: bucket 0's names, overridden
    by ``bucket<i>/<name>`` entries. A tensor of bucket 0 that any bucket reads is made 64-byte
    aligned here, once, so that the buckets share it (``load_program`` copies unaligned ones)."""
    base: dict[str, torch.Tensor] = {}
    own: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for key, t in tensors.items():
        m = _BUCKET_KEY.match(key)
        if m is None:
            base[key] = t
        elif int(m.group(1)) < n:
            own[int(m.group(1))][m.group(2)] = t
        else:
            raise ArtifactError(f"{path}: {WEIGHTS}: {key[:120]!r} belongs to resolution bucket "
                                f"{m.group(1)}, but the artifact has {n} program(s)")
    if n > 1:
        base = {k: t.clone() if t.numel() and t.data_ptr() % 64 else t for k, t in base.items()}
    return [{**base, **own[i]} if i else base for i in range(n)]


def _check_sample_inputs(program: bytes, source: str) -> None:
    """``vq.load`` never unpickles the archive's sample inputs (``save`` writes none); where an
    archive has them they are still checked, statically, so that an archive vq.load accepts is no
    trap for a later ``torch.export.load`` of it: plain tensors only (no fake-tensor reducer, whose
    JSON argument reaches sympy's evaluator)."""
    from viditq_compile.io.program_schema import ProgramError
    from viditq_compile.io.safe_pt2 import ALLOWED_GLOBALS, _member_refusal
    from viditq_compile.io.zip_reader import StrictZip, ZipFormatError

    try:
        z = StrictZip(program, source=source)
        for name in z.names():
            if name.endswith("/data/sample_inputs/model.pt") and z.members[name].size:
                refusal = _member_refusal(z.read(name, max_size=1 << 30), True, ALLOWED_GLOBALS)
                if refusal is not None:
                    raise ProgramError(f"{source}: member {name!r} {refusal[1]}")
    except ZipFormatError as e:
        raise ProgramError(str(e)) from None
