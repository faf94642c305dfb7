"""The ``viditq`` torch.compile backend."""

import subprocess
import sys

import pytest
import torch

import viditq_compile as vq
from viditq_compile.backend import last_report
from viditq_compile.numerics.quant import sqnr_db


def test_backend_quantizes_and_agrees_with_the_export_path(mlp_block):
    m, args = mlp_block
    compiled = torch.compile(m, backend="viditq")
    out = compiled(*args)
    rep = last_report()
    assert rep.num_quantized == 2 and rep.num_fp == 1
    assert [r.name for r in rep.rows] == ["fc1", "fc2", "proj_out"]
    qm = vq.quantize(m, args)
    ref = qm(*args)
    assert sqnr_db(ref, out) > 60  # rounding flips only
    assert sqnr_db(m(*args), out) > 35


def test_backend_survives_graph_breaks_and_quantizes_each_subgraph():
    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(32, 64)
            self.b = torch.nn.Linear(64, 32)

        def forward(self, x):
            h = torch.relu(self.a(x))
            torch._dynamo.graph_break()
            return self.b(h)

    m = Broken().eval()
    x = torch.randn(2, 8, 32)
    from viditq_compile.backend import REPORTS

    n0 = len(REPORTS)
    out = torch.compile(m, backend="viditq")(x)
    new = list(REPORTS)[n0:]
    assert len(new) == 2
    assert [r.name for rep in new for r in rep.rows if r.quantized] == ["a", "b"]
    assert sqnr_db(m(x), out) > 35


def test_second_resolution_compiles_dynamically_once(mlp_block):
    m, _ = mlp_block
    calls = []

    def counting(gm, ex, **kw):
        calls.append(1)
        from viditq_compile.backend import viditq_backend

        return viditq_backend(gm, ex, **kw)

    c = torch.compile(m, backend=counting)
    # static, then dynamic tokens, then dynamic batch (Dynamo's automatic dynamic shapes)
    for b, t in [(2, 16), (2, 24), (4, 40)]:
        x, s = torch.randn(b, t, 64), torch.randn(b, 64)
        assert sqnr_db(m(x, s), c(x, s)) > 30
    warm = len(calls)
    assert warm <= 3
    for b, t in [(3, 64), (2, 100), (5, 9), (2, 17)]:
        x, s = torch.randn(b, t, 64), torch.randn(b, 64)
        assert sqnr_db(m(x, s), c(x, s)) > 30
    assert len(calls) == warm, "new resolutions recompiled after warm-up"


def test_backend_options(mlp_block):
    m, args = mlp_block
    torch.compile(m, backend="viditq", options={"recipe": "fp"})(*args)
    assert last_report().num_quantized == 0
    torch._dynamo.reset()
    with pytest.raises(Exception, match="unknown option"):
        torch.compile(m, backend="viditq", options={"recipie": "w8a8"})(*args)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="w9a9"):
        torch.compile(m, backend="viditq", options={"recipe": "w9a9"})(*args)


def test_an_already_quantized_program_is_compiled_as_is(mlp_block):
    m, args = mlp_block
    qm = vq.quantize(m, args, recipe={"weight": {"n_bits": 8}, "act": {"n_bits": 8},
                                      "remain_fp_regex": "fc2|proj_out"})
    eager = qm(*args)
    from viditq_compile.backend import REPORTS

    n0 = len(REPORTS)
    out = qm.compile()(*args)
    # no selection ran on the compiled graph: fc2 stays fp as the recipe said, although the
    # backend's default rules would have quantized it
    assert len(REPORTS) == n0
    assert sqnr_db(eager, out) > 60


def test_backend_runs_under_grad_mode(mlp_block):
    m, args = mlp_block
    with torch.enable_grad():
        out = torch.compile(m, backend="viditq")(*args)
    assert not out.requires_grad


def test_backend_works_after_import_torch_alone(tmp_path):
    code = (
        "import sys, torch\n"
        "m = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))\n"
        "m.eval(); x = torch.randn(2, 8, 32)\n"
        "out = torch.compile(m, backend='viditq')(x)\n"
        "assert 'viditq_compile' in sys.modules\n"
        "from viditq_compile.backend import last_report\n"
        "assert last_report().num_quantized == 2, last_report()\n"
        "print('OK', float(((out - m(x)).norm() / m(x).norm())))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "OK" in r.stdout


class _Block(torch.nn.Module):
    def __init__(self, d=64):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(d, 2 * d), torch.nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def test_blocks_that_share_one_compiled_graph_each_run_their_own_quantized_weights():
    """Regional compilation: Dynamo reuses one graph for every block running the same code, so the
    quantized weights must come from each block's own parameters, not the first block's."""
    blocks = [_Block().eval() for _ in range(3)]  # different seeded weights (autouse seed fixture)
    x = torch.randn(2, 8, 64)
    with torch.no_grad():
        outs = [torch.compile(b, backend="viditq")(x) for b in blocks]
        for b, out in zip(blocks, outs):
            assert sqnr_db(b(x), out) > 30
        # and a weight changed in place after compiling is quantized anew
        blocks[1].fc1.weight.mul_(-1.0)
        again = torch.compile(blocks[1], backend="viditq")(x)
        assert sqnr_db(blocks[1](x), again) > 30


# ----------------------------------------------------------------------------------------------
# Calls that never reach the backend are reported (issue 15)


class _PerSample(torch.nn.Module):
    """Specializes on the batch size (a Python loop over it): every new size recompiles."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(32, 32)

    def forward(self, x):
        return torch.stack([self.fc(x[i]) for i in range(x.shape[0])])


def test_hitting_the_recompile_limit_warns_once_that_calls_run_unquantized(caplog):
    from viditq_compile import backend

    m = _PerSample().eval()
    c = torch.compile(m, backend="viditq")
    n0 = len(backend.RECOMPILE_LIMIT_HITS)
    with torch._dynamo.config.patch(recompile_limit=2), \
            caplog.at_level("WARNING", logger="viditq_compile.backend"):
        outs = {b: c(torch.randn(b, 4, 32)) for b in range(1, 6)}  # 2 graphs, then eager
    hits = list(backend.RECOMPILE_LIMIT_HITS)[n0:]
    assert len(hits) == 1, hits  # once per code object, not once per call
    assert "recompile_limit (2)" in hits[0] and "NOT quantized" in hits[0]
    assert "fail_on_recompile_limit_hit" in hits[0] and "'forward'" in hits[0]
    assert [r for r in caplog.records if r.name == "viditq_compile.backend"
            and "recompile_limit" in r.getMessage()]
    assert len(outs) == 5


def test_many_batch_sizes_stay_quantized_on_a_model_that_allows_dynamic_batch(mlp_block):
    from viditq_compile import backend

    m, _ = mlp_block
    c = torch.compile(m, backend="viditq")
    n0, hits0 = len(backend.REPORTS), len(backend.RECOMPILE_LIMIT_HITS)
    for b in range(1, 11):
        x, s = torch.randn(b, 16, 64), torch.randn(b, 64)
        out = c(x, s)
        with torch.no_grad():
            assert not torch.equal(out, m(x, s)), f"batch {b} ran unquantized"
    assert len(backend.REPORTS) - n0 <= 2  # static, then dynamic batch
    assert len(backend.RECOMPILE_LIMIT_HITS) == hits0


class _Inner(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(32, 32)

    def forward(self, x):
        return torch.relu(self.fc(x))


class _Skipped(_Inner):
    @torch._dynamo.disable
    def forward(self, x):
        return torch.relu(self.fc(x))


class _SkipsABlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.skipped = _Inner(), _Skipped()
        self.proj_out = torch.nn.Linear(32, 32)

    def forward(self, x):
        return self.proj_out(self.skipped(self.first(x)))


def test_coverage_lists_the_linears_of_a_skipped_frame_and_warns_once(caplog):
    from viditq_compile.backend import coverage

    m = _SkipsABlock().eval()
    torch.compile(m, backend="viditq")(torch.randn(2, 8, 32))
    with caplog.at_level("WARNING", logger="viditq_compile.backend"):
        cov = coverage(m)
        again = coverage(m)
    assert cov.missing == ["skipped.fc"] == again.missing
    assert sorted(cov.reached) == ["first.fc", "proj_out"] and cov.graphs == 2  # graph break
    # the graph after the break gets proj_out's weight from Dynamo's stack (its source names it
    # a bare "weight"); the backend names it by identity, so the keep-FP rules see "proj_out"
    assert cov.graph_names == {}
    assert cov.reached["proj_out"].startswith("FP")
    assert "skipped.fc" in str(cov)
    warnings = [r for r in caplog.records if "never reached the backend" in r.getMessage()]
    assert len(warnings) == 1 and "skipped.fc" in warnings[0].getMessage()


def test_coverage_names_the_layers_of_compiled_sub_modules_by_their_full_path():
    """Regional compilation: the graph's layer names are relative to the block (``fc1``); the
    coverage resolves them through the model, for every block running the one graph."""
    from viditq_compile.backend import coverage

    model = torch.nn.Sequential(_Block(), _Block(), torch.nn.Linear(64, 64)).eval()
    for block in model[:2]:
        block.compile(backend="viditq")
    with torch.no_grad():
        model(torch.randn(2, 8, 64))
    cov = coverage(model, warn=False)
    assert sorted(cov.reached) == ["0.fc1", "0.fc2", "1.fc1", "1.fc2"]
    assert set(cov.reached.values()) == {"quantized"}
    assert cov.missing == ["2"] and cov.graphs == 1
    # each block's layers are named by their full paths, also for the block that runs the
    # graph compiled for the first one
    assert cov.graph_names == {}


# ----------------------------------------------------------------------------------------------
# vq.compile, and full module paths when Dynamo compiles nested modules on their own


def test_vq_compile_warns_once_about_the_linears_of_a_skipped_frame(caplog):
    m = _SkipsABlock().eval()
    c = vq.compile(m)
    x = torch.randn(2, 8, 32)
    with caplog.at_level("WARNING", logger="viditq_compile.backend"):
        out = c(x)
        c(x)
    warnings = [r.getMessage() for r in caplog.records if "never reached the backend" in r.getMessage()]
    assert len(warnings) == 1 and "skipped.fc" in warnings[0] and "_SkipsABlock" in warnings[0]
    assert c.coverage.missing == ["skipped.fc"]
    assert c.coverage.reached["first.fc"] == "quantized"
    assert {r.name for g in c.report.graphs for r in g.rows} == {"first.fc", "proj_out"}
    assert c.report.graph_breaks  # the skipped call broke the graph, and Dynamo said why
    assert sqnr_db(m(x), out) > 30


def test_vq_compile_refuses_bad_arguments_by_name(mlp_block):
    m, _ = mlp_block
    with pytest.raises(TypeError, match="got Tensor"):
        vq.compile(torch.zeros(1))
    with pytest.raises(TypeError, match="backend='inductor'"):
        vq.compile(m, backend="inductor")
    with pytest.raises(TypeError, match="options="):
        vq.compile(m, options={"recipe": "fp"})
    with pytest.raises(TypeError, match=r"\['fulgraph'\]"):
        vq.compile(m, fulgraph=True)
    with pytest.raises(Exception, match="w9a9"):
        vq.compile(m, recipe="w9a9")
    with pytest.raises(TypeError, match="must be a Plan, got dict"):
        vq.compile(m, plan={"fc1": 8})
    with pytest.raises(TypeError, match="already compiled"):
        vq.compile(torch.compile(m))


_D = 32


class _Attn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q, self.to_k, self.to_out = (torch.nn.Linear(_D, _D) for _ in range(3))

    def forward(self, x):
        a = torch.softmax(self.to_q(x) @ self.to_k(x).transpose(-1, -2) / _D ** 0.5, -1)
        return self.to_out(a @ x)


class _DiTBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = _Attn()
        self.fc1, self.fc2 = torch.nn.Linear(_D, 2 * _D), torch.nn.Linear(2 * _D, _D)

    def forward(self, x):
        x = x + self.attn(x)
        torch._dynamo.graph_break()  # inside the model's loop over blocks: Dynamo skips its forward
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class _Modulation(torch.nn.Module):
    def __init__(self, out):
        super().__init__()
        self.linear = torch.nn.Linear(_D, out)

    def forward(self, x):
        return self.linear(torch.nn.functional.layer_norm(x, (_D,)))


class _BrokenDiT(torch.nn.Module):
    """Mochi-like: a graph break in each block makes Dynamo skip the model's forward and compile
    the blocks, ``norm_out`` and ``final_layer`` as frames of their own (relative sources)."""

    def __init__(self):
        super().__init__()
        self.x_embedder = torch.nn.Linear(16, _D)
        self.blocks = torch.nn.ModuleList([_DiTBlock(), _DiTBlock()])
        self.norm_out, self.final_layer = _Modulation(_D), _Modulation(16)

    def forward(self, x):
        h = self.x_embedder(x)
        for block in self.blocks:
            h = block(h)
        return self.final_layer(self.norm_out(h))


def test_nested_frames_name_layers_by_full_path_and_a_whole_model_plan_applies(caplog):
    m = _BrokenDiT().eval()
    x = torch.randn(2, 8, 16)
    recipe = vq.Recipe.resolve("w8a8").with_(keep_fp_from_graph=False)  # names alone decide
    with caplog.at_level("INFO", logger="viditq_compile.backend"):
        c = vq.compile(m, recipe=recipe)
        c(x)
    rows = {r.name: r for g in c.report.graphs for r in g.rows}
    assert sorted(rows) == sorted(["blocks.0.attn.to_q", "blocks.0.attn.to_k", "blocks.0.attn.to_out",
                                   "blocks.0.fc1", "blocks.0.fc2", "blocks.1.attn.to_q",
                                   "blocks.1.attn.to_k", "blocks.1.attn.to_out",
                                   "norm_out.linear", "final_layer.linear"])
    # the default keep-FP names need the full path ("linear" matches none of them)
    assert not rows["norm_out.linear"].quantized and not rows["final_layer.linear"].quantized
    assert rows["blocks.0.attn.to_q"].quantized
    # blocks.1 runs the graph compiled for blocks.0's MLP (no report of its own): quantized, by name
    assert c.coverage.reached["blocks.1.fc1"] == "quantized"
    assert c.coverage.graph_names == {}  # the graphs' names are the model's
    assert c.coverage.missing == ["x_embedder"]  # only in the skipped forward
    titles = [g.title for g in c.report.graphs]
    assert any("compiles sub-module `norm_out` of _BrokenDiT: names are full paths" in t for t in titles)
    assert any("sub-module `norm_out` of _BrokenDiT" in r.getMessage() for r in caplog.records)

    qm = vq.quantize(m, (x,), recipe=recipe)
    torch._dynamo.reset()
    planned = vq.compile(m, plan=qm.plan)
    out = planned(x)  # no "plan names layer ..., which the model does not have"
    applied = {r.name: r.quantized for g in planned.report.graphs for r in g.rows}
    assert applied == {name: qm.plan.layers[name].quantized for name in applied}
    assert sqnr_db(qm(x), out) > 40


def test_a_sub_module_of_two_models_is_compiled_with_its_graph_names_and_the_reason(caplog):
    inner = _Modulation(_D)
    a, b = torch.nn.Sequential(inner), torch.nn.Sequential(inner)
    with caplog.at_level("WARNING", logger="viditq_compile.backend"):
        torch.compile(inner, backend="viditq")(torch.randn(2, 8, _D))
    rep = last_report()
    assert [r.name for r in rep.rows] == ["linear"]
    assert "2 root modules (Sequential)" in rep.title and "graph's name is kept" in rep.title
    assert any("2 root modules" in r.getMessage() for r in caplog.records)
    del a, b
