"""Calibration: the statistics file format (``stats``) and the observers that fill it (``observe``)."""
