"""The Triton kernel tests on a machine without CUDA: Triton's interpreter (``TRITON_INTERPRET=1``)
in a child pytest, so that the environment of this run stays as it is.

``triton.jit`` reads ``TRITON_INTERPRET`` when a kernel is defined: Triton's own library functions
(``tl.zeros``, ...) when triton is first imported, which any ``torch.compile`` test may do first,
and the kernel modules when they are imported (``int_gemm.INTERPRET`` also picks the launch path
and refuses CPU tensors without it). So the variable cannot be set for part of a run. Instead,
without CUDA, the tests of a module marked ``triton_interpreter`` run in one child pytest per
module (the tests this run selected, ``TRITON_INTERPRET=1`` set from its start), and each test
here reports its child's outcome (``pytest_pyfunc_call`` in ``tests/conftest.py``).

With CUDA, or with ``TRITON_INTERPRET=1`` set for the whole run, the tests run here as usual;
without CUDA and with ``TRITON_INTERPRET`` set to anything else they skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

MARK = "triton_interpreter"
_RESULTS_ENV = "VIDITQ_TRITON_INTERPRETER_RESULTS"  # set in the child: where it writes its outcomes
_SEVERITY = {"passed": 0, "skipped": 1, "failed": 2}


def mode() -> str:
    """``"cuda"``, ``"here"`` (TRITON_INTERPRET=1 for the whole run), ``"child"`` or ``"off"``."""
    if torch.cuda.is_available():
        return "cuda"
    value = os.environ.get("TRITON_INTERPRET")
    if value is None:
        return "child"
    return "here" if value == "1" else "off"


def skip_module_if_off() -> None:
    """At the top of a marked test module: skip it when the kernels cannot run at all."""
    if mode() == "off":
        pytest.skip("no CUDA device and TRITON_INTERPRET is not '1' (set it to 1 or unset it)",
                    allow_module_level=True)


_child_results: dict[str, dict[str, list[str]]] = {}  # test file -> node id -> [outcome, text]


def relayed_call(item: pytest.Function) -> bool | None:
    """For ``pytest_pyfunc_call``: ``None`` to run the test here; else ``True`` once the child's
    outcome of this test is reported (a skip or failure is raised with the child's text)."""
    if mode() != "child" or item.get_closest_marker(MARK) is None:
        return None
    path = str(item.path)
    if path not in _child_results:
        nodeids = [i.nodeid for i in item.session.items if str(i.path) == path]
        _child_results[path] = _run_child(str(item.config.rootpath), nodeids)
    outcome, text = _child_results[path].get(item.nodeid, ["failed", "the child pytest reported nothing"])
    if outcome == "skipped":
        pytest.skip(text)
    if outcome == "failed":
        pytest.fail(f"under TRITON_INTERPRET=1 (child pytest):\n{text}", pytrace=False)
    return True


def _run_child(rootdir: str, nodeids: list[str]) -> dict[str, list[str]]:
    with tempfile.TemporaryDirectory() as tmp:
        results = os.path.join(tmp, "results.json")
        env = dict(os.environ, TRITON_INTERPRET="1", **{_RESULTS_ENV: results})
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", __name__, *nodeids]
        proc = subprocess.run(cmd, cwd=rootdir, env=env, capture_output=True, text=True)
        if not os.path.exists(results):
            why = (f"child pytest exited with {proc.returncode}, no results:\n"
                   f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
            return {n: ["failed", why] for n in nodeids}
        with open(results) as f:
            return json.load(f)


# -- in the child (loaded with -p): each test's worst outcome over setup, call and teardown -------

_outcomes: dict[str, list[str]] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not os.environ.get(_RESULTS_ENV):
        return
    if report.failed:
        new = ["failed", f"{report.when}: {report.longreprtext}"]
    elif report.skipped:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        new = ["skipped", reason.removeprefix("Skipped: ")]
    else:
        new = ["passed", ""]
    old = _outcomes.get(report.nodeid)
    if old is None or _SEVERITY[new[0]] > _SEVERITY[old[0]]:
        _outcomes[report.nodeid] = new


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get(_RESULTS_ENV)
    if path:
        with open(path, "w") as f:
            json.dump(_outcomes, f)
