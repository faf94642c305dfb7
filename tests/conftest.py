import pytest
import torch

from tests.triton_interpreter import relayed_call


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """Without CUDA, a Triton kernel test reports its outcome under Triton's interpreter, from a
    child pytest (``tests/triton_interpreter.py``); every other test runs here."""
    return relayed_call(pyfuncitem)


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
