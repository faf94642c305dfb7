"""The family registry: lookups, and that what the rest of the code reads from it (keep-FP regex,
timestep / latent names, role name rules) decides exactly what the scattered definitions it
replaced decided, on every model of the zoo."""

import ast
import json
import pathlib
import re

import pytest
import torch

import viditq_compile
from tests import zoo
from viditq_compile.calibration import observe
from viditq_compile.config import recipe
from viditq_compile.families import registry
from viditq_compile.families.base import Family, keep_fp_regex
from viditq_compile.graph import roles

dz = pytest.importorskip("tests.diffusers_zoo")

# the definitions before families/ existed, verbatim
OLD_KEEP_FP_REGEX = "|".join([
    r"(^|\.)(adaln_single|time_text_embed|time_embedding|timestep_embedder|t_embedder|t_block"
    r"|y_embedder|class_embedder|emb)(\.|$)",
    r"(^|\.)(caption_projection|context_embedder|text_embedder)(\.|$)",
    r"(^|\.)(pos_embed|patch_embed|x_embedder)(\.|$)",
    r"(^|\.)(norm\w*|adaLN_modulation)(\.|$)",
    r"^(proj_out\w*|final_layer)(\.|$)",
])
OLD_TIMESTEP_NAMES = ("timestep", "timesteps", "t")
OLD_LATENT_NAMES = ("hidden_states", "x", "sample", "latent", "latents")
OLD_NAME_RULES = (
    (re.compile(r"(?<![a-z])(attn2|cross)"), "cross_attn"),
    (re.compile(r"(?<![a-z])(attn|attention|qkv|to_[qkv]|to_out|[qkv]_proj|[qkv]_linear)"), "self_attn"),
    (re.compile(r"(?<![a-z])(ff|ffn|mlp|feed_forward|fc\d)(?![a-z])"), "mlp"),
)
OLD_TEMPORAL_NAME = re.compile(r"(?<![a-z])temp(oral)?(?![a-z])")

# names the families added on purpose (embedders of models not in the zoo), and what they keep FP
ADDED_KEEP_FP = ["ofs_embedding.linear_1", "fps_embedder.mlp.0"]

ZOO_MODELS = [*zoo.ALL_BUILDERS, "cogvideox"]


def _build(name):
    return zoo.build_cogvideox() if name == "cogvideox" else zoo.ALL_BUILDERS[name]()


@pytest.fixture(scope="module")
def module_names():
    """name -> (linear module paths, every module path) of each zoo model."""
    out = {}
    for name in ZOO_MODELS:
        model, _ = _build(name)
        out[name] = ([n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)],
                     [n for n, _ in model.named_modules() if n])
    return out


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_keep_fp_regex_keeps_what_the_old_one_kept(module_names, name):
    linears, _ = module_names[name]
    old = {n for n in linears if re.search(OLD_KEEP_FP_REGEX, n)}
    new = {n for n in linears if re.search(registry.KEEP_FP_REGEX, n)}
    assert new == old
    if name in zoo.KEEP_FP:
        assert new == set(zoo.KEEP_FP[name])
    r = recipe.Recipe.preset("w8a8")
    assert {n for n in linears if r.keeps_fp(n)} == old


def test_the_recipe_default_is_the_registry_union():
    assert recipe.DIT_KEEP_FP_REGEX == registry.KEEP_FP_REGEX
    assert recipe.Recipe.preset("w4a8").remain_fp_regex == registry.KEEP_FP_REGEX
    for added in ADDED_KEEP_FP:
        assert re.search(registry.KEEP_FP_REGEX, added) and not re.search(OLD_KEEP_FP_REGEX, added)


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_role_name_rules_decide_as_the_old_ones(module_names, name):
    _, paths = module_names[name]
    for path in paths:
        old = next((role for p, role in OLD_NAME_RULES if p.search(path)), None)
        new = next((role for p, role in roles._NAME_RULES if p.search(path)), None)
        assert new == old, path
        assert bool(roles._TEMPORAL_NAME.search(path)) == bool(OLD_TEMPORAL_NAME.search(path)), path
        assert roles._by_name(path, "why") == _old_by_name(path, "why"), path


def _old_by_name(name, why):
    for pattern, role in OLD_NAME_RULES:
        m = pattern.search(name)
        if m is None:
            continue
        if role == "self_attn" and OLD_TEMPORAL_NAME.search(name):
            return roles.RoleDecision("temporal_attn", "name", f"{why}; name has {m.group(0)!r} and 'temp'")
        return roles.RoleDecision(role, "name", f"{why}; name has {m.group(0)!r}")
    return roles.RoleDecision("other", "name", f"{why}; no known name part")


def test_timestep_and_latent_names_are_the_old_ones_in_order():
    assert registry.TIMESTEP_NAMES == observe.TIMESTEP_NAMES == OLD_TIMESTEP_NAMES
    assert registry.LATENT_NAMES == roles.LATENT_NAMES == OLD_LATENT_NAMES


def test_families_of_the_zoo_are_found_by_name_alias_class_and_config():
    assert sorted(registry.FAMILIES) == sorted(["cogvideox", "dit", "flux", "generic", "latte", "opensora", "pixart",
                                                *DIFFUSERS_FAMILIES])
    assert registry.get("PixArt-Sigma") is registry.get("pixart") is registry.FAMILIES["pixart"]
    assert registry.get("stdit3").name == "opensora"
    assert registry.get("SkyReels-V2") is registry.get("wan") and registry.get("HunyuanVideo").name == "hunyuan_video"
    with pytest.raises(KeyError, match="unknown model family 'sdxl'.*pixart"):
        registry.get("sdxl")
    for name in ("pixart", "dit", "latte", "flux", "cogvideox"):
        model, _ = _build(name)
        fam = registry.for_model(model)
        assert fam is registry.get(name)
        assert registry.for_config(json.loads(model.to_json_string())) is fam  # config.json
        assert registry.for_class_name(type(model).__name__) is fam
    assert registry.for_config({"architectures": ["STDiT3"], "model_type": "STDiT3"}).name == "opensora"
    assert registry.for_config({"_class_name": "AutoencoderKL"}) is None
    assert registry.for_model(torch.nn.Linear(2, 2)) is None
    assert set(registry.with_example_inputs()) == {
        "PixArtTransformer2DModel", "DiTTransformer2DModel", "LatteTransformer3DModel",
        "FluxTransformer2DModel", "CogVideoXTransformer3DModel", *dz.CLASS_NAMES.values()}


@pytest.mark.parametrize("name", ["pixart", "dit", "latte", "flux", "stdit3"])
def test_each_family_keeps_its_zoo_model_fp_on_its_own(module_names, name):
    """A family's own keep-FP regex (``Family.keep_fp_regex``) keeps what the zoo lists for it."""
    linears, _ = module_names[name]
    own = registry.get(name).keep_fp_regex
    assert {n for n in linears if re.search(own, n)} == set(zoo.KEEP_FP[name])


def test_family_definitions_are_checked():
    with pytest.raises(ValueError, match="unknown role"):
        Family(name="x", title="x", role_names={"decoder": ("dec",)})
    with pytest.raises(ValueError, match="within one path component"):
        Family(name="x", title="x", keep_fp=(r"a\.b",))
    assert keep_fp_regex(("a",), ()) == r"(^|\.)(a)(\.|$)"
    assert keep_fp_regex((), ("b",)) == r"^(b)(\.|$)"


def test_families_import_no_pass_search_cli_or_api():
    root = pathlib.Path(viditq_compile.__file__).parent
    banned = ("viditq_compile.passes", "viditq_compile.mixed_precision", "viditq_compile.cli",
              "viditq_compile.api", "viditq_compile.config", "viditq_compile.calibration")
    for path in (root / "families").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for m in mods:
                assert not m.startswith(banned), f"{path.name} imports {m}"


# -- the families of the diffusers zoo's 21 classes ------------------------------------------------
DIFFUSERS_FAMILIES = {
    "sd3": ["sd3"], "auraflow": ["auraflow"], "sana": ["sana"], "hunyuan_dit": ["hunyuandit"],
    "lumina": ["lumina_next", "lumina2"], "hidream": ["hidream"], "qwenimage": ["qwenimage"], "chroma": ["chroma"],
    "z_image": ["zimage"], "cogview": ["cogview3plus", "cogview4"], "omnigen": ["omnigen"], "mochi": ["mochi"],
    "hunyuan_video": ["hunyuanvideo"], "ltx_video": ["ltxvideo"], "wan": ["wan", "skyreels_v2"],
    "allegro": ["allegro"], "cosmos": ["cosmos"], "easyanimate": ["easyanimate"],
}
"""Family -> the diffusers zoo classes (short names) it covers."""

UNION_KEEPS_COMPUTE = {f"context_embedder.token_refiner.refiner_blocks.0.{n}"
                       for n in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.0.proj", "ff.net.2")}
"""HunyuanVideo's token-refiner blocks compute, but live under ``context_embedder``, which Flux,
SD3 and Chroma name as their (single-linear) text projection: the union of names keeps them FP.
Only the names decide this, where the graph cannot place a layer; on the export route the graph
quantizes them (tests/families/test_diffusers_families.py)."""


@pytest.mark.parametrize("short", sorted(dz.CLASS_NAMES))
def test_for_class_name_finds_each_diffusers_zoo_class(short):
    cls = dz.CLASS_NAMES[short]
    family = registry.for_class_name(cls)
    assert family is not None and short in DIFFUSERS_FAMILIES[family.name]
    assert registry.for_config({"_class_name": cls}) is family
    assert family.example_inputs is not None and registry.with_example_inputs()[cls] is family
    assert family.title and family.example_inputs.__doc__


def test_the_diffusers_families_cover_the_zoo_exactly():
    covered = [s for shorts in DIFFUSERS_FAMILIES.values() for s in shorts]
    assert sorted(covered) == sorted(dz.CLASS_NAMES)
    for name, shorts in DIFFUSERS_FAMILIES.items():
        assert set(registry.FAMILIES[name].class_names) == {dz.CLASS_NAMES[s] for s in shorts}


def test_family_names_and_aliases_are_unique_and_lower_case():
    keys = [k for f in registry.FAMILIES.values() for k in (f.name, *f.aliases)]
    assert len(keys) == len(set(keys)) and all(k == k.lower() for k in keys)
    classes = [c for f in registry.FAMILIES.values() for c in f.class_names]
    assert len(classes) == len(set(classes))


@pytest.mark.parametrize("short", sorted(dz.CLASS_NAMES))
def test_a_familys_keep_fp_names_keep_its_conditioning_layers_and_no_compute(short):
    """On their own (names decide only where the graph cannot), each family's names keep exactly the
    zoo's KEEP_FP list of its classes and match no QUANTIZE name."""
    own = registry.for_class_name(dz.CLASS_NAMES[short]).keep_fp_regex
    assert [n for n in dz.QUANTIZE[short] if re.search(own, n)] == []
    assert [n for n in dz.KEEP_FP[short] if not re.search(own, n)] == []


@pytest.mark.parametrize("short", sorted(dz.CLASS_NAMES))
def test_the_union_keeps_every_conditioning_layer_and_no_compute_but_one_known_clash(short):
    union = registry.KEEP_FP_REGEX
    assert [n for n in dz.KEEP_FP[short] if not re.search(union, n)] == []
    clash = {n for n in dz.QUANTIZE[short] if re.search(union, n)}
    assert clash == (UNION_KEEPS_COMPUTE if short == "hunyuanvideo" else set())
    assert not any(re.search(registry.get(name).keep_fp_regex, n)
                   for name in DIFFUSERS_FAMILIES for n in dz.QUANTIZE[short] if n not in UNION_KEEPS_COMPUTE)


def test_the_default_keep_fp_regex_passes_the_user_regex_guard():
    """The families' union is the default remain_fp_regex, which goes through the same guard as a
    user's: a family whose names push it past the limit would break every default recipe."""
    from viditq_compile.config.recipe import Recipe
    from viditq_compile.io.user_regex import MAX_PATTERN_CHARS

    assert len(registry.KEEP_FP_REGEX) <= MAX_PATTERN_CHARS
    assert Recipe.preset("w8a8").keeps_fp("adaln_single.linear")  # compiles through the guard and matches
    assert not Recipe.preset("w8a8").keeps_fp("transformer_blocks.0.attn1.to_q")
