"""The supported widths are spelled once (``config/capabilities.py``); recipes, plans, the search,
the numerics and the kernel-shape rules read them there."""

import ast
import itertools
import pathlib

import pytest
import torch

import viditq_compile
from viditq_compile.config import capabilities as cap
from viditq_compile.config.budget import Budget
from viditq_compile.config.plan import LayerPlan, PlanError
from viditq_compile.config.recipe import Recipe
from viditq_compile.methods import int_weight
from viditq_compile.mixed_precision.search import default_candidates, search
from viditq_compile.numerics import quant as numerics

ROOT = pathlib.Path(viditq_compile.__file__).parent
READERS = ["config/recipe.py", "config/plan.py", "mixed_precision/search.py", "passes/select.py",
           *(str(p.relative_to(ROOT)) for p in (ROOT / "report").glob("*.py"))]


def test_the_widths_and_the_candidates():
    assert cap.WEIGHT_BITS == (4, 8) and cap.ACT_BITS == (4, 8)
    assert cap.CANDIDATE_WIDTHS == ((8, 8), (8, 4), (4, 8), (4, 4))
    assert set(cap.CANDIDATE_WIDTHS) == set(itertools.product(cap.WEIGHT_BITS, cap.ACT_BITS))
    assert numerics.SUPPORTED_WEIGHT_BITS is cap.WEIGHT_BITS and numerics.SUPPORTED_ACT_BITS is cap.ACT_BITS
    assert set(int_weight.SEARCH_WEIGHT_SYM) == set(cap.WEIGHT_BITS)  # a symmetry for every width


@pytest.mark.parametrize("path", READERS)
def test_no_reader_spells_the_widths_again(path):
    """No tuple / list / set literal of the supported widths outside capabilities.py."""
    widths = set(cap.WEIGHT_BITS) | set(cap.ACT_BITS)
    for node in ast.walk(ast.parse((ROOT / path).read_text())):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(node.elts) > 1:
            values = [e.value for e in node.elts if isinstance(e, ast.Constant)]
            assert not (len(values) == len(node.elts) and set(values) == widths), \
                f"{path}:{node.lineno} spells {ast.unparse(node)}; read config.capabilities"


def test_refusals_name_the_supported_widths():
    r = Recipe.from_dict({"weight": {"n_bits": 6}, "act": {"n_bits": 3}})
    problems = " ".join(r.unsupported())
    assert f"supported: {cap.WEIGHT_BITS}" in problems and f"supported: {cap.ACT_BITS}" in problems
    with pytest.raises(PlanError, match=r"weight_bits=6 has no op \(supported: \(4, 8\)\)"):
        LayerPlan("fc", 16, 16, weight_bits=6, act_bits=8).validate()
    assert cap.unsupported_reason(1, 16, 16, 6, 0) == "weight_bits=6 (supported: 4, 8)"


def _old_default_candidates(budget):  # before the widths moved to capabilities
    w = [8] + ([4] if budget.weight_bits is None or budget.weight_bits < 8 else [])
    if budget.weight_bits is None and budget.weight_bytes is None:
        w = [8] + ([4] if budget.act_bits is not None and budget.act_bits < 8 else [])
    a = [8] + ([4] if budget.act_bits is not None and budget.act_bits < 8 else [])
    return sorted({(wb, ab) for wb in w for ab in a}, reverse=True)


@pytest.mark.parametrize("weight_bits,act_bits,weight_bytes", [
    b for b in itertools.product((None, 4.5, 8, 12), (None, 5.3, 8), (None, 1 << 20)) if any(x is not None for x in b)])
def test_default_candidates_are_unchanged_and_come_from_capabilities(weight_bits, act_bits, weight_bytes):
    budget = Budget(weight_bits=weight_bits, act_bits=act_bits, weight_bytes=weight_bytes)
    got = default_candidates(budget)
    assert got == _old_default_candidates(budget)
    assert set(got) <= set(cap.CANDIDATE_WIDTHS) and got[0] == cap.CANDIDATE_WIDTHS[0]


def test_the_search_refuses_a_candidate_without_an_op():
    model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    with pytest.raises(ValueError, match=r"activations \[4, 8\]"):
        search(model, [((torch.randn(2, 16),), {})], Budget(weight_bits=6), candidates=[(8, 6)])
