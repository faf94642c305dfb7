"""The lowering's part of Inductor's cache key (``lowering/cache_key.py``): derived from the import
graph of the decompositions, so an edit to any module that shapes what Inductor generates changes
it, and an edit elsewhere does not."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from viditq_compile.lowering.cache_key import (
    PACKAGE_DIR,
    cache_key_pass,
    lowering_key,
    lowering_modules,
    route_key,
)


def _copy(tmp_path: Path) -> Path:
    dst = tmp_path / "viditq_compile"
    shutil.copytree(PACKAGE_DIR, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{path}: {old!r} not found once"
    path.write_text(text.replace(old, new))


def test_the_key_is_stable_and_does_not_depend_on_where_the_package_lies(tmp_path):
    pkg = _copy(tmp_path)
    assert lowering_key(pkg) == lowering_key(pkg) == lowering_key()
    assert cache_key_pass().uuid() == f"{lowering_key()}:{route_key()}"


def test_the_cpu_gemm_route_is_part_of_the_key(monkeypatch):
    """Code compiled for the oneDNN route is not served to a process on the ``torch._int_mm`` one."""
    from viditq_compile.kernels import onednn_int8

    onednn_int8.available()  # decided, so the monkeypatch puts the decision back
    monkeypatch.setitem(onednn_int8._state, "reason", None)
    on = cache_key_pass().uuid()
    monkeypatch.setitem(onednn_int8._state, "reason", "off for the test")
    off = cache_key_pass().uuid()
    assert on != off and on.endswith("onednn") and off.endswith("int_mm")


def test_the_modules_are_the_decompositions_and_what_they_import():
    mods = set(lowering_modules())
    assert {"viditq_compile.lowering.inductor", "viditq_compile.ops.library", "viditq_compile.ops.schema",
            "viditq_compile.numerics.contracts", "viditq_compile.numerics.quant",
            "viditq_compile.numerics.hadamard", "viditq_compile.numerics.packing",
            "viditq_compile.config.capabilities"} <= mods
    # the public face and the CLI take no part in lowering; package __init__s are not followed
    assert not mods & {"viditq_compile", "viditq_compile.cli", "viditq_compile.api", "viditq_compile.ops"}


def test_editing_an_op_implementation_changes_the_key(tmp_path):
    pkg = _copy(tmp_path)
    before = lowering_key(pkg)
    _edit(pkg / "ops" / "library.py", "return out.clone() if out is x else out", "return out.clone()")
    assert lowering_key(pkg) != before


def test_editing_the_kernel_capabilities_changes_the_key(tmp_path):
    pkg = _copy(tmp_path)
    before = lowering_key(pkg)
    _edit(pkg / "config" / "capabilities.py", "ROTATION_IN_KERNEL_MAX_TILE = 16384",
          "ROTATION_IN_KERNEL_MAX_TILE = 8192")
    assert lowering_key(pkg) != before


def test_editing_an_unrelated_module_keeps_the_key(tmp_path):
    pkg = _copy(tmp_path)
    before = lowering_key(pkg)
    cli = pkg / "cli.py"
    cli.write_text(cli.read_text() + "\n\ndef _added_later():\n    return 1\n")
    assert lowering_key(pkg) == before


def test_a_module_the_lowering_starts_to_import_joins_the_key(tmp_path):
    pkg = _copy(tmp_path)
    helper = pkg / "numerics" / "new_helper.py"
    helper.write_text("SCALE = 1\n")
    before = lowering_key(pkg)
    helper.write_text("SCALE = 2\n")
    assert lowering_key(pkg) == before  # nothing imports it yet
    # a function-level import, two steps away from the decompositions
    _edit(pkg / "ops" / "library.py", "    out = numerics.balance_activation(",
          "    from viditq_compile.numerics import new_helper  # noqa: F401\n"
          "    out = numerics.balance_activation(")
    assert "viditq_compile.numerics.new_helper" in lowering_modules(pkg)
    joined = lowering_key(pkg)
    helper.write_text("SCALE = 3\n")
    assert lowering_key(pkg) != joined


def test_imports_only_for_type_checking_do_not_count(tmp_path):
    pkg = _copy(tmp_path)
    _edit(pkg / "ops" / "library.py", "import torch\n",
          "import torch\nfrom typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from viditq_compile import cli\n")
    assert "viditq_compile.cli" not in lowering_modules(pkg)


def test_a_missing_root_is_an_error(tmp_path):
    pkg = _copy(tmp_path)
    (pkg / "lowering" / "inductor.py").unlink()
    with pytest.raises(FileNotFoundError, match="lowering.inductor"):
        lowering_key(pkg)
