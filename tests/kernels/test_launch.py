"""Tests for viditq_compile.kernels.launch: the device guard every Triton launch runs under."""

import contextlib

import torch

from viditq_compile.kernels import launch


def test_a_cuda_device_is_made_current_for_the_launch(monkeypatch):
    """With one or no GPU here: ``torch.cuda.device`` is replaced by a recorder, and the guard for
    ``cuda:1`` must enter it with device index 1 (a second GPU's tensors launch on that GPU)."""
    entered = []

    @contextlib.contextmanager
    def recorder(device):
        entered.append(torch.device(device))
        yield

    monkeypatch.setattr(torch.cuda, "device", recorder)
    with launch.device_guard(torch.device("cuda", 1)):
        assert entered == [torch.device("cuda", 1)]
    assert entered[0].index == 1


def test_other_devices_get_no_guard(monkeypatch):
    def refuse(device):
        raise AssertionError(f"torch.cuda.device({device}) entered for a non-CUDA tensor")

    monkeypatch.setattr(torch.cuda, "device", refuse)
    for device in ("cpu", "meta"):
        with launch.device_guard(torch.device(device)):
            pass
