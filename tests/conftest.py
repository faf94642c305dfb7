import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/zoo.py and helpers import as top-level


@pytest.fixture(autouse=True)
def _seed_and_reset():
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


class ModulatedMLP(torch.nn.Module):
    """A DiT-like residual block: LayerNorm, adaLN modulation, MLP, a kept-FP final projection."""

    def __init__(self, d: int = 64):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.fc1 = torch.nn.Linear(d, 4 * d)
        self.fc2 = torch.nn.Linear(4 * d, d)
        self.proj_out = torch.nn.Linear(d, d)

    def forward(self, x, scale):
        h = self.norm(x) * (1 + scale[:, None, :])
        return self.proj_out(x + self.fc2(torch.nn.functional.gelu(self.fc1(h))))


@pytest.fixture
def mlp_block():
    m = ModulatedMLP().eval()
    args = (torch.randn(2, 16, 64), torch.randn(2, 64))
    return m, args
