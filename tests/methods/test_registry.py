"""The method registry is the one list of quantization methods: every ``LayerPlan`` field belongs
to exactly one method (or names the layer), and the pipeline runs every method's pass."""

from __future__ import annotations

import dataclasses

import pytest

from viditq_compile.config.plan import LayerPlan
from viditq_compile.methods import registry

LAYER_IDENTITY = {"name", "in_features", "out_features", "reason", "note"}


def test_every_layer_plan_field_has_one_owner():
    owners: dict[str, list[str]] = {}
    for m in registry.METHODS:
        for f in m.fields:
            owners.setdefault(f, []).append(m.name)
    fields = {f.name for f in dataclasses.fields(LayerPlan)}
    assert set(owners) <= fields, f"methods claim fields LayerPlan lacks: {sorted(set(owners) - fields)}"
    unowned = fields - set(owners) - LAYER_IDENTITY
    assert not unowned, f"LayerPlan fields no method owns: {sorted(unowned)}"
    shared = {f: o for f, o in owners.items() if len(o) > 1}
    assert not shared, f"fields owned twice: {shared}"


def test_balance_runs_before_the_integer_method():
    names = [m.name for m in registry.METHODS]
    assert names.index("balance") < names.index("int_weight")


def test_unknown_method_is_named():
    with pytest.raises(KeyError, match="fp8"):
        registry.get("fp8")
    assert registry.get("balance").name == "balance"
