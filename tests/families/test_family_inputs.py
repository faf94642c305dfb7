"""Each family's example inputs, built from a model's config alone: the model runs on them, as
its pipeline would call it; seeded; batch as asked; a config missing what they need is refused
naming the key."""

import pytest
import torch

from tests import zoo
from viditq_compile.families import registry
from viditq_compile.families.base import FamilyConfigError

BUILDERS = {"pixart": zoo.build_pixart, "dit": zoo.build_dit, "latte": zoo.build_latte,
            "flux": zoo.build_flux, "cogvideox": zoo.build_cogvideox}


def _out(y):
    return y[0] if isinstance(y, (tuple, list)) else y


def _tensors(kwargs):
    flat = []
    for v in kwargs.values():
        if isinstance(v, torch.Tensor):
            flat.append(v)
        elif isinstance(v, (tuple, list, dict)):
            flat.extend(x for x in (v.values() if isinstance(v, dict) else v) if isinstance(x, torch.Tensor))
    return flat


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def built(request):
    model, kwargs = BUILDERS[request.param]()
    return request.param, model, kwargs


def test_the_model_runs_on_its_familys_example_inputs(built):
    name, model, zoo_kwargs = built
    family = registry.for_model(model)
    assert family is registry.get(name)
    kwargs = family.example_inputs(model.config, 3, 0)
    with torch.no_grad():
        out, ref = _out(model(**kwargs)), _out(model(**zoo_kwargs))
    assert out.shape[0] == 3 and torch.isfinite(out).all()
    assert out.dim() == ref.dim()
    assert out.shape[1:] == ref.shape[1:] or name == "flux"  # flux: 8x8 latent tokens, the zoo 4x4
    assert set(zoo_kwargs) - set(kwargs) <= {"encoder_attention_mask", "added_cond_kwargs"}, name
    latent = next(n for n in registry.LATENT_NAMES if n in kwargs)
    assert latent in family.latent_names and next(n for n in registry.TIMESTEP_NAMES if n in kwargs) \
        in family.timestep_names


def test_example_inputs_are_seeded(built):
    _, model, _ = built
    build = registry.for_model(model).example_inputs
    a, b, c = build(model.config, 2, 0), build(model.config, 2, 0), build(model.config, 2, 1)
    assert all(torch.equal(x, y) for x, y in zip(_tensors(a), _tensors(b)))
    assert not torch.equal(a["hidden_states"], c["hidden_states"])


def test_the_frame_axis_of_video_families_is_the_outputs(built):
    name, model, kwargs = built
    axis = registry.get(name).output_frame_axis
    if axis is None:
        return
    with torch.no_grad():
        out = _out(model(**kwargs))
    frames = kwargs["hidden_states"].shape[1 if name == "cogvideox" else 2]
    assert out.shape[axis] == frames > 1


@pytest.mark.parametrize("name,key", [("pixart", "sample_size"), ("dit", "num_embeds_ada_norm"),
                                      ("latte", "video_length"), ("flux", "joint_attention_dim"),
                                      ("cogvideox", "text_embed_dim")])
def test_a_config_missing_a_key_the_inputs_need_is_refused_naming_it(name, key):
    model, _ = BUILDERS[name]()
    config = {**model.config, key: None, "_class_name": type(model).__name__}
    with pytest.raises(FamilyConfigError, match=f"{type(model).__name__} config has no '{key}'"):
        registry.get(name).example_inputs(config, 2, 0)


def test_pixart_alpha_1024_gets_its_size_conditions():
    config = {"sample_size": 128, "in_channels": 4, "caption_channels": 64}
    kwargs = registry.get("pixart").example_inputs(config, 2, 0)
    assert kwargs["added_cond_kwargs"]["resolution"].tolist() == [[1024.0, 1024.0]] * 2
    assert "added_cond_kwargs" not in registry.get("pixart").example_inputs({**config, "sample_size": 64}, 2, 0)


def test_flux_without_guidance_embedding_gets_no_guidance():
    model, _ = zoo.build_flux()
    kwargs = registry.get("flux").example_inputs({**model.config, "guidance_embeds": False}, 2, 0)
    assert "guidance" not in kwargs and kwargs["timestep"].max() < 1


def test_cogvideox_latent_frames_and_rotary_tables_follow_the_config():
    from viditq_compile.families import cogvideox

    model, zoo_kwargs = zoo.build_cogvideox()
    kwargs = cogvideox.example_inputs(model.config, 2, 0)
    assert kwargs["hidden_states"].shape == zoo_kwargs["hidden_states"].shape
    for a, b in zip(kwargs["image_rotary_emb"], zoo_kwargs["image_rotary_emb"]):
        assert torch.equal(a, b)  # the tables the zoo builds as the pipeline does
    assert cogvideox.latent_frames({"sample_frames": 81, "temporal_compression_ratio": 4, "patch_size_t": 2}) == 22
    assert "image_rotary_emb" not in cogvideox.example_inputs(
        {**model.config, "use_rotary_positional_embeddings": False}, 2, 0)


def test_opensora_has_no_builder_and_says_why():
    family = registry.get("opensora")
    assert family.example_inputs is None and "Python API" in family.inputs_note


# -- the diffusers DiT classes of tests/diffusers_zoo.py -------------------------------------------
dz = pytest.importorskip("tests.diffusers_zoo")

MISSING_KEYS = {"sd3": "pooled_projection_dim", "auraflow": "joint_attention_dim", "sana": "caption_channels",
                "hunyuandit": "text_len_t5", "lumina_next": "cross_attention_dim", "lumina2": "cap_feat_dim",
                "hidream": "llama_layers", "qwenimage": "joint_attention_dim", "chroma": "in_channels",
                "zimage": "all_patch_size", "cogview3plus": "text_embed_dim", "cogview4": "sample_size",
                "omnigen": "vocab_size", "mochi": "max_sequence_length", "hunyuanvideo": "pooled_projection_dim",
                "ltxvideo": "caption_channels", "wan": "text_dim", "allegro": "sample_frames",
                "cosmos": "patch_size", "easyanimate": "sample_height", "skyreels_v2": "patch_size"}
"""One key each family's builder reads from the config, per diffusers zoo class."""


def _shapes(x):
    return [tuple(t.shape) for t in x] if isinstance(x, list) else [tuple(x.shape)]


@pytest.fixture(scope="module", params=sorted(dz.ZOO))
def diffusers_built(request):
    model, kwargs = dz.ZOO[request.param]()
    return request.param, model, kwargs


def test_each_diffusers_class_runs_on_its_familys_example_inputs(diffusers_built):
    """Batch 3 from the config alone; the output follows the latent where the family's sizes differ
    from the zoo's, and is the zoo model's output shape elsewhere (channels, learned sigma)."""
    short, model, zoo_kwargs = diffusers_built
    family = registry.for_model(model)
    assert family is not None and type(model).__name__ in family.class_names
    kwargs = family.example_inputs(model.config, 3, 0)
    assert kwargs["return_dict"] is False
    with torch.no_grad():
        out, ref = _out(model(**kwargs)), _out(model(**zoo_kwargs))
    outs, refs = (out, ref) if isinstance(out, list) else ([out], [ref])
    assert len(outs) == (3 if isinstance(out, list) else 1) and all(torch.isfinite(o).all() for o in outs)
    latent = next(n for n in registry.LATENT_NAMES if n in kwargs)
    assert latent in family.latent_names and latent in zoo_kwargs
    assert next(n for n in registry.TIMESTEP_NAMES if n in kwargs) in family.timestep_names
    lat, zlat = _shapes(kwargs[latent]), _shapes(zoo_kwargs[latent])
    if not isinstance(out, list):
        assert out.shape[0] == 3 == lat[0][0]
    for o, r, x, z in zip(_shapes(out), _shapes(ref), lat, zlat):
        assert len(o) == len(r) == len(x), short
        for axis in range(0 if isinstance(out, list) else 1, len(o)):
            assert o[axis] == (r[axis] if x[axis] == z[axis] else x[axis]), (short, o, r, x, z)
    assert set(zoo_kwargs) - set(kwargs) == set(), short  # every input the pipeline passes


def test_diffusers_example_inputs_are_seeded(diffusers_built):
    _, model, _ = diffusers_built
    build = registry.for_model(model).example_inputs
    a, b, c = build(model.config, 2, 0), build(model.config, 2, 0), build(model.config, 2, 1)
    ta, tb, tc = _tensors(a), _tensors(b), _tensors(c)
    assert len(ta) == len(tb) and all(torch.equal(x, y) for x, y in zip(ta, tb))
    assert not all(torch.equal(x, y) for x, y in zip(ta, tc))


def test_the_frame_axis_of_diffusers_video_families_is_the_outputs(diffusers_built):
    short, model, kwargs = diffusers_built
    axis = registry.for_model(model).output_frame_axis
    assert (axis is not None) == (short in dz.VIDEO - {"ltxvideo"})  # LTX: packed tokens
    if axis is None:
        return
    with torch.no_grad():
        out = _out(model(**kwargs))
    assert out.shape[axis] == kwargs["hidden_states"].shape[2] > 1


@pytest.mark.parametrize("short", sorted(MISSING_KEYS))
def test_a_diffusers_config_missing_a_key_is_refused_naming_it(short):
    model, _ = dz.ZOO[short]()
    cls = dz.CLASS_NAMES[short]
    config = {**model.config, MISSING_KEYS[short]: None, "_class_name": cls}
    with pytest.raises(FamilyConfigError, match=f"{cls} config has no '{MISSING_KEYS[short]}'"):
        registry.for_class_name(cls).example_inputs(config, 2, 0)


def test_diffusers_builders_read_optional_config_keys():
    from viditq_compile.families import cogview, cosmos, hidream, omnigen, qwenimage, wan

    model, _ = dz.ZOO["qwenimage"]()
    assert "guidance" not in qwenimage.example_inputs(model.config, 2, 0)
    assert qwenimage.example_inputs({**model.config, "guidance_embeds": True}, 2, 0)["guidance"].shape == (2,)
    model, _ = dz.ZOO["wan"]()
    i2v = wan.example_inputs({**model.config, "image_dim": 24}, 2, 0)
    assert i2v["encoder_hidden_states_image"].shape == (2, wan.IMAGE_TOKENS, 24)
    assert wan.example_inputs({**model.config, "inject_sample_info": True}, 2, 0)["fps"].shape == (2,)
    model, _ = dz.ZOO["cosmos"]()
    assert "padding_mask" not in cosmos.example_inputs(model.config, 2, 0)
    padded = cosmos.example_inputs({**model.config, "concat_padding_mask": True}, 2, 0)
    assert padded["padding_mask"].shape[:2] == (1, 1)
    model, _ = dz.ZOO["cogview3plus"]()
    assert cogview.example_inputs(model.config, 2, 0)["timestep"].dtype == torch.int64
    model, _ = dz.ZOO["cogview4"]()
    assert cogview.example_inputs(model.config, 2, 0)["timestep"].dtype == torch.float32
    assert hidream.latent_side({"max_resolution": (128, 128), "patch_size": 2}) == 64
    assert omnigen.latent_side({"sample_size": 128, "pos_embed_max_size": 192, "patch_size": 2}) == 128
    assert omnigen.latent_side({"pos_embed_max_size": 16, "patch_size": 2}) == 32
