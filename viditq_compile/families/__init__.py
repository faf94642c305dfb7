"""What the code knows about each DiT family, one module per family (``registry`` finds them)."""
