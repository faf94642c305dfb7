"""StrictZip accepts what torch and Python's zipfile write, and nothing two readers could read differently."""

import io
import struct
import zipfile

import pytest
import torch

from viditq_compile.io.zip_reader import StrictZip, ZipFormatError


def _zip(members, compress=zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compress) as z:
        for name, data in members:
            z.writestr(name, data)
    return buf.getvalue()


def test_reads_an_archive_torch_writes(tmp_path):
    """torch's writer (miniz): data descriptors, alignment padding, zip64 end records."""
    ep = torch.export.export(torch.nn.Linear(4, 3), (torch.randn(2, 4),))
    torch.export.save(ep, tmp_path / "p.pt2")
    data = (tmp_path / "p.pt2").read_bytes()
    z = StrictZip(data)
    with zipfile.ZipFile(tmp_path / "p.pt2") as ref:
        assert z.names() == ref.namelist()
        for name in ref.namelist():
            assert z.read(name, max_size=1 << 20) == ref.read(name)


def test_reads_stored_and_deflated_members():
    data = _zip([("a/x", b"hello"), ("a/y", b"ab" * 1000)], zipfile.ZIP_DEFLATED)
    z = StrictZip(data)
    assert z.read("a/y", max_size=2000) == b"ab" * 1000
    with pytest.raises(ZipFormatError, match="at most 100"):
        z.read("a/y", max_size=100)


@pytest.mark.parametrize("name", ["../x", "/abs", "a/../b", "a\\b", "a/\x01b", "a//b"])
def test_refuses_unsafe_names(name):
    with pytest.raises(ZipFormatError, match="name"):
        StrictZip(_zip([(name, b"x")]))


def test_refuses_case_folded_duplicates():
    with pytest.raises(ZipFormatError, match="duplicate"):
        StrictZip(_zip([("a/Model.json", b"1"), ("a/model.JSON", b"2")]))


@pytest.mark.parametrize("edit, match", [
    (lambda d: d + b"x", "end-of-central-directory"),
    (lambda d: b"\0" * 4 + d, "starts at byte|central directory"),
    (lambda d: d[:-22] + d[-22:-2] + b"\x01\x00" + b"c", "comment"),
])
def test_refuses_bytes_outside_members(edit, match):
    data = _zip([("a/x", b"hello"), ("a/y", b"world")])
    with pytest.raises(ZipFormatError, match=match):
        StrictZip(edit(data))


def test_refuses_a_local_header_that_disagrees():
    data = bytearray(_zip([("a/x", b"hello"), ("a/y", b"world")]))
    i = data.index(b"a/y")  # first occurrence: the local header
    data[i + 2:i + 3] = b"z"
    with pytest.raises(ZipFormatError, match="local header"):
        StrictZip(bytes(data))


def test_refuses_overlapping_members():
    """Two central entries pointing at one local header (one planted copy seen twice)."""
    data = _zip([("a/x", b"hello"), ("a/y", b"hello")])
    cd = data.index(b"PK\x01\x02", data.index(b"PK\x01\x02") + 1)
    first = struct.unpack_from("<I", data, data.index(b"PK\x01\x02") + 42)[0]
    data = data[:cd + 42] + struct.pack("<I", first) + data[cd + 46:]
    with pytest.raises(ZipFormatError, match="starts at byte"):
        StrictZip(data)


def test_refuses_a_crc_mismatch():
    data = bytearray(_zip([("a/x", b"hello")]))
    data[data.index(b"hello")] ^= 1
    with pytest.raises(ZipFormatError, match="CRC"):
        StrictZip(bytes(data)).read("a/x", max_size=10)


def test_refuses_a_bomb_from_its_header_and_bounds_a_lying_one():
    data = _zip([("a/x", b"\0" * (10 << 20))], zipfile.ZIP_DEFLATED)
    with pytest.raises(ZipFormatError, match="ratio"):
        StrictZip(data)
    z = StrictZip(data, max_ratio=10_000)
    with pytest.raises(ZipFormatError, match="at most"):
        z.read("a/x", max_size=1 << 20)  # refused before inflating


def test_refuses_encryption_and_other_methods():
    data = bytearray(_zip([("a/x", b"hello")]))
    for sig in (b"PK\x03\x04", b"PK\x01\x02"):
        at = data.index(sig) + (6 if sig == b"PK\x03\x04" else 8)
        data[at] |= 1  # "encrypted"
    with pytest.raises(ZipFormatError, match="flags"):
        StrictZip(bytes(data))


def test_refuses_truncated_archives():
    data = _zip([("a/x", b"hello" * 100)])
    for n in (0, 10, len(data) // 2, len(data) - 1):
        with pytest.raises(ZipFormatError):
            StrictZip(data[:n])
