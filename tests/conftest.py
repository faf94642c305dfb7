import os
import shutil
import tempfile

import pytest

# Compile from nothing, as CI does: Inductor's caches key a plain torch.compile on the graph Dynamo
# traced, which does not see a change to a viditq decomposition (the backend salts its key,
# lowering/cache_key.py; tests that install() and call the inductor backend do not), so a warm cache
# here once passed a test that failed in CI. Child pytests (tests/triton_interpreter.py) share it.
_OWN_CACHE = "TORCHINDUCTOR_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="viditq-tests-inductor-")

import torch  # noqa: E402  (after the cache directory is chosen)

from tests.triton_interpreter import relayed_call  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)


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
