"""The op allowlist and the strict JSON reader of program_schema (the whole schema is exercised
through vq.load in tests/io/test_artifact.py)."""

import pytest

from viditq_compile.io.program_schema import ProgramError, allowed_target, parse_json


@pytest.mark.parametrize("target", [
    "torch.ops.aten.linear.default", "torch.ops.aten.native_layer_norm.default",
    "torch.ops.aten.scaled_dot_product_attention.default", "torch.ops.aten.view.default",
    "torch.ops.aten.sym_size.int", "torch.ops.viditq.qlinear.default", "torch.ops.viditq.quantize_act.default",
    "_operator.getitem", "_operator.mul", "torch.sym_max", "math.ceil",
])
def test_ops_a_program_needs_are_allowed(target):
    assert allowed_target(target)


@pytest.mark.parametrize("target", [
    "torch.ops.aten.from_file.default",  # creates / extends a file
    "torch.ops.aten._print.default",
    "torch.ops.aten.copy_.default", "torch.ops.aten.add_.Tensor", "torch.ops.aten.add.out",  # mutate
    "torch.ops.aten.set_.source_Storage",
    "torch.ops.higher_order.cond", "torch.ops.profiler._record_function_enter.default",
    "torch.serialization.os.system", "torch.load", "builtins.eval", "_operator.setitem", "math.pow.__self__",
    "torch.ops.viditq.not_an_op.default", "#custom", "", None, 3,
])
def test_everything_else_is_refused(target):
    assert not allowed_target(target)


def test_parse_json_refuses_duplicates_depth_and_bad_text():
    assert parse_json(b'{"a": [1, 2]}', "f") == {"a": [1, 2]}
    with pytest.raises(ProgramError, match="f: duplicate key 'a'"):
        parse_json(b'{"a": 1, "a": 2}', "f")
    with pytest.raises(ProgramError, match="deep"):
        parse_json(b"[" * 100_000 + b"]" * 100_000, "f")
    with pytest.raises(ProgramError, match="UTF-8"):
        parse_json(b"\xff", "f")
    with pytest.raises(ProgramError, match="not valid JSON"):
        parse_json(b"{", "f")
