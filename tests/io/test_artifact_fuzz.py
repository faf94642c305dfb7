"""Seeded fuzzing of ``vq.load`` over a real artifact (balanced W4A8: quantize_act, qlinear,
rotations): byte flips, truncations, member shuffles, drops and duplicates, edits inside the
program JSON, the plan and the weights, mostly with the manifest recomputed as an attacker would.

Every case must end one of three ways: refused with ``ArtifactError``; loaded and bit-exact with
the original; or, only where the program JSON or a weight's bytes were edited into another valid
program (finite, positive scales), loaded and running (or failing) as that program. Never another
exception from ``load``, never
code run (a marker file), never a write into the artifact.
"""

import hashlib
import json
import os
import random
import shutil

import pytest
import torch

import viditq_compile as vq
from tests.io.hostile_artifacts import MODEL_JSON, members, rebuild_zip, resum

# VIDITQ_FUZZ_CASES / VIDITQ_FUZZ_SEED run a deeper search by hand; CI runs the default
CASES = int(os.environ.get("VIDITQ_FUZZ_CASES", "300"))
SEED = int(os.environ.get("VIDITQ_FUZZ_SEED", "20261202"))


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from tests.conftest import ModulatedMLP

    torch.manual_seed(0)
    m = ModulatedMLP().eval()
    args = (torch.randn(2, 16, 64), torch.randn(2, 64))
    qm = vq.quantize(m, args, recipe="w4a8")
    path = tmp_path_factory.mktemp("fuzz") / "art"
    qm.save(path)
    with torch.no_grad():
        ref = qm(*args)
    return path, args, ref


def _flip(data: bytes, rng: random.Random, lo: int = 0, hi: int | None = None) -> bytes:
    b = bytearray(data)
    hi = len(b) if hi is None else hi
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(lo, max(lo + 1, hi))
        b[i] = rng.randrange(256) if rng.random() < 0.5 else b[i] ^ (1 << rng.randrange(8))
    return bytes(b)


_HOSTILE_VALUES = [None, -1, 2**70, 1.5, float("nan"), "", "x" * 300, "__import__('os').system('true')",
                   [], {}, [[[]]], {"as_int": 1}, True, "torch.ops.aten.from_file.default", "L['x']"]


def _replace_random_value(d, rng: random.Random) -> None:
    """Replace one value, found by a random walk from the root, with a hostile one."""
    node = d
    for _ in range(rng.randint(1, 12)):
        keys = list(node) if isinstance(node, dict) else list(range(len(node))) if isinstance(node, list) else []
        if not keys:
            break
        key = rng.choice(keys)
        child = node[key]
        if not isinstance(child, (dict, list)) or not child or rng.random() < 0.2:
            node[key] = rng.choice(_HOSTILE_VALUES)
            return
        node = child


def _mutate(path, rng: random.Random) -> str:
    """Apply one random mutation to the artifact at ``path``; returns its kind."""
    pt2 = path / "program.pt2"
    kind = rng.choices(["pt2_flip", "pt2_truncate", "members", "json_edit", "json_value", "plan_flip",
                        "weights_flip"], weights=[30, 10, 15, 15, 15, 7, 8])[0]
    if kind == "pt2_flip":
        pt2.write_bytes(_flip(pt2.read_bytes(), rng))
    elif kind == "pt2_truncate":
        data = pt2.read_bytes()
        pt2.write_bytes(data[:rng.randrange(len(data))])
    elif kind == "members":
        ms = members(pt2.read_bytes())
        op = rng.choice(["shuffle", "drop", "duplicate_case", "rename"])
        if op == "shuffle":
            rng.shuffle(ms)
        elif op == "drop":
            ms.pop(rng.randrange(len(ms)))
        elif op == "duplicate_case":
            name, data = rng.choice(ms)
            ms.append((name.upper(), data))
        else:
            i = rng.randrange(len(ms))
            ms[i] = (ms[i][0] + "x", ms[i][1])
        pt2.write_bytes(rebuild_zip(ms))
    elif kind == "json_edit":
        ms = members(pt2.read_bytes())
        i = next(j for j, (n, _) in enumerate(ms) if n.endswith(MODEL_JSON))
        ms[i] = (ms[i][0], _flip(ms[i][1], rng))
        pt2.write_bytes(rebuild_zip(ms))
    elif kind == "json_value":
        ms = members(pt2.read_bytes())
        i = next(j for j, (n, _) in enumerate(ms) if n.endswith(MODEL_JSON))
        d = json.loads(ms[i][1])
        _replace_random_value(d, rng)
        ms[i] = (ms[i][0], json.dumps(d).encode())
        pt2.write_bytes(rebuild_zip(ms))
    elif kind == "plan_flip":
        (path / "plan.json").write_bytes(_flip((path / "plan.json").read_bytes(), rng))
    else:
        w = (path / "weights.safetensors").read_bytes()
        # mostly the JSON header (names, dtypes, offsets), sometimes the tensor bytes
        header = 8 + int.from_bytes(w[:8], "little")
        in_header = rng.random() < 0.7
        lo, hi = (0, header) if in_header else (header, len(w))
        (path / "weights.safetensors").write_bytes(_flip(w, rng, lo, hi))
        kind = "weights_header" if in_header else "weights_data"
    if rng.random() < 0.9:
        resum(path)
    return kind


def _digest(path) -> dict:
    return {n: hashlib.sha256((path / n).read_bytes()).hexdigest() for n in sorted(os.listdir(path))}


def test_fuzzed_artifacts_are_refused_cleanly_or_load_exactly(artifact, tmp_path):
    src, args, ref = artifact
    marker = tmp_path / "pwned"
    rng = random.Random(SEED)
    outcomes: dict[str, int] = {}
    for case in range(CASES):
        path = tmp_path / f"case{case}"
        shutil.copytree(src, path)
        kind = _mutate(path, rng)
        before = _digest(path)
        try:
            loaded = vq.load(path)
        except vq.ArtifactError:
            outcome = "refused"
        except Exception as e:  # noqa: BLE001 (the point of the test: nothing else may escape)
            pytest.fail(f"case {case} ({kind}): {type(e).__name__} escaped vq.load: {e}")
        else:
            try:
                with torch.no_grad():
                    out = loaded(*args)
                exact = torch.equal(out, ref)
            except RuntimeError:
                exact = False
            if not exact and kind not in ("json_edit", "json_value", "weights_data"):
                pytest.fail(f"case {case} ({kind}): loaded, but does not reproduce the original outputs")
            outcome = "exact" if exact else "other valid program"
        assert _digest(path) == before, f"case {case} ({kind}): load wrote into the artifact"
        assert not marker.exists()
        outcomes[f"{kind}: {outcome}"] = outcomes.get(f"{kind}: {outcome}", 0) + 1
        shutil.rmtree(path)
    # the fuzz reached both sides of every check
    assert sum(v for k, v in outcomes.items() if k.endswith("refused")) > CASES // 3, outcomes
    assert sum(v for k, v in outcomes.items() if k.endswith("exact")) > 10, outcomes
