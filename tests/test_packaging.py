"""What ships: the library wheel holds ``viditq_compile`` and nothing of the demo (issue 14); the
demo (``demo/``) is its own project, found by the CLI through entry points, never imported."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import viditq_compile.cli as cli

REPO = Path(__file__).resolve().parent.parent
# what a clone does not have: the venv, build outputs, caches, run artifacts
NOT_IN_A_CLONE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                        ".*_cache", ".benchmarks", "artifacts", "runs")
LIBRARY = "viditq_compile"


def _pyproject(path: Path) -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads(path.read_text())


def _build_wheel(project: Path, tmp_path: Path) -> list[str]:
    """The file names in the wheel pip builds from a copy of ``project`` (a copy, so that the
    build's ``build/`` and egg-info never land in the working tree)."""
    pytest.importorskip("setuptools")  # --no-build-isolation builds with the environment's own
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=NOT_IN_A_CLONE)
    out = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "--no-index", "-w", str(out), str(src / project)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        return z.namelist()


def test_the_library_project_finds_only_the_library_packages():
    from setuptools import find_packages

    tool = _pyproject(REPO / "pyproject.toml")["tool"]["setuptools"]
    include = tool["packages"]["find"]["include"]
    assert include == [f"{LIBRARY}*"]
    found = find_packages(str(REPO), include=include)
    assert LIBRARY in found and all(p.split(".")[0] == LIBRARY for p in found), found
    assert all(key.split(".")[0] == LIBRARY for key in tool.get("package-data", {}))


def test_the_library_wheel_holds_no_demo_code_or_assets(tmp_path):
    names = _build_wheel(Path("."), tmp_path)
    dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
    assert dist_info.startswith("viditq_compile-")
    outside = [n for n in names if n.split("/")[0] not in (LIBRARY, dist_info)]
    assert not outside, outside
    assert not [n for n in names if "viditq_demo" in n or "digits/assets" in n]
    assert not [n for n in names if n.endswith((".npz", ".safetensors", ".png"))]
    assert f"{LIBRARY}/cli.py" in names and f"{LIBRARY}/__init__.py" in names
    assert len(names) > 50, len(names)  # the whole library, not an empty shell


def test_the_demo_wheel_holds_the_demo_and_its_assets(tmp_path):
    names = set(_build_wheel(Path("demo"), tmp_path))
    assets = {"digits.npz", "dit.safetensors", "dit_config.json", "classifier.safetensors"}
    assert {f"viditq_demo/digits/assets/{a}" for a in assets} <= names
    assert {"viditq_demo/cli_models.py", "viditq_demo/quality.py", "viditq_demo/demo_model.py"} <= names
    assert not [n for n in names if n.startswith(f"{LIBRARY}/")]


def test_the_entry_points_are_declared_by_the_demo_not_by_the_library():
    lib = _pyproject(REPO / "pyproject.toml")["project"].get("entry-points", {})
    assert cli.MODELS_GROUP not in lib and cli.COMMANDS_GROUP not in lib
    demo = _pyproject(REPO / "demo" / "pyproject.toml")["project"]
    assert demo["name"] == "viditq-demo" and "viditq-compile" in demo["dependencies"]
    assert set(demo["entry-points"][cli.MODELS_GROUP]) == set(cli.DEMO_MODELS)
    assert demo["entry-points"][cli.COMMANDS_GROUP] == {"quality": "viditq_demo.quality"}


@pytest.fixture
def no_demo(monkeypatch):
    """The library as installed without the demo: no entry point of either group."""
    real = entry_points

    def without_demo(**select):
        if select.get("group") in (cli.MODELS_GROUP, cli.COMMANDS_GROUP):
            return []
        return real(**select)

    monkeypatch.setattr(cli, "entry_points", without_demo)


@pytest.mark.parametrize("argv", [["quantize", "--model", "digits", "--no-bench"],
                                  ["quantize", "--model", "tiny", "--no-bench"],
                                  ["quantize", "--no-bench"],  # --model demo is the default
                                  ["quality", "--per-class", "1"]])
def test_without_the_demo_its_commands_say_what_to_install(no_demo, argv, capsys, tmp_path):
    code = cli.main([*argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2, err
    (line,) = err.strip().splitlines()
    assert line.startswith("viditq: error: ") and "not installed" in line and "pip install -e demo" in line
    assert not (tmp_path / "out").exists()


def test_a_declared_provider_that_cannot_be_imported_is_a_clear_error(monkeypatch, capsys):
    from importlib.metadata import EntryPoint

    broken = EntryPoint(name="tiny", value="viditq_demo_gone.cli_models:tiny", group=cli.MODELS_GROUP)
    monkeypatch.setattr(cli, "entry_points", lambda **select: [broken])
    code = cli.main(["quantize", "--model", "tiny", "--no-bench"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot be imported" in err and "pip install -e demo" in err, err
