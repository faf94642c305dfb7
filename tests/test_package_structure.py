"""The package's shape: no import cycles (function-level imports included), layers import downwards,
no import-time side effects on the environment."""

from __future__ import annotations

import ast
import pathlib

import viditq_compile
from viditq_compile.lowering.cache_key import imported_modules, package_modules

ROOT = pathlib.Path(viditq_compile.__file__).parent


def _graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its file (function-level imports too;
    ``if TYPE_CHECKING:`` blocks excepted: those never run). The walker the Inductor cache key uses."""
    mods = package_modules(ROOT)
    known = set(mods)
    return {m: imported_modules(m, p, known) for m, p in mods.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, or None. The package ``__init__`` modules are left out as targets:
    every submodule's import runs ``viditq_compile/__init__``, which is the public face that
    imports everything; what matters is that the modules below it form a DAG."""
    graph = {m: {d for d in deps if not _is_init(d)} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def _is_init(module: str) -> bool:
    return (ROOT.parent / pathlib.Path(*module.split(".")) / "__init__.py").exists()


def test_the_package_has_no_import_cycles():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_subpackage_inits_import_nothing_of_the_package():
    """Only the top-level ``__init__`` gathers the public names; a subpackage's ``__init__`` that
    imported its modules would make every import of one of them import all."""
    graph = _graph()
    for m, deps in graph.items():
        if _is_init(m) and m != "viditq_compile":
            assert not deps, f"{m}/__init__.py imports {sorted(deps)}"


def test_the_library_does_not_import_the_demo():
    for path in ROOT.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("viditq_demo"):
                raise AssertionError(f"{path} imports {node.module}")
            if isinstance(node, ast.Import) and any(a.name.startswith("viditq_demo") for a in node.names):
                raise AssertionError(f"{path} imports viditq_demo")


def test_no_module_sets_environment_variables_at_import():
    """``os.environ[...] = `` / ``setdefault`` / ``putenv`` at module level change the process
    for everything imported after; the package reads the environment, never writes it."""
    for path in ROOT.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            src = ast.unparse(node)
            assert "os.environ[" not in src.split("=")[0] or not isinstance(node, ast.Assign), (path, src)
            assert "environ.setdefault" not in src and "putenv" not in src, (path, src)


def _readme_layout() -> dict[str, str]:
    """``package -> its line`` from the README's Layout block (``  name/  text``)."""
    import re

    readme = (ROOT.parent / "README.md").read_text()
    block = readme[readme.index("## Layout"):]
    block = block[block.index("```") + 3:]
    block = block[: block.index("```")]
    out = {}
    for line in block.splitlines():
        m = re.match(r"^  (\w+)/\s+(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def test_the_readme_layout_lists_every_package_and_its_modules():
    listed = _readme_layout()
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert set(listed) == packages, (f"README Layout lists {sorted(set(listed) - packages)} that do not exist "
                                     f"and misses {sorted(packages - set(listed))}")
    for package, line in listed.items():
        modules = {p.stem for p in (ROOT / package).glob("*.py") if p.stem != "__init__"}
        missing = sorted(m for m in modules if m not in line)
        assert not missing, f"README Layout line of {package}/ does not name {missing}"


def test_data_modules_import_no_pass_graph_search_or_report_code_at_module_level():
    forbidden = ("viditq_compile.passes", "viditq_compile.graph", "viditq_compile.mixed_precision",
                 "viditq_compile.report", "viditq_compile.lowering", "viditq_compile.kernels")
    for package in ("config", "numerics"):
        for path in (ROOT / package).glob("*.py"):
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(forbidden):
                    raise AssertionError(f"{path.name} in {package}/ imports {node.module} at module level")
