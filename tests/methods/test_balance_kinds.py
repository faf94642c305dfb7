"""Balancing kinds are asked by meaning (``smooths`` / ``rotates``), never by substring."""

import pytest

from viditq_compile.methods import balance


@pytest.mark.parametrize("kind,smooth,rotate", [(None, False, False), ("smooth", True, False),
                                                ("rotate", False, True), ("smooth+rotate", True, True)])
def test_kinds_mean_what_they_say_and_round_trip(kind, smooth, rotate):
    assert balance.smooths(kind) is smooth and balance.rotates(kind) is rotate
    assert balance.kind_of(smooth, rotate) == kind


@pytest.mark.parametrize("bad", ["smoothx", "rotate+smooth", "", "SMOOTH"])
def test_an_unknown_kind_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="is not one of"):
        balance.smooths(bad)
