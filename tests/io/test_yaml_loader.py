"""Bounded YAML: alias bombs, deep nesting, duplicate keys, binary and oversized input are refused."""

import time
import tracemalloc

import pytest

from viditq_compile.io import yaml_loader
from viditq_compile.io.yaml_loader import YamlError, load_yaml, short_repr


def billion_laughs(levels=9, width=9):
    """The classic alias bomb: ~340 bytes, width**levels leaves once the aliases are expanded."""
    names = "abcdefghijklmnop"
    lines = [f"{names[0]}: &{names[0]} [" + ",".join(['"lol"'] * width) + "]"]
    for prev, name in zip(names, names[1:levels]):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * width) + "]")
    return "\n".join(lines) + "\n"


def test_billion_laughs_is_refused_fast_in_bounded_memory():
    doc = billion_laughs()
    assert len(doc) < 400
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(YamlError, match="alias") as e:
            load_yaml(doc, "bomb.yaml")
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0 and peak < 50 * 2**20
    assert "bomb.yaml" in str(e.value)


def test_many_aliases_are_refused_even_when_they_expand_to_little():
    doc = "a: &a 1\nb: [" + ",".join(["*a"] * (yaml_loader.MAX_ALIASES + 1)) + "]\n"
    with pytest.raises(YamlError, match="aliases"):
        load_yaml(doc, "x.yaml")
    assert load_yaml("a: &a [1, 2]\nb: *a\nc: *a\n", "x.yaml") == {"a": [1, 2], "b": [1, 2], "c": [1, 2]}


def test_recursive_alias_is_refused():
    with pytest.raises(YamlError, match="recursive alias"):
        load_yaml("x: &a [1, *a]\n", "x.yaml")


@pytest.mark.parametrize("doc", ["[" * 100_000, "{" * 100_000,
                                 "a:\n" + "".join(" " * i + "- \n" for i in range(1, 200))])
def test_deep_nesting_is_refused_cleanly(doc):
    with pytest.raises(YamlError, match="nested more than 100 levels") as e:
        load_yaml(doc, "deep.yaml")
    assert e.value.line is not None
    load_yaml("x: " + "[" * 50 + "]" * 50, "ok.yaml")  # under the limit


def test_duplicate_keys_are_refused_naming_the_key_and_line():
    with pytest.raises(YamlError, match=r"duplicate key 'weight' \(line 3; first at line 1\)") as e:
        load_yaml("weight: {n_bits: 8}\nact: {n_bits: 8}\nweight: {n_bits: 4}\n", "r.yaml")
    assert e.value.key == "weight" and e.value.line == 3
    with pytest.raises(YamlError, match="duplicate key 'n_bits'"):
        load_yaml("weight:\n  n_bits: 8\n  n_bits: 4\n", "r.yaml")
    # a '<<' merge overridden by an explicit key is not a duplicate
    assert load_yaml("a: &x {k: 1}\nb:\n  <<: *x\n  k: 2\n", "m.yaml") == {"a": {"k": 1}, "b": {"k": 2}}


def test_binary_and_oversized_input_are_refused():
    with pytest.raises(YamlError, match="not UTF-8.*binary"):
        load_yaml(b"weight: 8\n\xff\xfe\x00\x01", "bin.yaml")
    with pytest.raises(YamlError, match="more than"):
        load_yaml(b"#" * (yaml_loader.MAX_BYTES + 1), "big.yaml")
    with pytest.raises(YamlError, match="str or bytes"):
        load_yaml(42, "num.yaml")
    assert load_yaml("\ufeffa: 1\n".encode(), "bom.yaml") == {"a": 1}


@pytest.mark.parametrize("doc,match", [
    ("x: " + "1" * 5000, "cannot be read"),                # int() digit limit: a ValueError in PyYAML
    ("x: !!timestamp 2001-13-45", "cannot be read"),
    ("x: !!python/object/apply:os.system [ls]", "not valid YAML"),
    ("- 1\n---\n- 2\n", "not valid YAML"),
    ("weight: [unclosed\n", "not valid YAML"),
])
def test_constructor_and_parser_errors_become_yaml_errors(doc, match):
    with pytest.raises(YamlError, match=match) as e:
        load_yaml(doc, "r.yaml")
    assert str(e.value).startswith("r.yaml: ")


def test_short_repr_truncates_huge_and_shared_values_cheaply():
    shared = ["lol"] * 9
    for _ in range(8):
        shared = [shared] * 9  # 9**9 leaves if fully expanded
    t0 = time.perf_counter()
    text = short_repr({"a": shared, "b": "x" * 10_000})
    assert time.perf_counter() - t0 < 0.1 and len(text) <= 80
    assert short_repr("ff") == "'ff'"
