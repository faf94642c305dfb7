"""The user-regex guard: catastrophic patterns refused fast on the parse tree, ordinary ones compiled."""

import glob
import os
import time

import pytest

from viditq_compile.config.recipe import DIT_KEEP_FP_REGEX, PRESETS, Recipe
from viditq_compile.io.user_regex import MAX_SUBJECT_CHARS, UserRegexError, compile_user_regex, user_search

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "viditq_configs")
EVIL = r"^(([\w.])+)+!$"


def test_the_catastrophic_pattern_is_refused_fast():
    """Plain re doubles its time per character of ``'a' * n`` on it; the guard answers from the tree."""
    t0 = time.perf_counter()
    with pytest.raises(UserRegexError, match=r"remain_fp_regex: regex .*nested quantifiers"):
        compile_user_regex(EVIL, "remain_fp_regex")
    assert time.perf_counter() - t0 < 0.1


@pytest.mark.parametrize("pattern,why", [
    (EVIL, "nested quantifiers"),
    (r"(a+)+$", "nested quantifiers"),
    (r"(a{2,})*", "nested quantifiers"),
    (r"(\d{1,3})+x", "nested quantifiers"),
    (r"(a|b+)+", "nested quantifiers"),
    (r"(?:x(?:y+))+", "nested quantifiers"),
    (r"(a*)*", "empty string"),
    (r"(a?){30}a{30}", "empty string"),
    (r"(a|)+b", "empty string"),
    (r"(a|aa)+b", "same text"),
    (r"(ab|a|b)+c", "same text"),
    (r"(\w|é)+!", None),  # one character class: fine
    (r"(?=(a+)+b)", "nested quantifiers"),  # inside a lookahead too
    ("(" * 60 + "a" + ")" * 60, "nested more than"),
])
def test_catastrophic_shapes_are_refused_on_the_tree(pattern, why):
    if why is None:
        compile_user_regex(pattern, "k")
        return
    with pytest.raises(UserRegexError, match=why) as e:
        compile_user_regex(pattern, "mixed_precision.weight.layer_name_regex[2]")
    assert str(e.value).startswith("mixed_precision.weight.layer_name_regex[2]: ")


@pytest.mark.parametrize("pattern,where,match", [
    (3, "k", "expected a regex string, got int"),
    (None, "k", "got NoneType"),
    ("x" * 1001, "k", "1001 characters"),
    ("attn([", "viditq.layer_name_regex", r"viditq.layer_name_regex: invalid regex 'attn\(\['"),
    ("a{99999999999}", "k", "invalid regex"),
])
def test_non_strings_overlong_and_invalid_patterns_name_where(pattern, where, match):
    with pytest.raises(UserRegexError, match=match):
        compile_user_regex(pattern, where)


@pytest.mark.parametrize("pattern", [
    DIT_KEEP_FP_REGEX, r"\b(?!cross_)attn\b", r"blocks\.0|ff|blocks\.27", r"(attn|ff)+", r"(a|ab)+",
    r"(?>a+)+b", r"(a+)++", r"(\d{2})+", r"(ab?)+", "attn2.to_[kv]", r"(?:transformer_blocks\.\d+\.)?attn\d",
    ".*attn.*", "", ".", "11|12|13|14",
])
def test_ordinary_patterns_compile_and_match(pattern):
    assert compile_user_regex(pattern, "k").pattern == pattern


def test_every_regex_of_the_presets_and_reference_configs_passes_the_guard():
    regexes = []
    for r in PRESETS.values():
        regexes += [r.remain_fp_regex] + [b.layer_name_regex for b in r.balance]
    for path in glob.glob(os.path.join(CONFIGS, "*.yaml")):
        r = Recipe.from_yaml(path)
        regexes += [r.remain_fp_regex] + [b.layer_name_regex for b in r.balance]
        if r.mixed_precision:
            regexes += list(r.mixed_precision.weight) + list(r.mixed_precision.act)
    assert len(regexes) > 20
    for p in regexes:
        compile_user_regex(p, "k")


def test_long_subjects_are_refused_and_short_ones_matched():
    pat = compile_user_regex(r"\w*\w*!", "k")  # polynomial: bounded by the subject cap
    assert user_search(pat, "blocks.0.attn!", "k") is not None
    with pytest.raises(UserRegexError, match=f"more than {MAX_SUBJECT_CHARS}"):
        user_search(pat, "a" * (MAX_SUBJECT_CHARS + 1), "remain_fp_regex")
    t0 = time.perf_counter()
    assert user_search(pat, "a" * MAX_SUBJECT_CHARS, "k") is None
    assert time.perf_counter() - t0 < 5
