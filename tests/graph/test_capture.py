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
