"""Recipes: presets, the reference YAML format, and refusals that name the key."""

import glob
import os
import re

import pytest

from viditq_compile.config.recipe import DIT_KEEP_FP_REGEX, Recipe, RecipeError

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "viditq_configs")
REFERENCE = sorted(glob.glob(os.path.join(CONFIGS, "*.yaml")))
# capability each reference file needs that is not built yet (None: applies now)
NEEDS = {
    "pixart_config.yaml": None,
    "pixart_w8a8.yaml": None,
    "opensora_config_cuda_kernel.yaml": None,
    "opensora_w8a8.yaml": None,
    "opensora_w4a8_mixed_precision.yaml": None,
    "pixart_w4a8_mixed_precision.yaml": None,
}


def test_reference_configs_are_present():
    assert {os.path.basename(p) for p in REFERENCE} == set(NEEDS)


@pytest.mark.parametrize("path", REFERENCE, ids=os.path.basename)
def test_every_reference_config_parses_every_key(path):
    r = Recipe.from_yaml(path)
    need = NEEDS[os.path.basename(path)]
    if need is None:
        r.check_supported()
        assert r.weight.sym is False and r.act.sym is True
        if "mixed_precision" in path:
            assert r.mixed_precision is not None and [b.key for b in r.balance] == ["viditq"]
        else:
            assert r.weight.bits == 8 and r.act.bits == 8
            assert [b.key for b in r.balance] == (["viditq"] if "opensora_w8a8" in path else [])
    else:
        with pytest.raises(RecipeError, match=need):
            r.check_supported()


def test_mixed_precision_config_keeps_all_its_parts():
    r = Recipe.from_yaml(os.path.join(CONFIGS, "pixart_w4a8_mixed_precision.yaml"))
    assert r.weight.n_bits == (2, 4, 8) and r.weight.bits == 4 and r.act.bits == 8
    assert r.weight.group == "tensor"
    assert r.balance[0].key == "viditq" and r.balance[0].alpha == 0.99
    assert r.mixed_precision.weight[3] == r"blocks\.0|ff|blocks\.27"
    assert r.calib_save_path == "./calib_data.pth"
    assert r.unsupported() == []  # 4-bit weights, balancing and mixed precision are built


def test_reference_regexes_match_diffusers_names():
    r = Recipe.from_yaml(os.path.join(CONFIGS, "pixart_w8a8.yaml"))
    assert r.keeps_fp("transformer_blocks.3.attn2.to_k")
    assert r.keeps_fp("adaln_single.linear")
    assert not r.keeps_fp("transformer_blocks.3.attn2.to_q")
    o = Recipe.from_yaml(os.path.join(CONFIGS, "opensora_config_cuda_kernel.yaml"))
    assert o.keeps_fp("spatial_blocks.0.attn.qkv")  # \b(?!cross_)attn\b
    assert not o.keeps_fp("spatial_blocks.0.cross_attn.q_linear")
    assert o.keeps_fp("spatial_blocks.0.cross_attn.kv_linear")


@pytest.mark.parametrize("name,keep", [
    ("adaln_single.emb.timestep_embedder.linear_1", True),
    ("caption_projection.linear_2", True),
    ("proj_out", True),
    ("proj_out_2", True),
    ("transformer_blocks.0.norm1.linear", True),
    ("time_text_embed.guidance_embedder.linear_1", True),
    ("context_embedder", True),
    ("x_embedder", True),
    ("transformer_blocks.0.attn1.to_q", False),
    ("transformer_blocks.0.ff.net.2", False),
    ("single_transformer_blocks.3.proj_out", False),  # Flux: a big linear inside a block
    ("single_transformer_blocks.3.proj_mlp", False),
    ("transformer_blocks.0.ff_context.net.0.proj", False),
])
def test_dit_default_keep_fp_rules(name, keep):
    assert Recipe.preset("w8a8").keeps_fp(name) is keep
    assert Recipe.preset("w8a8").remain_fp_regex == DIT_KEEP_FP_REGEX


def test_presets_and_resolution(tmp_path):
    assert Recipe.resolve("w8a8").name == "w8a8"
    assert Recipe.resolve("fp").enabled is False
    r = Recipe.preset("w8a8")
    assert Recipe.resolve(r) is r
    p = tmp_path / "mine.yaml"
    p.write_text("weight: {n_bits: 8, sym: true}\nact: {n_bits: 8}\nremain_fp_regex: fc2\n")
    mine = Recipe.resolve(str(p))
    assert mine.name == "mine" and mine.keeps_fp("blocks.0.fc2")
    assert Recipe.resolve({"weight": {"n_bits": 8}, "act": {"n_bits": 8}}).weight.bits == 8


@pytest.mark.parametrize("text,key", [
    ("weight: {n_bits: 8}\nact: {n_bits: 8}\nwieght: {n_bits: 4}\n", "wieght"),
    ("weight: {n_bits: 8, symm: true}\nact: {n_bits: 8}\n", "weight.symm"),
    ("weight: {n_bits: eight}\nact: {n_bits: 8}\n", "weight.n_bits"),
    ("weight: {n_bits: [4, 8]}\nact: {n_bits: 8}\n", "weight.i_bitwidth"),
    ("weight: {n_bits: [4, 8], i_bitwidth: 2}\nact: {n_bits: 8}\n", "weight.i_bitwidth"),
    ("weight: {n_bits: 8, sym: maybe}\nact: {n_bits: 8}\n", "weight.sym"),
    ("act: {n_bits: 8}\n", "weight"),
    ("weight: {n_bits: 8}\nact: {n_bits: 8}\nremain_fp_regex: 'attn(['\n", "remain_fp_regex"),
    ("weight: {n_bits: 8}\nact: {n_bits: 8}\nviditq: {alpha: 2, layer_name_regex: ff}\n",
     "viditq.alpha"),
    ("weight: {n_bits: 8}\nact: {n_bits: 8}\nquarot: {alpha: 0.5, layer_name_regex: ff}\n",
     "quarot.alpha"),
    ("weight: {n_bits: [4, 8], i_bitwidth: 0}\nact: {n_bits: 8}\n"
     "mixed_precision: {weight: {layer_name_regex: ['', '', '', '']}}\n",
     "mixed_precision.weight.layer_name_regex"),
    ("weight: {n_bits: 8}\nact: {n_bits: 8}\ncalib_data: {save_path: 3}\n",
     "calib_data.save_path"),
    ("- 1\n- 2\n", "top level"),
])
def test_malformed_recipes_name_the_key(tmp_path, text, key):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(RecipeError) as e:
        Recipe.from_yaml(p)
    assert key in str(e.value)


def test_unknown_preset_missing_file_and_invalid_yaml(tmp_path):
    with pytest.raises(RecipeError, match="w9a9"):
        Recipe.resolve("w9a9")
    with pytest.raises(RecipeError, match="not found"):
        Recipe.resolve(str(tmp_path / "nope.yaml"))
    p = tmp_path / "broken.yaml"
    p.write_text("weight: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        Recipe.from_yaml(p)
    with pytest.raises(RecipeError, match="Recipe"):
        Recipe.resolve(42)


def test_w4a8_and_ablation_presets():
    w4 = Recipe.preset("w4a8")
    assert (w4.weight.bits, w4.weight.sym, w4.act.bits) == (4, False, 8)
    assert [(b.method, b.alpha, b.optional) for b in w4.balance] == [("smooth+rotate", 0.5, False)]
    w8 = Recipe.preset("w8a8")
    assert [(b.method, b.optional) for b in w8.balance] == [("smooth+rotate", True)]
    for wa in ("w8a8", "w4a8"):
        assert Recipe.preset(f"{wa}-naive").static_act and not Recipe.preset(f"{wa}-naive").balance
        assert not Recipe.preset(f"{wa}-dynamic").balance
        for variant, method in (("smooth", "smooth"), ("rotate", "rotate"), ("viditq", "smooth+rotate")):
            r = Recipe.preset(f"{wa}-{variant}")
            assert [b.method for b in r.balance] == [method] and r.balance_for("blocks.0.ff.net.2")
    assert Recipe.preset("w4a8").with_(weight=Recipe.preset("w4a8").weight).weight_group is None


def test_yaml_group_and_balance_rules_apply_by_regex():
    r = Recipe.from_dict({"weight": {"n_bits": 4, "sym": False, "group": 128}, "act": {"n_bits": 8},
                          "viditq": {"alpha": 0.75, "layer_name_regex": "11|12"},
                          "quarot": {"layer_name_regex": "mlp"}})
    r.check_supported()
    assert r.weight_group == 128
    assert r.balance_for("spatial_blocks.11.attn.qkv").method == "smooth+rotate"
    assert r.balance_for("spatial_blocks.3.mlp.fc1").method == "rotate"
    assert r.balance_for("spatial_blocks.3.attn.qkv") is None
    with pytest.raises(RecipeError, match="act.group"):
        Recipe.from_dict({"weight": {"n_bits": 8}, "act": {"n_bits": 8, "group": 64}}).check_supported()


def test_mixed_precision_lists_follow_the_reference_semantics():
    """[FP regex, regex for n_bits[0], ...]: in order, later entries override earlier ones, the FP
    entry wins, '' matches nothing, unmatched layers keep n_bits[i_bitwidth]."""
    r = Recipe.from_dict({
        "weight": {"n_bits": [2, 4, 8], "i_bitwidth": 2},
        "act": {"n_bits": [4, 8], "i_bitwidth": 1},
        "mixed_precision": {"weight": {"layer_name_regex": ["cross", "", "blocks\\.1\\.", "mlp"]},
                            "act": {"layer_name_regex": ["", "blocks\\.1\\.attn"]}}})
    r.check_supported()
    assert r.layer_bits("blocks.0.attn.qkv") == (8, 8)      # nothing matches: the defaults
    assert r.layer_bits("blocks.1.attn.qkv") == (4, 4)      # W4 and A4 entries
    assert r.layer_bits("blocks.1.mlp.fc1") == (8, 8)       # the later 'mlp' entry overrides W4
    assert r.layer_bits("blocks.1.cross_attn.q") is None    # the FP entry wins over everything
    two_bit = Recipe.from_dict({"weight": {"n_bits": [2, 8], "i_bitwidth": 1}, "act": {"n_bits": 8},
                                "mixed_precision": {"weight": {"layer_name_regex": ["", "ff"]}}})
    with pytest.raises(RecipeError, match=r"mixed_precision.weight.layer_name_regex\[1\].*2-bit"):
        two_bit.check_supported()


# ----------------------------------------------------------------------------------------------
# hostile recipe files: every one a RecipeError naming the file (and the key), never a raw error
BOMB = "\n".join([ 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
                 + [f"{n}: &{n} [" + ",".join([f"*{p}"] * 9) + "]" for p, n in zip("abcdefgh", "bcdefghi")]) + "\n"
BASE = "weight: {n_bits: 8}\nact: {n_bits: 8}\n"


@pytest.mark.parametrize("content,match", [
    (b"[" * 100_000, "nested more than 100 levels"),
    (("model:\n  x: " + "[" * 5000 + "]" * 5000 + "\n").encode(), "nested more than 100 levels"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xd8", "not UTF-8"),
    (BOMB.encode(), "alias"),
    ((BASE + "model: *undefined\n").encode(), "not valid YAML"),
    ((BASE + "weight: {n_bits: 4}\n").encode(), r"duplicate key 'weight' \(line 3; first at line 1\)"),
    ((BASE + "model: {n: " + "9" * 5000 + "}\n").encode(), "cannot be read"),
    (b"weight: {n_bits: [8, [8]]}\nact: {n_bits: 8}\n", "weight.n_bits"),
    (b"weight: {n_bits: 8}\nact: [8]\n", "'act': expected a mapping"),
    (b"weight: {n_bits: 8}\nact: {n_bits: 8}\nremain_fp_regex: 42\n", "remain_fp_regex.*expected a regex string"),
    (b"weight: {n_bits: 8}\nact: {n_bits: 8}\n[1, 2]: x\n", "unhashable key"),
    (b"weight: {n_bits: 8}\nact: {n_bits: 8}\n1: x\n", "unknown key"),
    (b"weight: {n_bits: 8, i_bitwidth: 99999999999999999999}\nact: {n_bits: 8}\n", "weight.i_bitwidth"),
    (b"weight: {n_bits: 8}\nact: {n_bits: .nan}\n", "act.n_bits"),
    (b"#" * (2 << 20), "larger than"),
])
def test_hostile_recipe_files_are_refused_naming_the_file(tmp_path, content, match):
    p = tmp_path / "hostile.yaml"
    p.write_bytes(content)
    with pytest.raises(RecipeError, match=match) as e:
        Recipe.resolve(str(p))
    assert str(p) in str(e.value) and len(str(e.value)) < 600


def test_a_directory_or_unreadable_path_is_a_recipe_error(tmp_path):
    d = tmp_path / "recipes.yaml"
    d.mkdir()
    with pytest.raises(RecipeError, match="is a directory"):
        Recipe.resolve(str(d))
    with pytest.raises(RecipeError, match="cannot be read"):
        Recipe.from_yaml("bad\0name.yaml")


def test_error_messages_quote_huge_values_truncated():
    with pytest.raises(RecipeError) as e:
        Recipe.from_dict({"weight": {"n_bits": 8}, "act": {"n_bits": 8}, "calib_data": {"save_path": [0] * 10**6}})
    assert "calib_data.save_path" in str(e.value) and len(str(e.value)) < 300


EVIL = r"^(([\w.])+)+!$"


@pytest.mark.parametrize("where,recipe", [
    ("remain_fp_regex", {"remain_fp_regex": EVIL}),
    ("viditq.layer_name_regex", {"viditq": {"alpha": 0.5, "layer_name_regex": EVIL}}),
    ("mixed_precision.weight.layer_name_regex[1]",
     {"weight": {"n_bits": [4, 8], "i_bitwidth": 1}, "mixed_precision": {"weight": {"layer_name_regex": ["", EVIL]}}}),
])
def test_catastrophic_regex_is_refused_fast_from_a_dict_and_from_yaml(tmp_path, where, recipe):
    import time

    import yaml

    data = {"weight": {"n_bits": 8}, "act": {"n_bits": 8}, **recipe}
    t0 = time.perf_counter()
    with pytest.raises(RecipeError, match=re.escape(where) + r".*nested quantifiers") as e:
        Recipe.from_dict(data)
    assert repr(EVIL) in str(e.value)
    p = tmp_path / "evil.yaml"
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError, match=re.escape(where) + r".*nested quantifiers"):
        Recipe.from_yaml(p)
    assert time.perf_counter() - t0 < 0.5


def test_a_recipe_built_in_python_is_guarded_when_it_matches():
    r = Recipe.preset("w8a8").with_(remain_fp_regex=EVIL)
    with pytest.raises(RecipeError, match="remain_fp_regex.*nested quantifiers"):
        r.keeps_fp("a" * 40)
    with pytest.raises(RecipeError, match="more than 256"):
        Recipe.preset("w8a8").keeps_fp("x" * 1000)


# -- balance="search" -------------------------------------------------------------------------

def test_search_presets_and_balance_search_in_python():
    from viditq_compile.config.recipe import SEARCH_ALPHAS, SEARCH_KINDS, BalanceSearch

    for wa, bits, sym in (("w4a8", 4, False), ("w8a8", 8, True)):
        r = Recipe.resolve(f"{wa}-search")
        assert r.balance == () and r.balance_search == BalanceSearch()
        assert (r.weight.bits, r.weight.sym, r.act.bits) == (bits, sym, 8)
        r.check_supported()
    assert BalanceSearch().kinds == SEARCH_KINDS == ("none", "smooth", "rotate", "smooth+rotate")
    assert min(SEARCH_ALPHAS) <= 0.3 and max(SEARCH_ALPHAS) >= 0.9
    r = Recipe.preset("w4a8").with_(balance="search")  # the w4a8 preset's rules are replaced
    assert r.balance == () and r.balance_search == BalanceSearch()
    grid = BalanceSearch(kinds=["none", "smooth"], alphas=[0.25, 1], max_rows=16, seeds=[3])
    r = Recipe(name="g", balance="search", balance_search=grid)
    assert r.balance_search.alphas == (0.25, 1.0) and r.balance_search.kinds == ("none", "smooth")


@pytest.mark.parametrize("kw,match", [
    (dict(kinds=("none", "smoth")), r"kinds=\('none', 'smoth'\): expected distinct names"),
    (dict(kinds=()), "kinds=().*expected distinct names"),
    (dict(kinds="smooth"), "kinds='smooth'"),
    (dict(kinds=("rotate", "rotate")), "distinct"),
    (dict(alphas=(0.5, 1.5)), r"alphas=\(0.5, 1.5\): expected distinct numbers in \[0, 1\]"),
    (dict(alphas=(True,)), "alphas=.True"),
    (dict(alphas=()), "smooth, so alphas must name at least one"),
    (dict(max_rows=0), "max_rows=0: expected an int >= 1"),
    (dict(max_rows=2.0), "max_rows=2.0"),
    (dict(seeds=(-1,)), r"seeds=\(-1,\): expected distinct ints"),
    (dict(seeds=(1, 1)), "seeds="),
])
def test_balance_search_grids_are_validated_naming_the_value(kw, match):
    from viditq_compile.config.recipe import BalanceSearch

    with pytest.raises(RecipeError, match=match):
        BalanceSearch(**kw)


def test_balance_search_conflicts_are_refused():
    from viditq_compile.config.budget import Budget
    from viditq_compile.config.recipe import BalanceRule, BalanceSearch

    with pytest.raises(RecipeError, match="balance='serch': expected 'search'"):
        Recipe(name="x", balance="serch")
    with pytest.raises(RecipeError, match="cannot be combined with the balancing rules"):
        Recipe(name="x", balance=(BalanceRule("viditq", ".", 0.5),), balance_search=BalanceSearch())
    with pytest.raises(RecipeError, match="balance_search must be a BalanceSearch, got dict"):
        Recipe(name="x", balance_search={"alphas": [0.5]})
    with pytest.raises(RecipeError, match="static per-tensor activation scales"):
        Recipe.preset("w8a8-naive").with_(balance="search").check_supported()
    with pytest.raises(RecipeError, match="mixed-precision budget is not built yet"):
        Recipe.preset("w4a8-search").with_(budget=Budget(weight_bits=4.5)).check_supported()


def test_balance_search_from_yaml(tmp_path):
    base = "weight: {n_bits: 4, sym: false}\nact: {n_bits: 8}\n"
    p = tmp_path / "s.yaml"
    p.write_text(base + "balance: search\n")
    r = Recipe.from_yaml(p)
    assert r.balance_search is not None and r.balance == ()
    r.check_supported()
    p.write_text(base + "balance:\n  search: {kinds: [none, smooth+rotate], alphas: [0.4, 0.6], max_rows: 512,"
                        " seeds: [0, 1]}\n")
    s = Recipe.from_yaml(p).balance_search
    assert (s.kinds, s.alphas, s.max_rows, s.seeds) == (("none", "smooth+rotate"), (0.4, 0.6), 512, (0, 1))
    p.write_text(base + "balance: {search: null}\n")
    assert Recipe.from_yaml(p).balance_search.alphas == Recipe.preset("w4a8-search").balance_search.alphas


@pytest.mark.parametrize("text,match", [
    ("balance: serch\n", r"recipe key 'balance': expected 'search' or a mapping.*got 'serch'"),
    ("balance: {serch: {}}\n", r"recipe key 'balance.serch': unknown key"),
    ("balance: {search: {alpha: [0.5]}}\n", r"recipe key 'balance.search.alpha': unknown key"),
    ("balance: {search: {alphas: 0.5}}\n", r"recipe key 'balance.search.alphas': expected a list, got 0.5"),
    ("balance: {search: {alphas: [2]}}\n", r"recipe key 'balance.search': .*alphas=\(2,\)"),
    ("balance: {search: {kinds: [smoothquant]}}\n", r"'balance.search': .*kinds=\('smoothquant',\)"),
    ("balance: {search: {max_rows: -3}}\n", r"'balance.search': .*max_rows=-3"),
    ("balance: search\nviditq: {alpha: 0.5, layer_name_regex: '.'}\n",
     r"recipe key 'balance': 'search' chooses the balancing of every layer; remove \['viditq'\]"),
])
def test_bad_balance_search_yaml_names_the_key_and_value(tmp_path, text, match):
    p = tmp_path / "bad.yaml"
    p.write_text("weight: {n_bits: 8}\nact: {n_bits: 8}\n" + text)
    with pytest.raises(RecipeError, match=match) as e:
        Recipe.from_yaml(p)
    assert str(p) in str(e.value)
