"""The part of Inductor's cache key that belongs to the ``viditq`` lowering.

Inductor's FX graph cache keys on the graph *before* the ``viditq`` ops are decomposed, so an
upgraded (or locally edited) viditq_compile would reuse kernels compiled from its old numerics.
The backend therefore installs ``cache_key_pass()``, a no-op post-grad pass whose ``uuid`` is
``lowering_key()``: a hash of the source of every package module whose code can change what
Inductor generates.

Those modules are derived, not listed: the ``ROOTS`` (the decompositions, ``lowering/inductor.py``)
and every package module they import, transitively, found by parsing the sources (``ast``): imports
at any depth of a file count (function-level ones included), ``if TYPE_CHECKING:`` blocks do not
(they never run). Today that is the decompositions, the numerics they compute with, the op
definitions whose fake implementations the tracing runs (``ops/library.py``, ``ops/schema.py``,
``numerics/contracts.py``) and the kernel capabilities that choose a route
(``config/capabilities.py``); a module the lowering starts to import joins the key without anyone
updating a list. Package ``__init__`` modules are not followed: the subpackages' hold no code, and
the top-level one imports the whole public API (the CLI included), which takes no part in lowering.

Not roots: what runs before Inductor gets the graph (the quantize passes,
``lowering/fuse_epilogues.py``) shows in the graph itself, which the cache already keys on; the CUDA
kernels (``ops/cuda.py``, ``kernels/``) run inside opaque op calls that the generated code makes
at run time.

The hash covers each module's dotted name and its bytes, so it does not depend on where the package
is installed.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Set
from pathlib import Path

__all__ = ["ROOTS", "package_modules", "imported_modules", "lowering_modules", "lowering_sources",
           "lowering_key", "route_key", "cache_key_pass"]

PACKAGE_DIR = Path(__file__).resolve().parent.parent
"""The ``viditq_compile`` directory this module belongs to."""

ROOTS = ("lowering.inductor",)
"""Where the walk starts, relative to the package: the code Inductor's generated kernels come from."""


def package_modules(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package at ``package_dir``
    (its directory name is the package name)."""
    package_dir = Path(package_dir)
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imported_modules(name: str, path: Path, known: Set[str]) -> set[str]:
    """The modules of ``known`` that module ``name`` (source ``path``) imports anywhere in its
    file, ``if TYPE_CHECKING:`` blocks excepted. ``import a.b.c`` imports ``a`` and ``a.b`` too."""
    tree = ast.parse(Path(path).read_bytes(), filename=str(path))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    package = name if Path(path).name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                m = ".".join(parts[:i])
                if m in known and m != name:
                    out.add(m)
    return out


def lowering_modules(package_dir: Path = PACKAGE_DIR, roots: tuple[str, ...] = ROOTS) -> dict[str, Path]:
    """The ``ROOTS`` and every package module they import, transitively (module docstring):
    dotted name -> source file, sorted by name."""
    modules = package_modules(package_dir)
    package = Path(package_dir).name
    inits = {m for m, p in modules.items() if p.name == "__init__.py"}
    todo = [f"{package}.{r}" for r in roots]
    missing = [m for m in todo if m not in modules]
    if missing:
        raise FileNotFoundError(f"lowering cache key: no module {missing} under {package_dir}")
    found: set[str] = set()
    while todo:
        m = todo.pop()
        if m in found:
            continue
        found.add(m)
        todo.extend(d for d in imported_modules(m, modules[m], modules.keys()) if d not in inits)
    return {m: modules[m] for m in sorted(found)}


def lowering_sources(package_dir: Path = PACKAGE_DIR) -> tuple[str, ...]:
    """The source files ``lowering_key`` hashes."""
    return tuple(str(p) for p in lowering_modules(package_dir).values())


def lowering_key(package_dir: Path = PACKAGE_DIR) -> str:
    """SHA-256 (hex) over the name and source bytes of each of ``lowering_modules``."""
    h = hashlib.sha256()
    for name, path in lowering_modules(package_dir).items():
        data = path.read_bytes()
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def route_key() -> str:
    """The run-time choices that change what the decompositions emit with the same sources: the
    CPU int8 GEMM route (``kernels.onednn_int8``: oneDNN, or ``torch._int_mm`` where it is off or
    ``VIDITQ_CPU_INT8_GEMM=int_mm``)."""
    from viditq_compile.kernels import onednn_int8

    return f"cpu_int8_gemm={'onednn' if onednn_int8.available() else 'int_mm'}"


def cache_key_pass():
    """A no-op post-grad pass (``torch._inductor.config.post_grad_custom_post_pass``) whose
    ``uuid`` is ``lowering_key()`` with ``route_key()``, read when the pass is made."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    key = f"{lowering_key()}:{route_key()}"

    class ViditqLoweringKey(CustomGraphPass):
        def __call__(self, graph):
            return None

        def uuid(self):
            return key

    return ViditqLoweringKey()
