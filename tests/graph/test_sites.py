"""Layer names in Dynamo graphs: full module paths of the model, found by weight identity."""

import torch

from viditq_compile.graph.sites import DynamoTensors, ModuleIndex


class _Inner(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(32, 32)

    def forward(self, x):
        return torch.relu(self.linear(x))


class _Model(torch.nn.Module):
    def __init__(self, inner=None):
        super().__init__()
        self.norm_out = inner if inner is not None else _Inner()
        self.proj_out = torch.nn.Linear(32, 32)

    def forward(self, x):
        return self.proj_out(self.norm_out(x))


def _sites_of(module, x):
    """Compile ``module`` with a backend that only records its graph's linear sites."""
    seen = []

    def record(gm, example_inputs, **_):
        tensors = DynamoTensors(gm, example_inputs)
        seen.append((tensors, tensors.linear_sites()))
        return gm.forward

    torch.compile(module, backend=record)(x)
    assert len(seen) == 1
    return seen[0]


def test_a_compiled_sub_module_names_its_layers_by_their_path_in_the_model():
    model = _Model()
    tensors, sites = _sites_of(model.norm_out, torch.randn(2, 32))
    assert [s.name for s in sites] == ["norm_out.linear"]  # the Dynamo source says "linear"
    assert tensors.root is model and tensors.renamed == {"linear": "norm_out.linear"}
    assert not tensors.name_notes
    assert "sub-module `norm_out` of _Model" in tensors.naming()


def test_a_torch_compile_wrapper_is_not_the_root():
    model = _Model()
    wrapped = torch.compile(model)  # holds the model as _orig_mod; never called
    tensors, sites = _sites_of(model.norm_out, torch.randn(2, 32))
    assert [s.name for s in sites] == ["norm_out.linear"] and tensors.root is model
    del wrapped


def test_a_module_in_two_models_keeps_the_graph_name_and_says_why():
    inner = _Inner()
    a, b = _Model(inner), _Model(inner)  # one sub-module, two roots
    tensors, sites = _sites_of(inner, torch.randn(2, 32))
    assert [s.name for s in sites] == ["linear"] and tensors.root is None
    note = tensors.name_notes["linear"]
    assert "2 root modules (_Model)" in note and "the graph's name is kept" in note
    assert "keep the graph's" in tensors.naming()
    del a, b


def test_a_shared_weight_keeps_the_graph_name_and_says_why():
    model = _Model()
    model.proj_out.weight = model.norm_out.linear.weight  # tied
    tensors, sites = _sites_of(model.norm_out, torch.randn(2, 32))
    assert [s.name for s in sites] == ["linear"]
    note = tensors.name_notes["linear"]
    assert "shared by norm_out.linear.weight, proj_out.weight of _Model" in note


def test_garbage_holding_a_model_is_not_taken_for_its_parent():
    model = _Model()
    cycle = torch.nn.Module()
    cycle.model = model
    cycle.me = [cycle]  # unreachable once dropped, until the collector runs
    del cycle
    roots = ModuleIndex.fresh().roots_of(model.proj_out.weight)
    assert list(roots.values()) == [model]


def test_names_stay_the_sources_without_an_index():
    model = _Model()
    seen = []

    def record(gm, example_inputs, **_):
        seen.append([s.name for s in DynamoTensors(gm, example_inputs, index=False).linear_sites()])
        return gm.forward

    torch.compile(model.norm_out, backend=record)(torch.randn(2, 32))
    assert seen == [["linear"]]


def test_a_failed_exports_wrapper_is_not_taken_for_the_parent():
    """torch.export wraps the model it traces (``_export_root``); a failed export's traceback keeps
    the wrapper alive, e.g. inside ``except CaptureError:`` where a user falls back to the backend."""
    import viditq_compile as vq

    class _DataDependent(_Model):
        def forward(self, x):
            return super().forward(x) if x.sum() > 0 else -x

    model = _DataDependent()
    try:
        vq.quantize(model, (torch.randn(2, 32),))
    except vq.CaptureError:
        roots = ModuleIndex.fresh().roots_of(model.proj_out.weight)
        assert list(roots.values()) == [model]
    else:
        raise AssertionError("export of data-dependent control flow should fail")
