"""Capture errors: torch's whole message, and the backend named when export cannot work."""

import pytest
import torch

from viditq_compile.graph.capture import BACKEND_HINT, CaptureError, capture


class _DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: export cannot capture it
            return self.fc(x)
        return x


def test_an_export_failure_keeps_the_whole_torch_message_and_points_to_the_backend():
    m, x = _DataDependent(), torch.randn(2, 8)
    with pytest.raises(Exception) as raw:
        torch.export.export(m, (x,))
    torch_message = str(raw.value).strip()
    assert "\n" in torch_message  # torch's message has more than one line: all of it is kept
    with pytest.raises(CaptureError) as e:
        capture(m, (x,), dynamic=False)
    text = str(e.value)
    assert text.startswith(f"torch.export could not capture _DataDependent: {type(raw.value).__name__}: ")
    assert torch_message in text
    assert text.endswith(BACKEND_HINT)
    assert 'torch.compile(model, backend="viditq")' in text
    assert e.value.__cause__ is not None


def test_inputs_that_do_not_match_forward_are_not_sent_to_the_backend():
    with pytest.raises(CaptureError, match="inputs do not match") as e:
        capture(_DataDependent(), (torch.randn(2, 8), torch.randn(2, 8)))
    assert "backend" not in str(e.value)


# --------------------------------------------------------------------------------------------
# which dimensions stay dynamic, and pins the model's guards leave on a symbol
# --------------------------------------------------------------------------------------------


class _PatchPinned(torch.nn.Module):
    """A stride-2 patch embedding plus a learned [4, 4] position table: H // 2 == 4, W // 2 == 4,
    left by export as guards on the H/W symbols (as diffusers' PatchEmbed does)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Conv2d(4, 8, 2, stride=2)
        self.pos = torch.nn.Parameter(torch.randn(8, 4, 4))
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        h = self.proj(x) + self.pos
        return self.fc(h.flatten(2).transpose(1, 2))


class _PatchFree(torch.nn.Module):
    """Patchify by reshape (H and W even, any size) and a token MLP."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, x, t):
        b, c, h, w = x.shape
        p = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * 4)
        return self.fc(p) + t[:, None, None]


def _dims(ep, name):
    from viditq_compile.graph.shapes import InputShapes

    return {d.index: d for i in InputShapes.of(ep).inputs if i.name == name for d in i.dims}


def test_auto_dims_by_what_an_input_is():
    from torch.export import Dim

    from viditq_compile.graph.shapes import auto_dims

    assert auto_dims(torch.zeros(2, 4, 8, 8)) == {0: Dim.AUTO, 1: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO}
    assert set(auto_dims(torch.zeros(2, 4, 3, 8, 8))) == {0, 1, 2, 3, 4}
    assert set(auto_dims(torch.zeros(2, 16, 64))) == {0, 1}  # tokens: the feature width stays
    assert set(auto_dims(torch.zeros(2, 64))) == {0}
    assert set(auto_dims(torch.zeros(2))) == {0}
    assert auto_dims(torch.tensor(3.0)) is None and auto_dims(False) is None


def test_latent_hw_stays_dynamic_where_the_model_allows():
    x, t = torch.randn(2, 4, 8, 12), torch.randn(2)
    ep = capture(_PatchFree().eval(), (x, t))
    d = _dims(ep, "x")
    assert d[1].fixed and d[1].lo == 4
    for i in (0, 2, 3):
        assert not d[i].fixed and d[i].hi is None, i
    assert d[0].symbol == _dims(ep, "t")[0].symbol  # one batch
    m = ep.module()
    for shape in ((3, 4, 16, 8), (2, 4, 24, 40)):
        y = torch.randn(*shape)
        torch.testing.assert_close(m(y, torch.randn(shape[0])).shape[1], shape[2] * shape[3] // 4)


def test_a_pin_left_as_a_guard_becomes_the_programs_range():
    ep = capture(_PatchPinned().eval(), (torch.randn(2, 4, 8, 8),))
    d = _dims(ep, "x")
    assert (d[2].lo, d[2].hi) == (8, 9) and (d[3].lo, d[3].hi) == (8, 9)  # H // 2 == 4
    assert not d[0].fixed and d[0].hi is None
    from torch.utils._sympy.numbers import int_oo

    bounded = [(int(r.lower), int(r.upper)) for r in ep.range_constraints.values() if r.upper != int_oo]
    assert bounded == [(8, 9), (8, 9)]  # in the program itself: saved and loaded with it


def test_static_capture_fixes_every_dimension():
    ep = capture(_PatchFree().eval(), (torch.randn(2, 4, 8, 12), torch.randn(2)), dynamic=False)
    assert all(d.fixed for d in _dims(ep, "x").values())


_ZOO_SHAPES = {  # builder -> hidden_states: dims taken at any size, dims pinned -> (lo, hi)
    "pixart": ({0}, {1: (4, 4), 2: (16, 17), 3: (16, 17)}),
    "dit": ({0}, {1: (4, 4), 2: (8, 9), 3: (8, 9)}),
    "latte": ({0}, {1: (4, 4), 2: (4, 4), 3: (8, 9), 4: (8, 9)}),
    "flux": ({0, 1}, {2: (16, 16)}),
    "stdit3": ({0, 1, 2}, {3: (64, 64)}),
    "cogvideox": ({0, 1, 3, 4}, {2: (4, 4)}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", _ZOO_SHAPES)
def test_zoo_models_capture_with_what_they_pin(name):
    from tests import zoo

    model, kwargs = (zoo.ALL_BUILDERS.get(name) or zoo.build_cogvideox)()
    ep = capture(model, (), kwargs)
    dynamic, pinned = _ZOO_SHAPES[name]
    d = _dims(ep, "hidden_states")
    assert {i for i, r in d.items() if r.hi is None} == dynamic
    assert {i: (r.lo, r.hi) for i, r in d.items() if r.hi is not None} == pinned


class _NumpyOfASize(torch.nn.Module):
    """numpy on a size (Cosmos' RMS norm: np.sqrt(numel ratio)) cannot take a symbolic size."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        import numpy as np

        return self.fc(x) * float(np.sqrt(x.numel() / x.shape[-1]))


def test_a_model_that_refuses_symbolic_sizes_is_captured_static_with_a_warning(caplog):
    x = torch.randn(2, 5, 8)
    with caplog.at_level("WARNING", logger="viditq_compile.graph.capture"):
        ep = capture(_NumpyOfASize(), (x,))
    assert "cannot be exported with dynamic shapes" in caplog.text and "static shapes" in caplog.text
    x_node = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.meta["val"].dim() == 3)
    assert all(isinstance(d, int) for d in x_node.meta["val"].shape)  # static: the example's shape
    assert ep.module()(x).shape == (2, 5, 8)


def test_capture_leaves_the_callers_tensors_unmarked():
    x = torch.randn(2, 5, 8)
    with pytest.raises(CaptureError):
        capture(_Untraceable(), (x,))
    capture(_NumpyOfASize(), (x,))
    assert not [a for a in vars(x) if "dynamo" in a]


class _Untraceable(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: export fails in every mode
            return x
        return -x
