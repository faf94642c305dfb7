"""The PNG encoder's bitmap font (report/png.py)."""

from viditq_compile.report import png


def test_font_covers_the_promised_characters_with_distinct_glyphs():
    chars = ("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ._-<>=|/:()[]%+,")
    glyphs = [png._glyph(ch) for ch in chars]
    assert all(g.shape == (png.GLYPH_H, png.GLYPH_W) and g.any() for g in glyphs)
    assert len({g.tobytes() for g in glyphs} | {png._glyph("~").tobytes()}) == len(chars) + 1
    assert png._glyph("~") is png._BOX and not png._glyph(" ").any()
