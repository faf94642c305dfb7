"""A dependency-free PNG encoder and a 5x9 bitmap font (numpy and the standard library only)."""

from __future__ import annotations

import struct
import zlib

import numpy as np

# --- PNG ---------------------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(rgb: np.ndarray) -> bytes:
    """``rgb``: [H, W, 3] uint8, row-major, H and W >= 1. Returns a PNG: RGB8, filter 0, one IDAT."""
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"encode_png needs an [H, W, 3] array, got shape {getattr(rgb, 'shape', type(rgb))}")
    if rgb.dtype != np.uint8:
        raise ValueError(f"encode_png needs uint8 pixels, got {rgb.dtype}")
    h, w, _ = rgb.shape
    if h == 0 or w == 0:
        raise ValueError(f"encode_png needs a non-empty image, got shape {rgb.shape}")
    rows = np.zeros((h, 1 + 3 * w), np.uint8)  # column 0 is each scanline's filter byte: 0, none
    rows[:, 1:] = rgb.reshape(h, 3 * w)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit, truecolour, deflate, filter 0, no interlace
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
            + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + _chunk(b"IEND", b""))


# --- font --------------------------------------------------------------------------------------

# Each token: the character, then one hex byte per pixel row from the top (bit 4 = left column).
# Rows 0-6 hold capitals and the x-height; rows 7-8 only descenders. Missing rows are blank.
_FONT_TABLE = """
00e11131519110e 1040c040404040e 20e11010204081f 31f02040201110e 402060a121f0202 51f101e0101110e
60608101e11110e 71f010204080808 80e11110e11110e 90e11110f01020c A0e11111f111111 B1e11111e11111e
C0e11101010110e D1c12111111121c E1f10101e10101f F1f10101e101010 G0e11101711110f H1111111f111111
I0e04040404040e J0702020202120c K11121418141211 L1010101010101f M111b1515111111 N11111915131111
O0e11111111110e P1e11111e101010 Q0e11111115120d R1e11111e141211 S0f10100e01011e T1f040404040404
U1111111111110e V11111111110a04 W1111111515150a X11110a040a1111 Y11110a04040404 Z1f01020408101f
a00000e010f110f b1010161911111e c00000e1010110e d01010d1311110f e00000e111f100e f0609081c080808
g00000f1111110f010e h10101619111111 i04000c0404040e j02000602020202120c k10101214181412
l0c04040404040e m00001a15151515 n00001619111111 o00000e1111110e p00001e1111111e1010
q00000f1111110f0101 r00001619101010 s00000e100e011e t08081c08080906 u0000111111130d v00001111110a04
w0000111115150a x0000110a040a11 y0000111111110f010e z00001f0204081f .00000000000c0c _0000000000001f
-0000001f000000 <02040810080402 >08040201020408 =00001f001f0000 |04040404040404 /00010204081000
:000c0c000c0c00 (02040808080402 )08040202020408 [0e08080808080e ]0e02020202020e %18190204081303
+0004041f040400 ,00000000000c0408
"""
GLYPH_W, GLYPH_H = 5, 9
_ADVANCE = GLYPH_W + 1


def _parse_glyph(hexrows: str) -> np.ndarray:
    rows = [int(hexrows[i:i + 2], 16) for i in range(0, len(hexrows), 2)]
    rows += [0] * (GLYPH_H - len(rows))
    return np.array([[(r >> (GLYPH_W - 1 - c)) & 1 for c in range(GLYPH_W)] for r in rows], bool)


_GLYPHS = {tok[0]: _parse_glyph(tok[1:]) for tok in _FONT_TABLE.split()}
_GLYPHS[" "] = np.zeros((GLYPH_H, GLYPH_W), bool)
_BOX = _parse_glyph("1f11111111111f")  # any character the table lacks


def _glyph(ch: str) -> np.ndarray:
    return _GLYPHS.get(ch, _BOX)


def text_width(text: str, scale: int = 1) -> int:
    return max(0, len(text) * _ADVANCE - 1) * scale


def _draw_text(img: np.ndarray, x: int, y: int, text: str, color, scale: int = 1) -> None:
    """Top-left of the first glyph cell at (x, y); clipped to ``img``."""
    h, w, _ = img.shape
    for i, ch in enumerate(text):
        mask = _glyph(ch)
        if scale > 1:
            mask = mask.repeat(scale, 0).repeat(scale, 1)
        gx, gy = x + i * _ADVANCE * scale, y
        x0, y0 = max(gx, 0), max(gy, 0)
        x1, y1 = min(gx + mask.shape[1], w), min(gy + mask.shape[0], h)
        if x0 < x1 and y0 < y1:
            img[y0:y1, x0:x1][mask[y0 - gy:y1 - gy, x0 - gx:x1 - gx]] = color


draw_text = _draw_text  # public name for other pictures drawn with this font (benchmarks/charts.py)


