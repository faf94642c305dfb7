"""The grammar for symbolic sizes and guards: what torch emits parses and prints back the same
(up to spacing); anything that could reach Python does not."""

import pytest

from viditq_compile.io.sym_expr import SymExprError, canonical_guard, canonical_sym_expr, is_identifier

TORCH_SIZES = [
    "Symbol('s27', positive=True, integer=True)",
    "Mul(Integer(64), Symbol('s27', positive=True, integer=True))",
    "Add(Integer(-1), Symbol('s0', integer=True))",
    "FloorDiv(Symbol('s0', positive=True, integer=True), Integer(2))",
    "64*s27 + FloorDiv(s0, 2)",
    "Max(1, s0) - Mod(s1, 3)",
]
TORCH_GUARDS = [
    "L['x'].size()[0] == L['scale'].size()[0]",
    "2 <= L['hidden_states'].size()[1]",
    "(4*L['hidden_states'].size()[1]*(L['hidden_states'].size()[3] // 2)) == L['image_rotary_emb'][0].size()[0]",
    "math.trunc(torch.sym_float(4*(L['hidden_states'].size()[2] // 2)) ** 0.5) == 4",
    "L['x'].stride()[0] != 1 and not L['x'].size()[1] > 300",
]


@pytest.mark.parametrize("text", TORCH_SIZES)
def test_torch_sizes_round_trip(text):
    out = canonical_sym_expr(text)
    assert out.replace(" ", "") == text.replace(" ", "")
    assert canonical_sym_expr(out) == out


@pytest.mark.parametrize("text", TORCH_GUARDS)
def test_torch_guards_round_trip(text):
    out = canonical_guard(text)
    assert out.replace(" ", "") == text.replace(" ", "")


PAYLOADS = [
    "__import__('os').system('id')",
    "Symbol('s0').__class__",
    "Symbol('s0', integer=__import__('os'))",
    "Function('f')(s0)",
    "exec",
    "s0 if s0 else s1",
    "lambda: 0",
    "[c for c in ()]",
    "Integer(s0)",
    "Symbol('__import__')",
    "s0; s1",
    "(" * 200 + "1" + ")" * 200,
    "1" * 5000,
]


@pytest.mark.parametrize("text", PAYLOADS)
def test_payloads_are_refused_as_sizes(text):
    with pytest.raises(SymExprError):
        canonical_sym_expr(text)


@pytest.mark.parametrize("text", PAYLOADS + [
    "L['x'].size()[0].__class__", "L['x'].numpy()", "L['x'].size()[0] == getattr(L, 'x')",
    "math.system(1)", "torch.load('f')", "L['x'].size()[0] == 1.5e9999999999", "G['x'].size()[0]",
])
def test_payloads_are_refused_as_guards(text):
    with pytest.raises(SymExprError):
        canonical_guard(text)


def test_identifiers():
    assert is_identifier("p_fc1_weight")
    assert not any(is_identifier(s) for s in ["", "a b", "class", "x=1", "a\n", 3, None, "1a"])
