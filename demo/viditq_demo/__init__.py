"""The viditq_compile demo: a PixArt-style demo DiT, the trained digits DiT and its quality suite.

Its own package (``demo/pyproject.toml``), not part of the library wheel.
"""
