"""The demo's entry points (``demo/pyproject.toml``): the names the ``viditq`` CLI looks up."""

from importlib.metadata import entry_points

import torch

from viditq_compile.cli import COMMANDS_GROUP, DEMO_MODELS, MODELS_GROUP, ModelSpec, entry_point, load_model
from viditq_demo import cli_models, quality


def test_the_demo_declares_every_model_and_the_quality_command():
    models = {ep.name: ep.value for ep in entry_points(group=MODELS_GROUP)}
    assert {name: models.get(name) for name in DEMO_MODELS} == {
        name: f"viditq_demo.cli_models:{name}" for name in DEMO_MODELS}
    assert entry_point(MODELS_GROUP, "tiny") is cli_models.tiny
    assert entry_point(COMMANDS_GROUP, "quality") is quality
    assert quality.DEFAULT_RECIPES[0] == "fp" and callable(quality.run_quality)


def test_tiny_through_the_cli_is_the_seeded_demo_dit():
    spec = load_model("tiny", seed=3)
    assert isinstance(spec, ModelSpec) and spec.name == "tiny" and spec.calibration_calls is None
    again = cli_models.tiny(3)
    for (k, a), b in zip(spec.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), k
    inputs = spec.make_inputs(2, 0)
    assert inputs["hidden_states"].shape[0] == 2


def test_digits_inputs_are_the_samplers_keywords():
    from viditq_demo import digits

    kw = cli_models.digits_inputs(3, seed=0)
    assert set(kw) == {"hidden_states", "timestep", "class_labels", "return_dict"}
    assert kw["hidden_states"].shape == (3, 1, digits.DEFAULT_SIZE, digits.DEFAULT_SIZE)
    assert int(kw["class_labels"].max()) <= digits.NULL_CLASS
    assert torch.equal(kw["timestep"], cli_models.digits_inputs(3, seed=0)["timestep"])
