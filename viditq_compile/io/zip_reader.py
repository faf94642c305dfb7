"""One strict zip reader for archives from untrusted sources (a ``.pt2`` program).

Two zip implementations can disagree about one file (Python's ``zipfile`` trusts the central
directory, torch's miniz looks names up case-insensitively, either may skip bytes it does not
expect), so a check made with one reader proves nothing about what the other loads. This reader
accepts only archives where every reasonable reader must see the same members:

- the end-of-central-directory record ends the file exactly (no comment, no trailing bytes);
  zip64 records are read where the archive needs them;
- the central directory immediately follows the last member, and members tile the file from
  offset 0 with nothing between them (no hidden bytes, no overlaps, offsets in order);
- each local header agrees with its central entry (name, method, sizes, CRC); no encryption,
  no data descriptors, only stored or deflated members;
- names are relative ASCII paths without ``..``, backslashes or control characters, and no two
  names are equal after ASCII case folding;
- a deflated member inflates to exactly its stated size, within ``max_ratio`` times its
  compressed size and the caller's cap, and matches its CRC-32; it is never inflated further.

Members are located at open and read only when asked (``read``), so a member the caller never
reads is never inflated. ``ZipFormatError`` names the member and the cause.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

__all__ = ["StrictZip", "ZipFormatError", "ZipMember"]

_EOCD = struct.Struct("<4sHHHHIIH")
_EOCD64 = struct.Struct("<4sQHHIIQQQQ")
_LOCATOR64 = struct.Struct("<4sIQI")
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
_LOCAL = struct.Struct("<4sHHHHHIIIHH")
_MAX_MEMBERS = 100_000
_NAME_CHARS = frozenset(range(0x20, 0x7F)) - {ord("\\")}


class ZipFormatError(ValueError):
    """The archive is not one this reader accepts (the message names the member and the cause)."""


@dataclass(frozen=True)
class ZipMember:
    name: str
    method: int
    crc: int
    compressed_size: int
    size: int
    data_offset: int  # where the member's (compressed) bytes start in the archive


def _zip64_extra(extra: bytes, fields: list[int], where: str) -> list[int]:
    """Replace the 0xFFFFFFFF fields (in zip64 order) with the values of the zip64 extra block."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, pos)
        body = extra[pos + 4: pos + 4 + size]
        if len(body) != size:
            raise ZipFormatError(f"{where}: truncated extra field")
        if tag == 0x0001:
            out, at = [], 0
            for value in fields:
                if value == 0xFFFFFFFF:
                    if at + 8 > len(body):
                        raise ZipFormatError(f"{where}: zip64 extra field too short")
                    value = struct.unpack_from("<Q", body, at)[0]
                    at += 8
                out.append(value)
            return out
        pos += 4 + size
    if pos != len(extra):
        raise ZipFormatError(f"{where}: malformed extra field")
    if any(v == 0xFFFFFFFF for v in fields):
        raise ZipFormatError(f"{where}: zip64 sizes without a zip64 extra field")
    return fields


def _check_name(raw: bytes) -> str:
    if not raw or any(b not in _NAME_CHARS for b in raw):
        raise ZipFormatError(f"member name {raw[:80]!r} is empty or not printable ASCII")
    name = raw.decode("ascii")
    parts = name.split("/")
    if name.startswith("/") or any(p in ("", ".", "..") for p in parts[:-1]) or parts[-1] in (".", ".."):
        raise ZipFormatError(f"member name {name!r} is not a plain relative path")
    return name


class StrictZip:
    """The members of the zip archive ``data`` (bytes), validated as the module docstring says."""

    def __init__(self, data: bytes, *, source: str = "archive", max_ratio: int = 100):
        self.data, self.source, self.max_ratio = data, source, max_ratio
        self.members: dict[str, ZipMember] = {}
        self._parse()

    def fail(self, why: str) -> ZipFormatError:
        return ZipFormatError(f"{self.source}: {why}")

    def _end_records(self) -> tuple[int, int, int]:
        """(number of members, central directory offset, central directory size)."""
        d = self.data
        if len(d) < _EOCD.size:
            raise self.fail("too short to be a zip archive")
        at = len(d) - _EOCD.size
        sig, disk, cd_disk, n_disk, n, cd_size, cd_off, comment = _EOCD.unpack_from(d, at)
        if sig != b"PK\x05\x06":
            raise self.fail("does not end with an end-of-central-directory record (trailing bytes "
                            "or a comment are not accepted)")
        if disk or cd_disk or n_disk != n or comment:
            raise self.fail("multi-disk archives and archive comments are not accepted")
        self._cd_end = at
        loc = at - _LOCATOR64.size
        # miniz (torch) writes zip64 end records into every archive; others only when needed
        if loc >= 0 and d[loc:loc + 4] == b"PK\x06\x07":
            sig, disk64, eocd64_off, disks = _LOCATOR64.unpack_from(d, loc)
            if disk64 or disks != 1:
                raise self.fail("multi-disk zip64 archives are not accepted")
            if eocd64_off + _EOCD64.size != loc:
                raise self.fail("zip64 end record is not directly before its locator")
            (sig, rec_size, _vm, _vn, disk, cd_disk, n64_disk, n64, cd_size64,
             cd_off64) = _EOCD64.unpack_from(d, eocd64_off)
            if sig != b"PK\x06\x06" or rec_size != _EOCD64.size - 12 or disk or cd_disk or n64_disk != n64:
                raise self.fail("malformed zip64 end record")
            for small, big, full in ((n, n64, 0xFFFF), (cd_size, cd_size64, 0xFFFFFFFF),
                                     (cd_off, cd_off64, 0xFFFFFFFF)):
                if small != full and small != big:
                    raise self.fail("zip64 end record disagrees with the end record")
            n, cd_size, cd_off = n64, cd_size64, cd_off64
            self._cd_end = eocd64_off
        elif 0xFFFF in (n, n_disk) or 0xFFFFFFFF in (cd_size, cd_off):
            raise self.fail("zip64 locator missing")
        if cd_off + cd_size != self._cd_end:
            raise self.fail("bytes between the central directory and the end record")
        if n > _MAX_MEMBERS:
            raise self.fail(f"{n} members (at most {_MAX_MEMBERS})")
        return n, cd_off, cd_size

    def _parse(self) -> None:
        d = self.data
        n, cd_off, cd_size = self._end_records()
        pos, entries, folded = cd_off, [], set()
        for _ in range(n):
            if pos + _CENTRAL.size > self._cd_end:
                raise self.fail("central directory is truncated")
            (sig, _vm, _vn, flags, method, _t, _dt, crc, csize, size, nlen, xlen, clen, disk, _ia,
             _ea, off) = _CENTRAL.unpack_from(d, pos)
            if sig != b"PK\x01\x02":
                raise self.fail(f"bad central directory entry at byte {pos}")
            name = _check_name(d[pos + _CENTRAL.size: pos + _CENTRAL.size + nlen])
            extra = d[pos + _CENTRAL.size + nlen: pos + _CENTRAL.size + nlen + xlen]
            pos += _CENTRAL.size + nlen + xlen + clen
            where = f"{self.source}: member {name!r}"
            if clen or disk:
                raise ZipFormatError(f"{where}: member comments and multi-disk entries are not accepted")
            if flags & ~0x0808:  # only "UTF-8 names" and "data descriptor" (torch writes one per member)
                raise ZipFormatError(f"{where}: flags {flags:#x} (encryption, patches) not accepted")
            if method not in (0, 8):
                raise ZipFormatError(f"{where}: compression method {method} (only stored and deflate)")
            size, csize, off = _zip64_extra(extra, [size, csize, off], where)
            if method == 0 and size != csize:
                raise ZipFormatError(f"{where}: stored member whose sizes differ")
            if method == 8 and size > self.max_ratio * max(csize, 1) + 1024:
                raise ZipFormatError(f"{where}: inflates {size} bytes from {csize} (ratio past "
                                     f"{self.max_ratio})")
            key = name.lower()
            if key in folded:
                raise ZipFormatError(f"{where}: duplicate member name (names compare case-insensitively)")
            folded.add(key)
            entries.append((off, name, flags, method, crc, csize, size))
        if pos != self._cd_end:
            raise self.fail("central directory size does not match its entries")
        expected = 0
        for off, name, flags, method, crc, csize, size in entries:
            where = f"{self.source}: member {name!r}"
            if off != expected:
                raise ZipFormatError(f"{where}: starts at byte {off}, expected {expected} (members must "
                                     f"tile the archive in order, with no bytes between or overlapping)")
            if off + _LOCAL.size > cd_off:
                raise ZipFormatError(f"{where}: local header past the central directory")
            (sig, _v, lflags, lmethod, _t, _dt, lcrc, lcsize, lsize, lnlen,
             lxlen) = _LOCAL.unpack_from(d, off)
            lname = d[off + _LOCAL.size: off + _LOCAL.size + lnlen]
            lextra = d[off + _LOCAL.size + lnlen: off + _LOCAL.size + lnlen + lxlen]
            if sig != b"PK\x03\x04" or lname != name.encode("ascii"):
                raise ZipFormatError(f"{where}: local header missing or names another member")
            if lflags != flags or lmethod != method:
                raise ZipFormatError(f"{where}: local header disagrees with the central directory")
            if flags & 0x0008:
                # sizes and CRC follow the data, in a descriptor; the local fields must be zero
                if (lcrc, lcsize, lsize) != (0, 0, 0):
                    raise ZipFormatError(f"{where}: local header disagrees with the central directory")
            else:
                lsize, lcsize = (_zip64_extra(lextra, [lsize, lcsize], where)
                                 if 0xFFFFFFFF in (lsize, lcsize) else [lsize, lcsize])
                if (lcrc, lcsize, lsize) != (crc, csize, size):
                    raise ZipFormatError(f"{where}: local header disagrees with the central directory")
            start = off + _LOCAL.size + lnlen + lxlen
            expected = start + csize
            if flags & 0x0008:
                expected += self._descriptor(expected, crc, csize, size, where)
            if expected > cd_off:
                raise ZipFormatError(f"{where}: data runs into the central directory")
            self.members[name] = ZipMember(name, method, crc, csize, size, start)
        if expected != cd_off:
            raise self.fail(f"{cd_off - expected} bytes between the last member and the central directory")

    def _descriptor(self, at: int, crc: int, csize: int, size: int, where: str) -> int:
        """Length of the data descriptor at ``at``, which must repeat the central entry's values."""
        d = self.data
        if d[at:at + 4] != b"PK\x07\x08":
            raise ZipFormatError(f"{where}: data descriptor missing or unsigned")
        if struct.unpack_from("<III", d, at + 4) == (crc, csize, size) and csize < 0xFFFFFFFF > size:
            return 16
        if at + 24 <= len(d) and struct.unpack_from("<IQQ", d, at + 4) == (crc, csize, size):
            return 24
        raise ZipFormatError(f"{where}: data descriptor disagrees with the central directory")

    def names(self) -> list[str]:
        return list(self.members)

    def read(self, name: str, *, max_size: int) -> bytes:
        """The bytes of member ``name``, at most ``max_size`` of them (checked before inflating)."""
        m = self.members.get(name)
        if m is None:
            raise self.fail(f"member {name!r} is missing")
        where = f"{self.source}: member {name!r}"
        if m.size > max_size:
            raise ZipFormatError(f"{where}: {m.size} bytes (at most {max_size} accepted)")
        raw = self.data[m.data_offset: m.data_offset + m.compressed_size]
        if m.method == 0:
            out = bytes(raw)
        else:
            inflater = zlib.decompressobj(-15)
            try:
                out = inflater.decompress(raw, m.size + 1)
            except zlib.error as e:
                raise ZipFormatError(f"{where}: corrupt deflate data ({e})") from None
            if len(out) != m.size or not inflater.eof or inflater.unconsumed_tail or inflater.unused_data:
                raise ZipFormatError(f"{where}: deflate data does not inflate to exactly {m.size} bytes")
        if zlib.crc32(out) != m.crc:
            raise ZipFormatError(f"{where}: CRC-32 mismatch (corrupt)")
        return out
