"""``calibration=`` means the same at every entry point (``calibration.observe.resolve_calibration``):
``vq.quantize`` takes statistics, a saved file, calls and a sampler; ``vq.search`` calls and a
sampler (it replays them); the ``torch.compile`` backend statistics and a saved file (it cannot
run the model). Each refusal says why."""

import pytest
import torch

import viditq_compile as vq
from viditq_compile import backend
from viditq_compile.backend import last_report
from viditq_compile.calibration.observe import ACCEPTS, CALIBRATION_KINDS, calibration_kind, resolve_calibration


def _calls(n=3):
    g = torch.Generator().manual_seed(1)
    return [((torch.randn(2, 16, 64, generator=g), torch.randn(2, 64, generator=g)), {}) for _ in range(n)]


def _sampler(model):
    for args, kwargs in _calls():
        model(*args, **kwargs)


@pytest.fixture
def kinds(mlp_block, tmp_path):
    """kind -> a calibration of that kind for ``mlp_block``'s model."""
    m, _ = mlp_block
    stats = vq.calibrate(m, _calls(), progress=False)
    stats.save(tmp_path / "calib.safetensors")
    return {"statistics": stats, "path": str(tmp_path / "calib.safetensors"),
            "pathlike": tmp_path / "calib.safetensors", "calls": _calls(), "generator": iter(_calls()),
            "sampler": _sampler}


def _kind(name):
    return {"pathlike": "path", "generator": "calls"}.get(name, name)


def _balances(report):
    return {r.balance for r in report.rows if r.quantized}


def test_the_kinds_and_what_each_entry_point_takes(kinds):
    assert {_kind(k) for k in kinds} == set(CALIBRATION_KINDS)
    for name, value in kinds.items():
        assert calibration_kind(value) == _kind(name)
    assert ACCEPTS == {"quantize": CALIBRATION_KINDS, "search": ("calls", "sampler"),
                       "backend": ("statistics", "path")}
    for bad, match in ((3, "got int"), (b"calib.safetensors", "got bytes")):
        with pytest.raises(TypeError, match=match):
            calibration_kind(bad)
    with pytest.raises(ValueError, match="entry must be one of"):
        resolve_calibration(None, None, entry="compile")


@pytest.mark.parametrize("kind", ["statistics", "path", "pathlike", "calls", "generator", "sampler"])
def test_quantize_takes_every_kind(mlp_block, kinds, kind):
    m, args = mlp_block
    qm = vq.quantize(m, args, recipe="w4a8", calibration=kinds[kind])
    assert _balances(qm.report) == {"smooth+rotate a=0.5"}  # smoothing needs the statistics


@pytest.mark.parametrize("bad,error,match", [(3, TypeError, "got int"), (b"x", TypeError, "got bytes"),
                                             ([], vq.CalibrationError, "no forward calls"),
                                             ([1], vq.CalibrationError, r"item 0 must be an \(args, kwargs\)")])
def test_quantize_refuses_what_is_no_kind(mlp_block, bad, error, match):
    m, args = mlp_block
    with pytest.raises(error, match=match):
        vq.quantize(m, args, recipe="w4a8", calibration=bad)


@pytest.mark.parametrize("kind", ["calls", "generator", "sampler"])
def test_search_takes_calls_and_a_sampler(mlp_block, kinds, kind):
    m, _ = mlp_block
    plan = vq.search(m, kinds[kind], vq.Budget(weight_bits=6), progress=False)
    assert plan.search["achieved"]["weight_bits"] <= 6
    assert plan.calibration.num_model_calls == 3


@pytest.mark.parametrize("kind", ["statistics", "path", "pathlike"])
def test_search_refuses_statistics_saying_it_replays_calls(mlp_block, kinds, kind):
    m, _ = mlp_block
    with pytest.raises(TypeError, match="needs the calls themselves"):
        vq.search(m, kinds[kind], vq.Budget(weight_bits=6))
    with pytest.raises(vq.CalibrationError, match="holds no calls"):
        vq.search(m, [], vq.Budget(weight_bits=6))


@pytest.mark.parametrize("kind", ["statistics", "path", "pathlike"])
def test_the_backend_takes_statistics_and_a_saved_file(mlp_block, kinds, kind):
    m, args = mlp_block
    _, _, stats, _ = backend._parse_options({"options": {"recipe": "w4a8", "calibration": kinds[kind]}})
    assert stats.layers == kinds["statistics"].layers
    if kind == "path":  # and compiles with them
        with torch.no_grad():
            torch.compile(m, backend="viditq", options={"recipe": "w4a8", "calibration": kinds[kind]})(*args)
        assert _balances(last_report()) == {"smooth+rotate a=0.5"}


@pytest.mark.parametrize("kind", ["calls", "generator", "sampler"])
def test_the_backend_refuses_calls_and_samplers_saying_what_to_do(kinds, kind):
    with pytest.raises(TypeError, match=r"option 'calibration' must be CalibrationStats or the path of saved "
                                        r"statistics: the backend cannot run the model.*"
                                        r"viditq_compile\.calibrate\(model, calls\) first"):
        backend._parse_options({"options": {"recipe": "w4a8", "calibration": kinds[kind]}})
    with pytest.raises(TypeError, match="option 'calibration' must be CalibrationStats.*got int"):
        backend._parse_options({"options": {"calibration": 3}})
