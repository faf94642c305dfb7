"""``QuantizedModel``: a call at a size its program does not take is refused with
``InputShapeError`` naming the argument and the dimension, before the program runs; relations
the check does not model come back from the program's guards as the same error."""

import pytest
import torch

import viditq_compile as vq
from viditq_compile.program import InputShapeError


class _Joint(torch.nn.Module):
    """Two token streams concatenated and added to a position table read from ``ids``: the
    program ties ``N_a + N_b == rows(ids)``, a relation no single dimension shows."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, a, b, ids):
        return self.fc(torch.cat([a, b], 1) + ids)


def test_input_shape_error_is_a_value_error():
    assert issubclass(InputShapeError, ValueError)


def test_a_fixed_feature_width_names_the_positional_argument(mlp_block):
    m, (x, s) = mlp_block
    qm = vq.quantize(m, (x, s))
    with pytest.raises(InputShapeError) as e:
        qm(torch.randn(2, 16, 32), s)
    text = str(e.value)
    assert text.startswith("x dim 2 (features) is 32 (shape [2, 16, 32]), but this program takes 64")
    assert "quantize again with an example call at that size" in text
    with pytest.raises(InputShapeError, match=r"scale dim 0 \(B\) is 3, but x dim 0 \(B\) is 2"):
        qm(x, torch.randn(3, 64))
    with pytest.raises(InputShapeError, match="x has 2 dimensions"):
        qm(torch.randn(16, 64), s)


def test_a_relation_the_check_does_not_model_comes_back_as_the_same_error():
    m = _Joint().eval()
    a, b, ids = torch.randn(2, 4, 16), torch.randn(2, 3, 16), torch.randn(7, 16)
    qm = vq.quantize(m, (a, b, ids))
    torch.testing.assert_close(qm(torch.randn(2, 5, 16), b, torch.randn(8, 16)).shape, torch.Size([2, 8, 16]))
    with pytest.raises(InputShapeError) as e:
        qm(a, b, torch.randn(9, 16))
    text = str(e.value)
    assert "a [2, 4, 16], b [2, 3, 16], ids [9, 16]" in text and "ids.size()[0]" in text
    assert "Guard failed" not in text and e.value.__cause__ is None


def test_input_shapes_print_what_each_dimension_takes(mlp_block):
    qm = vq.quantize(*mlp_block)
    shapes = qm.input_shapes
    assert shapes.fixed() == {"x": {2: 64}, "scale": {1: 64}}
    assert shapes.dynamic() == {"x": {0: "any size", 1: "any size"}, "scale": {0: "any size"}}
    assert "x [B, tokens, features]: B=any size (= scale[0]), tokens=any size, features=64" in str(shapes)


def test_a_call_of_another_structure_is_left_to_the_program(mlp_block):
    m, (x, s) = mlp_block
    qm = vq.quantize(m, (x, s))
    assert qm.input_shapes.flatten((x,), {}) is None
    with pytest.raises(Exception) as e:
        qm(x)
    assert not isinstance(e.value, InputShapeError)


@pytest.mark.parametrize("recipe", ["w8a8", "w4a8"])
def test_a_program_whose_output_is_a_quantized_linear_saves_and_loads(tmp_path, recipe):
    """The quantize pass replaces the node the program returns; its output spec follows it, so
    ``save`` (``torch.export``'s verifier) accepts the program and the reload computes the same."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
    x = torch.randn(2, 16, 64)
    qm = vq.quantize(model, (x,), recipe=recipe)
    assert qm.report.num_quantized == 2
    qm.save(tmp_path / "q")
    back = vq.load(tmp_path / "q")
    assert torch.equal(back(x), qm(x))
