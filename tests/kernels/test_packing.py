"""int4 packing: layout, round trip, edge values, errors, and the unpacking under torch.compile."""

import pytest
import torch

from viditq_compile.numerics.packing import pack_int4, unpack_int4


@pytest.mark.parametrize("shape", [(1, 2), (3, 2), (7, 38), (64, 1152)])
def test_round_trip(shape):
    q = torch.randint(-8, 8, shape, dtype=torch.int8)
    p = pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (shape[0], shape[1] // 2)
    assert torch.equal(unpack_int4(p), q)


def test_layout_low_nibble_is_the_even_index():
    q = torch.tensor([[-8, 7, 7, -8, 0, -1, 1, 0]], dtype=torch.int8)
    # byte j = (q[2j] & 0xF) | (q[2j+1] << 4)
    assert pack_int4(q).tolist() == [[0x78, 0x87, 0xF0, 0x01]]
    assert torch.equal(unpack_int4(pack_int4(q)), q)


def test_every_byte_unpacks_and_repacks():
    p = torch.arange(256, dtype=torch.uint8).reshape(2, 128)
    q = unpack_int4(p)
    assert q.min() == -8 and q.max() == 7
    assert torch.equal(pack_int4(q), p)


def test_unpack_under_torch_compile_equals_eager():
    # 37 bytes per row: the vectorized loop and its scalar tail both run
    p = torch.randint(0, 256, (3, 37), dtype=torch.uint8)
    assert torch.equal(torch.compile(unpack_int4, fullgraph=True)(p), unpack_int4(p))


def test_errors():
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([[8, 0]], dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([[0, -9]], dtype=torch.int8))
    with pytest.raises(ValueError, match="int8"):
        pack_int4(torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="uint8"):
        unpack_int4(torch.zeros(2, 4, dtype=torch.int8))
