"""Calibration statistics: ``CalibrationStats`` and its safetensors file format.

Statistics are saved to one safetensors file (tensors ``absmax/<layer>`` [n, K] and
``timesteps/<layer>`` [n], metadata ``format`` / ``version`` / ``num_model_calls``), so quantizing
again does not re-run the sampler. Loading never unpickles anything.
"""


from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from viditq_compile.io.atomic import atomic_write_bytes
from viditq_compile.io.files import read_capped
from viditq_compile.io.yaml_loader import short_repr

log = logging.getLogger(__name__)

FORMAT = "viditq-calibration"
VERSION = "1"
MAX_CALIBRATION_BYTES = 16 << 30
"""Largest statistics file ``load`` reads into memory (a 28-block DiT over 200 calls is ~100 MiB)."""



class CalibrationError(ValueError):
    """Calibration data or a statistics file is unusable; the message names the layer or item."""



@dataclass
class CalibrationStats:
    """Per-call input statistics of the observed linear layers.

    absmax_per_call: layer module path -> [n_calls, K] fp32, row i = per-input-channel absmax of
        the layer's input on its i-th call.
    timesteps: layer module path -> [n_calls] fp32, the timestep of the model call that produced
        row i (NaN when the model takes no timestep).
    num_model_calls: how many times the model itself was called.
    """

    absmax_per_call: dict[str, Tensor]
    timesteps: dict[str, Tensor]
    num_model_calls: int

    @property
    def layers(self) -> list[str]:
        return sorted(self.absmax_per_call)

    def __contains__(self, name: object) -> bool:
        return name in self.absmax_per_call

    def _rows(self, name: str) -> Tensor:
        rows = self.absmax_per_call.get(name)
        if rows is None:
            raise CalibrationError(f"no calibration statistics for layer {name!r} "
                                   f"({len(self.absmax_per_call)} layers calibrated)")
        return rows

    def in_features(self, name: str) -> int:
        return int(self._rows(name).shape[-1])

    def absmax(self, name: str) -> Tensor:
        """[K] fp32: max over every call of the layer."""
        return self._rows(name).amax(dim=0)

    def absmax_at(self, name: str, t_lo: float, t_hi: float) -> Tensor:
        """[K] fp32: max over the calls whose timestep lies in [t_lo, t_hi] (inclusive)."""
        rows = self._rows(name)
        if t_lo > t_hi:
            raise CalibrationError(f"layer {name!r}: empty timestep range [{t_lo}, {t_hi}]")
        ts = self.timesteps[name]
        sel = (ts >= t_lo) & (ts <= t_hi)
        if not bool(sel.any()):
            known = ts[~ts.isnan()]
            seen = (f"recorded timesteps span [{known.min().item():g}, {known.max().item():g}]"
                    if known.numel() else "no timesteps were recorded")
            raise CalibrationError(f"layer {name!r}: no calibration call has a timestep in "
                                   f"[{t_lo}, {t_hi}] ({seen})")
        return rows[sel].amax(dim=0)

    def validate(self) -> None:
        """Raise ``CalibrationError`` unless every layer has >= 1 finite, non-negative fp32 row
        of one width and a timestep per row."""
        n = self.num_model_calls
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise CalibrationError(f"num_model_calls must be an int >= 1, got {n!r}")
        if not self.absmax_per_call:
            raise CalibrationError("calibration statistics hold no layers")
        if set(self.timesteps) != set(self.absmax_per_call):
            diff = sorted(set(self.timesteps) ^ set(self.absmax_per_call))
            raise CalibrationError(f"absmax and timesteps name different layers: {diff[:5]}")
        for name in self.layers:
            rows, ts = self.absmax_per_call[name], self.timesteps[name]
            if not isinstance(rows, Tensor) or not isinstance(ts, Tensor):
                raise CalibrationError(f"layer {name!r}: statistics must be tensors")
            if rows.dtype != torch.float32 or ts.dtype != torch.float32:
                raise CalibrationError(f"layer {name!r}: statistics must be float32, got "
                                       f"{rows.dtype} / {ts.dtype}")
            if rows.dim() != 2 or rows.shape[0] < 1 or rows.shape[1] < 1:
                raise CalibrationError(f"layer {name!r}: absmax must be [n_calls >= 1, K >= 1], "
                                       f"got {tuple(rows.shape)}")
            if ts.shape != rows.shape[:1]:
                raise CalibrationError(f"layer {name!r}: {rows.shape[0]} absmax rows but timesteps "
                                       f"of shape {tuple(ts.shape)}")
            if not bool(torch.isfinite(rows).all()):
                raise CalibrationError(f"layer {name!r}: absmax holds NaN or Inf")
            if bool((rows < 0).any()):
                raise CalibrationError(f"layer {name!r}: absmax holds negative values")
            if bool(ts.isinf().any()):
                raise CalibrationError(f"layer {name!r}: timesteps hold Inf")

    def check_model(self, in_features: Mapping[str, int]) -> list[str]:
        """Compare with a model's linear layers (module path -> K). Raises naming every layer whose
        K differs; returns the layers the statistics lack (not an error: the caller reports them)."""
        mismatched = [f"{name} (model K={k}, statistics K={self.in_features(name)})"
                      for name, k in in_features.items() if name in self and self.in_features(name) != k]
        if mismatched:
            raise CalibrationError(f"calibration statistics do not fit the model: input width differs for "
                                   f"{len(mismatched)} layer(s): {', '.join(mismatched)}")
        return [name for name in in_features if name not in self]

    # -- file ---------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The safetensors file ``save`` writes (see the module docstring), in memory."""
        from safetensors.torch import save

        self.validate()
        tensors = {}
        for name in self.layers:
            tensors[f"absmax/{name}"] = self.absmax_per_call[name].detach().cpu().contiguous()
            tensors[f"timesteps/{name}"] = self.timesteps[name].detach().cpu().contiguous()
        meta = {"format": FORMAT, "version": VERSION, "num_model_calls": str(self.num_model_calls)}
        return save(tensors, metadata=meta)

    def save(self, path: str | os.PathLike) -> None:
        """Write one safetensors file; replaces ``path`` atomically (``io.atomic``: staged, fsynced,
        renamed; a failed save leaves the previous file as it was). A symlink at ``path`` is refused."""
        atomic_write_bytes(path, self.to_bytes())

    @staticmethod
    def loads(data: bytes, source: str) -> CalibrationStats:
        """Statistics from the bytes of a file written by ``save``; validated, never unpickles.
        ``source`` names the file in every error (``CalibrationError``)."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise CalibrationError(f"{source}: expected the bytes of a calibration file, got {type(data).__name__}")
        data = bytes(data)
        meta = _safetensors_metadata(data, source)
        try:
            tensors = load(data)
        except (SafetensorError, ValueError, RuntimeError, TypeError, OverflowError) as e:
            raise CalibrationError(f"calibration file {source!r} is not a readable safetensors file "
                                   f"(truncated or another format): {_one_line(e)}") from None
        if meta.get("format") != FORMAT:
            raise CalibrationError(f"{source}: not a viditq calibration file (format "
                                   f"{short_repr(meta.get('format'))}, expected {FORMAT!r})")
        if meta.get("version") != VERSION:
            raise CalibrationError(f"{source}: calibration format version {short_repr(meta.get('version'))} is "
                                   f"not supported (this viditq_compile reads version {VERSION!r})")
        raw = meta.get("num_model_calls", "")
        if not (isinstance(raw, str) and raw.isascii() and raw.isdigit() and len(raw) <= 18):
            raise CalibrationError(f"{source}: metadata num_model_calls {short_repr(raw)} is not an integer")
        absmax: dict[str, torch.Tensor] = {}
        timesteps: dict[str, torch.Tensor] = {}
        for key, t in tensors.items():
            kind, _, name = key.partition("/")
            if kind not in ("absmax", "timesteps") or not name:
                raise CalibrationError(f"{source}: unexpected tensor {short_repr(key)}")
            (absmax if kind == "absmax" else timesteps)[name] = t
        stats = CalibrationStats(absmax, timesteps, int(raw))
        try:
            stats.validate()
        except CalibrationError as e:
            raise CalibrationError(f"{source}: {e}") from None
        return stats

    @staticmethod
    def load(path: str | os.PathLike) -> CalibrationStats:
        """Read a file written by ``save`` (once, into memory); validated. Never unpickles."""
        path = os.fspath(path)
        return CalibrationStats.loads(read_calibration_file(path), source=path)


def read_calibration_file(path: str) -> bytes:
    """The bytes of a calibration file, read once, at most ``MAX_CALIBRATION_BYTES``; every OS error
    (missing, a directory, unreadable) as a ``CalibrationError`` naming the path."""
    return read_capped(path, MAX_CALIBRATION_BYTES, "calibration file", CalibrationError)


def _safetensors_metadata(data: bytes, source: str) -> dict[str, str]:
    """``__metadata__`` of a safetensors file's JSON header (u64 little-endian length, then the
    header), parsed here with the length bounded by the data; ``{}`` when absent."""
    bad = f"calibration file {source!r} is not a readable safetensors file (truncated or another format)"
    if len(data) < 8:
        raise CalibrationError(f"{bad}: {len(data)} bytes, shorter than the 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise CalibrationError(f"{bad}: header length {n} runs past the end of the file ({len(data)} bytes)")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CalibrationError(f"{bad}: header is not JSON: {_one_line(e)}") from None
    if not isinstance(header, dict):
        raise CalibrationError(f"{bad}: header is not a JSON object")
    meta = header.get("__metadata__", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CalibrationError(f"{source}: safetensors __metadata__ must map strings to strings, got "
                               f"{short_repr(meta)}")
    return meta


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


