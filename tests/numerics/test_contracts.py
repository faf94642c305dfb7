"""``numerics/contracts.py``: the ops' operand checks, public, shared by every route."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch

import viditq_compile
from viditq_compile.numerics import contracts
from viditq_compile.ops import library

ROOT = pathlib.Path(viditq_compile.__file__).parent
CHECKS = ("check_w8a8_args", "check_balance_args", "check_quantize_act_args", "check_quantize_act_fp8_args",
          "check_qlinear_args",
          "check_qweight_args", "check_qlinear_fused_args", "check_qlinear_timestep_args")


def test_the_checks_are_public_here_and_nowhere_else():
    assert set(CHECKS) == set(contracts.__all__)
    assert not [n for n in vars(library) if n.startswith("_check")]


@pytest.mark.parametrize("op,call,match", [
    ("quantize_act", lambda: contracts.check_quantize_act_args(torch.zeros(2, 8), None, [], None, 3), "act_bits=3"),
    ("qlinear_timestep", lambda: contracts.check_qlinear_timestep_args(
        torch.zeros(2, 8, dtype=torch.int8), None, [], torch.zeros(()), [], [], [], [], None, [], [], 0,
        torch.float32), "x must be a floating point"),
    ("balance", lambda: contracts.check_balance_args(torch.zeros(2, 8), torch.ones(4), []), "smooth"),
])
def test_a_refusal_names_the_op(op, call, match):
    with pytest.raises(ValueError, match=rf"^viditq\.{op}: .*{match}"):
        call()


def _subpackage(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else module


@pytest.mark.parametrize("sub", ["ops", "kernels", "lowering", "numerics"])
def test_no_private_name_is_imported_across_packages(sub):
    """``from viditq_compile.<other>.<module> import _name`` (or ``module._name`` on an imported
    package module) in ops/, kernels/, lowering/, numerics/: the name belongs to its package."""
    found = []
    for path in sorted((ROOT / sub).rglob("*.py")):
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("viditq_compile."):
                for a in node.names:
                    if _subpackage(node.module) != sub and a.name.startswith("_"):
                        found.append(f"{path.name}:{node.lineno}: from {node.module} import {a.name}")
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_") \
                    and node.value.id in aliases and _subpackage(aliases[node.value.id]) != sub \
                    and not node.attr.startswith("__"):
                found.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr} ({aliases[node.value.id]})")
    assert not found, "\n".join(found)
