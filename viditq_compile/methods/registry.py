"""The quantization methods, in the order their passes apply: the one list the pipeline reads.

A method is a ``Method``: its name, the ``LayerPlan`` fields it owns, and ``rewrite`` (its graph
pass: ``(tensors, sites, plan, *, stats, cache) -> number of rewrites``). Its module under
``methods/`` holds what the method means (names, eager reference); its pass under ``passes/``;
its ops in ``ops/schema.py`` + ``ops/library.py``; its kernels under ``kernels/``. Adding a method
is one entry here (CONTRIBUTING.md, "Add a method").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from viditq_compile.methods import balance, int_weight
from viditq_compile.passes.balance import balance_linears
from viditq_compile.passes.quantize import quantize_linears


@dataclass(frozen=True)
class Method:
    name: str
    fields: tuple[str, ...]
    rewrite: Callable[..., int]


def _balance(tensors, sites, plan, *, stats=None, cache=None) -> int:
    return balance_linears(tensors, sites, plan, stats)


def _int_weight(tensors, sites, plan, *, stats=None, cache=None) -> int:
    return quantize_linears(tensors, sites, plan, cache=cache, stats=stats)


METHODS: tuple[Method, ...] = (
    Method(balance.NAME, balance.FIELDS, _balance),          # before: it rewrites the inputs the GEMMs read
    Method(int_weight.NAME, int_weight.FIELDS, _int_weight),
)


def get(name: str) -> Method:
    for m in METHODS:
        if m.name == name:
            return m
    raise KeyError(f"no quantization method {name!r}; known: {[m.name for m in METHODS]}")
