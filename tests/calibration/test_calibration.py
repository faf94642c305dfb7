"""Calibration observers: per-call input absmax of every nn.Linear, timesteps, the saved file."""

import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from tests.zoo import build_pixart
from viditq_compile.calibration.observe import calibrate, resolve_calibration
from viditq_compile.calibration.stats import CalibrationError, CalibrationStats


class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x, t=None):
        return self.fc2(torch.relu(self.fc1(x)))


def _toy_calls():
    g = torch.Generator().manual_seed(0)
    return [((torch.randn(2, 5, 3, generator=g),), {"t": float(t)}) for t in (900, 500, 100)]


def _linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _assert_no_hooks(model):
    assert not model._forward_pre_hooks and not model._forward_hooks
    for m in model.modules():
        if isinstance(m, nn.Linear):
            assert not m._forward_pre_hooks and not m._forward_hooks


def _pixart_sampler(kw, steps=(900, 500, 100)):
    """A 3-step sampler with classifier-free guidance: cond + uncond branches as one batch of 2."""

    def sample(model):
        x = kw["hidden_states"][:1]
        cond, uncond = kw["encoder_hidden_states"][:1], torch.zeros_like(kw["encoder_hidden_states"][:1])
        for t in steps:
            out = model(torch.cat([x, x]), encoder_hidden_states=torch.cat([cond, uncond]),
                        timestep=torch.tensor([t, t]), added_cond_kwargs=kw["added_cond_kwargs"],
                        return_dict=False)[0]
            eps_c, eps_u = out[:, :4].chunk(2)
            x = x - 0.1 * (eps_u + 3.0 * (eps_c - eps_u))

    return sample


def _stats():
    return CalibrationStats(
        absmax_per_call={"a.fc": torch.tensor([[1.0, 2.0], [3.0, 0.5], [0.0, 4.0]]),
                         "b": torch.tensor([[7.0, 8.0, 9.0]])},
        timesteps={"a.fc": torch.tensor([900.0, 500.0, 100.0]), "b": torch.tensor([math.nan])},
        num_model_calls=3,
    )


# ---------------------------------------------------------------------------------------------
# what is observed
# ---------------------------------------------------------------------------------------------
def test_absmax_is_per_channel_max_over_tokens_per_call_and_over_calls():
    model = TwoLinear().eval()
    calls = _toy_calls()
    stats = calibrate(model, calls, progress=False)

    assert stats.layers == ["fc1", "fc2"]
    assert stats.num_model_calls == 3
    with torch.no_grad():
        x1 = [args[0] for args, _ in calls]
        x2 = [torch.relu(model.fc1(x)) for x in x1]
    for name, xs in (("fc1", x1), ("fc2", x2)):
        per_call = torch.stack([x.abs().reshape(-1, x.shape[-1]).max(dim=0).values for x in xs])
        assert stats.absmax_per_call[name].dtype == torch.float32
        torch.testing.assert_close(stats.absmax_per_call[name], per_call, rtol=0, atol=0)
        torch.testing.assert_close(stats.absmax(name), per_call.max(dim=0).values, rtol=0, atol=0)
        assert stats.in_features(name) == xs[0].shape[-1]
    torch.testing.assert_close(stats.timesteps["fc1"], torch.tensor([900.0, 500.0, 100.0]))
    stats.validate()


def test_layers_filter_selects_the_observed_linears():
    stats = calibrate(TwoLinear(), _toy_calls(), layers=lambda n: n == "fc2", progress=False)
    assert stats.layers == ["fc2"] and "fc1" not in stats and "fc2" in stats


def test_pixart_sampler_with_cfg_records_one_row_and_timestep_per_model_call():
    model, kw = build_pixart()
    stats = calibrate(model, _pixart_sampler(kw), progress=False)

    assert stats.num_model_calls == 3
    assert stats.layers == sorted(_linear_names(model))
    for name in stats.layers:
        assert stats.absmax_per_call[name].shape[0] == 3
        torch.testing.assert_close(stats.timesteps[name], torch.tensor([900.0, 500.0, 100.0]))
    assert stats.in_features("transformer_blocks.0.ff.net.2") == model.transformer_blocks[0].ff.net[2].in_features


def test_pixart_iterable_of_calls_records_timesteps_and_takes_none_as_nan():
    model, kw = build_pixart()
    calls = [((), {**kw, "timestep": torch.tensor([t, t])}) for t in (999, 10)]
    stats = calibrate(model, calls, progress=False)
    torch.testing.assert_close(stats.timesteps["transformer_blocks.1.attn1.to_q"], torch.tensor([999.0, 10.0]))

    toy = calibrate(TwoLinear(), [((torch.randn(2, 3),), {})], progress=False)  # no timestep given
    assert torch.isnan(toy.timesteps["fc1"]).all()


def test_absmax_at_selects_calls_by_timestep_range():
    stats = _stats()
    torch.testing.assert_close(stats.absmax_at("a.fc", 400, 1000), torch.tensor([3.0, 2.0]))
    torch.testing.assert_close(stats.absmax_at("a.fc", 100, 100), torch.tensor([0.0, 4.0]))
    torch.testing.assert_close(stats.absmax_at("a.fc", 0, 1000), stats.absmax("a.fc"))
    with pytest.raises(CalibrationError, match=r"'a.fc'.*no calibration call has a timestep in \[200, 300\]"):
        stats.absmax_at("a.fc", 200, 300)
    with pytest.raises(CalibrationError, match="'b'"):
        stats.absmax_at("b", 0, 1000)  # its only call has no timestep
    with pytest.raises(CalibrationError, match="'nope'"):
        stats.absmax("nope")


# ---------------------------------------------------------------------------------------------
# the file
# ---------------------------------------------------------------------------------------------
def test_save_load_round_trip_is_exact(tmp_path):
    stats = _stats()
    path = tmp_path / "calib.safetensors"
    stats.save(path)
    back = CalibrationStats.load(path)
    assert back.layers == stats.layers and back.num_model_calls == 3
    for name in stats.layers:
        assert torch.equal(back.absmax_per_call[name], stats.absmax_per_call[name])
        torch.testing.assert_close(back.timesteps[name], stats.timesteps[name], equal_nan=True, rtol=0, atol=0)


def test_load_refuses_missing_truncated_foreign_and_corrupt_files(tmp_path):
    good = tmp_path / "good.safetensors"
    _stats().save(good)
    data = good.read_bytes()

    with pytest.raises(CalibrationError, match="does not exist"):
        CalibrationStats.load(tmp_path / "absent.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 7])
    with pytest.raises(CalibrationError, match="not a readable safetensors file"):
        CalibrationStats.load(truncated)
    pickled = tmp_path / "stats.pt"
    torch.save({"fc": torch.ones(2)}, pickled)
    with pytest.raises(CalibrationError, match="not a readable safetensors file"):
        CalibrationStats.load(pickled)

    tensors = {"absmax/fc": torch.ones(1, 2), "timesteps/fc": torch.zeros(1)}
    meta = {"format": "viditq-calibration", "version": "1", "num_model_calls": "1"}
    wrong_version = tmp_path / "v2.safetensors"
    save_file(tensors, str(wrong_version), metadata={**meta, "version": "2"})
    with pytest.raises(CalibrationError, match="version '2' is not supported"):
        CalibrationStats.load(wrong_version)
    foreign = tmp_path / "model.safetensors"
    save_file(tensors, str(foreign))
    with pytest.raises(CalibrationError, match="not a viditq calibration file"):
        CalibrationStats.load(foreign)
    nan = tmp_path / "nan.safetensors"
    save_file({**tensors, "absmax/fc": torch.tensor([[1.0, math.nan]])}, str(nan), metadata=meta)
    with pytest.raises(CalibrationError, match="'fc'.*NaN or Inf"):
        CalibrationStats.load(nan)
    shapes = tmp_path / "shapes.safetensors"
    save_file({**tensors, "timesteps/fc": torch.zeros(3)}, str(shapes), metadata=meta)
    with pytest.raises(CalibrationError, match="'fc'.*1 absmax rows"):
        CalibrationStats.load(shapes)


def test_resolve_calibration_takes_stats_paths_and_calls(tmp_path):
    model = TwoLinear()
    stats = calibrate(model, _toy_calls(), progress=False)
    path = tmp_path / "calib.safetensors"
    stats.save(path)
    assert resolve_calibration(model, stats) is stats
    assert torch.equal(resolve_calibration(model, path).absmax("fc1"), stats.absmax("fc1"))
    assert torch.equal(resolve_calibration(model, str(path)).absmax("fc2"), stats.absmax("fc2"))
    assert torch.equal(resolve_calibration(model, _toy_calls()).absmax("fc2"), stats.absmax("fc2"))
    with pytest.raises(CalibrationError, match=r"fc1 \(model K=5, statistics K=3\)"):
        resolve_calibration(nn.ModuleDict({"fc1": nn.Linear(5, 3)}), path)  # saved for another model


def test_check_model_reports_every_mismatched_width_and_returns_missing_layers():
    stats = _stats()
    assert stats.check_model({"a.fc": 2, "b": 3}) == []
    assert stats.check_model({"a.fc": 2, "c": 8, "d": 1}) == ["c", "d"]
    with pytest.raises(CalibrationError) as e:
        stats.check_model({"a.fc": 5, "b": 4, "c": 8})
    assert "a.fc (model K=5, statistics K=2)" in str(e.value) and "b (model K=4, statistics K=3)" in str(e.value)


# ---------------------------------------------------------------------------------------------
# hooks, modes, refusals
# ---------------------------------------------------------------------------------------------
def test_hooks_are_removed_after_success_and_after_the_sampler_raises():
    model, kw = build_pixart()
    calibrate(model, _pixart_sampler(kw, steps=(500,)), progress=False)
    _assert_no_hooks(model)

    def failing(m):
        _pixart_sampler(kw, steps=(500,))(m)
        raise RuntimeError("sampler broke")

    with pytest.raises(RuntimeError, match="sampler broke"):
        calibrate(model, failing, progress=False)
    _assert_no_hooks(model)


def test_training_flags_are_restored_and_the_run_has_no_grad():
    model = TwoLinear().train()
    model.fc2.eval()
    seen = []

    def sampler(m):
        seen.append((m.training, m.fc1.training, torch.is_grad_enabled()))
        m(torch.randn(1, 3))

    calibrate(model, sampler, progress=False)
    assert seen == [(False, False, False)]
    assert model.training and model.fc1.training and not model.fc2.training


def test_refuses_empty_calibration_malformed_items_and_wrong_types():
    model = TwoLinear()
    with pytest.raises(CalibrationError, match="calibration made no forward calls of the model"):
        calibrate(model, [], progress=False)
    with pytest.raises(CalibrationError, match="calibration made no forward calls of the model"):
        calibrate(model, lambda m: None, progress=False)
    with pytest.raises(CalibrationError, match="calibration item 1 "):
        calibrate(model, [((torch.randn(1, 3),), {}), (torch.randn(1, 3), {})], progress=False)
    with pytest.raises(TypeError, match="int"):
        calibrate(model, 42, progress=False)
    with pytest.raises(CalibrationError, match="no linear layer"):
        calibrate(nn.ReLU(), [((torch.randn(1, 3),), {})], progress=False)
    with pytest.raises(CalibrationError, match="no linear layer"):
        calibrate(model, _toy_calls(), layers=lambda n: False, progress=False)
    _assert_no_hooks(model)


def test_nan_input_is_refused_naming_the_layer_and_the_call():
    model = TwoLinear()
    calls = _toy_calls()
    bad = calls[1][0][0].clone()
    bad[0, 2, 1] = math.nan
    calls[1] = ((bad,), {})
    calls.append(((torch.randn(1, 3),), {}))
    with pytest.raises(CalibrationError, match=r"layer 'fc1'.*call 1 \(model call 1\)"):
        calibrate(model, calls, progress=False)
    _assert_no_hooks(model)


def test_progress_bar_on_stderr_only_when_asked(capsys):
    calibrate(TwoLinear(), _toy_calls(), progress=True)
    err = capsys.readouterr().err
    assert "\rcalibrating  3/3 calls" in err and "\rcalibrating  1/3 calls" in err

    calibrate(TwoLinear(), lambda m: [m(torch.randn(1, 3)) for _ in range(2)], progress=True)
    assert "\rcalibrating  2 calls" in capsys.readouterr().err

    calibrate(TwoLinear(), _toy_calls(), progress=False)
    calibrate(TwoLinear(), _toy_calls())  # None: pytest's captured stderr is not a terminal
    assert "calibrating" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# hostile files, bytes-based loading, atomic saves
def _header(obj) -> bytes:
    import json

    h = json.dumps(obj).encode()
    return len(h).to_bytes(8, "little") + h


HOSTILE = {
    "empty": (b"", "shorter than the 8-byte header length"),
    "header past the end": ((10**12).to_bytes(8, "little") + b"{}", "runs past the end"),
    "header not utf-8": (b"\x04\x00\x00\x00\x00\x00\x00\x00\xff\xfe\xfd\xfc", "header is not JSON"),
    "header deeply nested": (len(b"[" * 100_000).to_bytes(8, "little") + b"[" * 100_000, "header is not JSON"),
    "header a list": (_header([1, 2]), "not a JSON object"),
    "metadata not strings": (_header({"__metadata__": {"format": 3}}), "must map strings to strings"),
    "calls huge": (_header({"__metadata__": {"format": "viditq-calibration", "version": "1",
                                             "num_model_calls": "9" * 5000}}), "num_model_calls"),
    "calls negative": (_header({"__metadata__": {"format": "viditq-calibration", "version": "1",
                                                 "num_model_calls": "-1"}}), "num_model_calls"),
    "binary junk": (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "not a readable safetensors file"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_calibration_files_are_calibration_errors_naming_the_file(tmp_path, case):
    data, match = HOSTILE[case]
    p = tmp_path / "calib.safetensors"
    p.write_bytes(data)
    with pytest.raises(CalibrationError, match=match) as e:
        CalibrationStats.load(p)
    assert str(p) in str(e.value) and len(str(e.value)) < 500
    with pytest.raises(CalibrationError, match="art/calib.safetensors"):
        CalibrationStats.loads(data, source="art/calib.safetensors")


def test_a_directory_is_not_a_calibration_file(tmp_path):
    with pytest.raises(CalibrationError, match="is a directory"):
        CalibrationStats.load(tmp_path)
    with pytest.raises(CalibrationError, match="expected the bytes"):
        CalibrationStats.loads("not bytes", source="x")


def test_loads_from_bytes_equals_load_and_names_the_layer_on_bad_values(tmp_path):
    p = tmp_path / "c.safetensors"
    _stats().save(p)
    a, b = CalibrationStats.loads(p.read_bytes(), "c"), CalibrationStats.load(p)
    assert a.layers == b.layers and all(torch.equal(a.absmax_per_call[n], b.absmax_per_call[n]) for n in a.layers)
    from safetensors.torch import save

    meta = {"format": "viditq-calibration", "version": "1", "num_model_calls": "1"}
    bad = save({"absmax/blocks.3.fc": torch.tensor([[-1.0]]), "timesteps/blocks.3.fc": torch.zeros(1)}, metadata=meta)
    with pytest.raises(CalibrationError, match="src.safetensors: layer 'blocks.3.fc': absmax holds negative"):
        CalibrationStats.loads(bad, "src.safetensors")


def test_a_failed_save_keeps_the_previous_file_and_a_symlink_is_refused(tmp_path, monkeypatch):
    import errno

    from viditq_compile.io import atomic
    from viditq_compile.io.atomic import UnsafePathError

    p = tmp_path / "c.safetensors"
    _stats().save(p)
    before = p.read_bytes()
    changed = CalibrationStats({"a.fc": torch.ones(1, 2)}, {"a.fc": torch.zeros(1)}, 1)

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        changed.save(p)
    monkeypatch.undo()
    assert p.read_bytes() == before and CalibrationStats.load(p).num_model_calls == 3
    assert sorted(x.name for x in tmp_path.iterdir()) == ["c.safetensors"]

    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    link = tmp_path / "link.safetensors"
    link.symlink_to(victim)
    with pytest.raises(UnsafePathError, match="symlink"):
        changed.save(link)
    assert victim.read_bytes() == b"precious"
