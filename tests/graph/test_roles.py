"""Layer roles from the graph: exact roles on every zoo model, the graph over the names, the
fallbacks and their recorded reasons, overrides and errors."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests import zoo
from viditq_compile.graph.capture import capture
from viditq_compile.graph.roles import ROLES, layer_roles, layer_roles_with_reasons
from viditq_compile.graph.sites import DynamoTensors, ExportedTensors


def _graph_and_sites(model, kwargs):
    ep = capture(model, (), kwargs, dynamic=False)
    return ep.graph_module, ExportedTensors(ep).linear_sites()


def _decide(model, kwargs, *, dynamic=False, **kw):
    ep = capture(model, (), kwargs, dynamic=dynamic)
    return layer_roles_with_reasons(ep.graph_module, ExportedTensors(ep).linear_sites(), **kw)


@pytest.fixture(scope="module")
def zoo_graph():
    """name -> (graph, sites) of the static program; each model captured once for the module."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = _graph_and_sites(*zoo.ALL_BUILDERS[name]())
        return cache[name]

    return get


@pytest.fixture(scope="module")
def zoo_roles(zoo_graph):
    return lambda name: layer_roles_with_reasons(*zoo_graph(name))


def _expected(model: str, layer: str) -> str:
    """The roles the ViDiT-Q paper assigns, written out per model class."""
    if re.search(r"\.(ff|ff_context|mlp)\.|proj_mlp$", layer):
        return "mlp"
    if re.search(r"\.(attn2|cross_attn)\.", layer):
        return "cross_attn"
    if layer.startswith("temporal_"):
        return "temporal_attn"
    return "self_attn"  # attn1, Flux joint attn (txt projections included), single proj_out


@pytest.mark.parametrize("model", list(zoo.ALL_BUILDERS))
def test_zoo_roles_are_exact_and_come_from_the_graph(zoo_roles, model):
    decisions = zoo_roles(model)
    assert set(decisions) == set(zoo.QUANTIZE[model]) | set(zoo.KEEP_FP[model])
    got = {name: decisions[name].role for name in zoo.QUANTIZE[model]}
    assert got == {name: _expected(model, name) for name in zoo.QUANTIZE[model]}
    assert {name: decisions[name].role for name in zoo.KEEP_FP[model]} == dict.fromkeys(zoo.KEEP_FP[model], "other")
    assert {d.source for d in decisions.values()} == {"graph"}


def test_reasons_name_the_fact_that_decided(zoo_roles):
    d = zoo_roles("pixart")
    assert "come from encoder_hidden_states, not from the latent 'hidden_states'" in \
        d["transformer_blocks.0.attn2.to_k"].reason
    assert d["caption_projection.linear_1"].reason.endswith("(only on encoder_hidden_states)")
    assert "final projection" in d["proj_out"].reason
    d = zoo_roles("latte")
    assert "over 4 tokens = the latent's frame count" in d["temporal_transformer_blocks.0.attn1.to_q"].reason
    assert "over 16 tokens, not the 4 frames" in d["transformer_blocks.0.attn1.to_q"].reason
    d = zoo_roles("stdit3")
    assert d["spatial_blocks.0.attn.qkv"].reason.startswith("q/k/v of attention")
    assert d["temporal_blocks.0.cross_attn.kv_linear"].reason.startswith("k/v of attention")


def test_symbolic_sizes_give_the_same_roles(zoo_roles):
    """With dynamic dims the frame count and the query lengths are symbols (temporal: s_T,
    spatial: s_S, cross: s_T*s_S), and the reshapes of k/v read the latent's batch size, which
    must not make the caption side depend on the latent. (Latte agrees too, checked by hand: its
    dynamic export takes 20 s here.)"""
    dynamic = _decide(*zoo.ALL_BUILDERS["stdit3"](), dynamic=True)
    assert {n: d.role for n, d in dynamic.items()} == {n: d.role for n, d in zoo_roles("stdit3").items()}
    assert "attends over s" in dynamic["temporal_blocks.0.attn.qkv"].reason  # compared as symbols


# ----------------------------------------------------------------------------------------------
class _Opaque(nn.Module):
    """A DiT block whose module names say nothing or lie: `attn2` is self-attention, `mlp` is
    cross-attention (written by hand: softmax between two matmuls), `cross` is the feed-forward."""

    def __init__(self, d=32, heads=2):
        super().__init__()
        self.heads = heads
        self.u = nn.Linear(8, d)
        self.attn2 = nn.ModuleDict({"a": nn.Linear(d, 3 * d), "b": nn.Linear(d, d)})
        self.mlp = nn.ModuleDict({"c": nn.Linear(d, d), "e": nn.Linear(16, 2 * d), "f": nn.Linear(d, d)})
        self.cross = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.z = nn.Linear(d, 8)

    def _split(self, t):
        b, n, c = t.shape
        return t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, z, context):
        x = self.u(z)
        b, n, c = x.shape
        q, k, v = self.attn2["a"](x).chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(self._split(q), self._split(k), self._split(v))
        x = x + self.attn2["b"](h.transpose(1, 2).reshape(b, n, c))
        q = self._split(self.mlp["c"](x))
        k, v = (self._split(t) for t in self.mlp["e"](context).chunk(2, dim=-1))
        p = torch.softmax(q @ k.transpose(-1, -2) / (c // self.heads) ** 0.5, dim=-1)
        x = x + self.mlp["f"]((p @ v).transpose(1, 2).reshape(b, n, c))
        x = x + self.cross(x)
        return self.z(x)


_OPAQUE_ROLES = {"u": "other", "attn2.a": "self_attn", "attn2.b": "self_attn", "mlp.c": "cross_attn",
                 "mlp.e": "cross_attn", "mlp.f": "cross_attn", "cross.0": "mlp", "cross.2": "mlp", "z": "other"}


def _opaque():
    return _Opaque().eval(), {"z": torch.randn(2, 12, 8), "context": torch.randn(2, 5, 16)}


def test_the_graph_decides_where_names_say_nothing_or_lie():
    decisions = _decide(*_opaque())
    assert {n: d.role for n, d in decisions.items()} == _OPAQUE_ROLES
    assert {d.source for d in decisions.values()} == {"graph"}
    assert "keys/values of " in decisions["mlp.e"].reason and "from context" in decisions["mlp.e"].reason


def test_a_dynamo_graph_gives_the_same_roles():
    """What a ``torch.compile`` backend receives: torch-level ops, lifted parameters."""
    model, kwargs = _opaque()
    seen = {}

    def backend(gm, example_inputs):
        seen["roles"] = layer_roles(gm, DynamoTensors(gm, example_inputs).linear_sites())
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(**kwargs)
    assert seen["roles"] == _OPAQUE_ROLES


def test_latent_input_picks_the_latent_when_it_is_not_first():
    class ContextFirst(_Opaque):
        def forward(self, context, noisy):
            return super().forward(noisy, context)

    model, kwargs = ContextFirst().eval(), {"context": torch.randn(2, 5, 16), "noisy": torch.randn(2, 12, 8)}
    ep = capture(model, (), kwargs, dynamic=False)
    sites = ExportedTensors(ep).linear_sites()
    # the first tensor input is taken for the latent: the caption side is then "self-attention"
    assert layer_roles(ep.graph_module, sites)["mlp.c"] != "cross_attn"
    assert layer_roles(ep.graph_module, sites, latent_input="noisy") == _OPAQUE_ROLES
    with pytest.raises(ValueError, match=r"latent_input 'latent'.*\['context', 'noisy'\]"):
        layer_roles(ep.graph_module, sites, latent_input="latent")


class _Video(nn.Module):
    """Latte-like factorized attention on a [B, C, F, H, W] latent: over H*W tokens per frame,
    then over F frames per position; the attention modules are called `spatial` and `temp`."""

    def __init__(self, c=4, d=32):
        super().__init__()
        self.embed = nn.Linear(c, d)
        self.spatial = nn.ModuleDict({"qkv": nn.Linear(d, 3 * d), "out": nn.Linear(d, d)})
        self.temp = nn.ModuleDict({"qkv": nn.Linear(d, 3 * d), "out": nn.Linear(d, d)})
        self.proj = nn.Linear(d, c)

    @staticmethod
    def _attend(layer, x):
        q, k, v = layer["qkv"](x).unsqueeze(1).chunk(3, dim=-1)
        return x + layer["out"](F.scaled_dot_product_attention(q, k, v).squeeze(1))

    def forward(self, sample):
        b, c, f, h, w = sample.shape
        x = self.embed(sample.permute(0, 2, 3, 4, 1).reshape(b * f, h * w, c))
        x = self._attend(self.spatial, x)
        d = x.shape[-1]
        x = x.reshape(b, f, h * w, d).transpose(1, 2).reshape(b * h * w, f, d)
        x = self._attend(self.temp, x)
        x = x.reshape(b, h * w, f, d).transpose(1, 2)
        return self.proj(x).reshape(b, f, h, w, c).permute(0, 4, 1, 2, 3)


def test_frame_count_equal_to_tokens_per_frame_leaves_time_or_space_to_the_names():
    model = _Video().eval()
    distinct = _decide(model, {"sample": torch.randn(2, 4, 3, 2, 4)})  # 3 frames, 8 tokens a frame
    assert {n: (d.role, d.source) for n, d in distinct.items() if ".qkv" in n} == {
        "spatial.qkv": ("self_attn", "graph"), "temp.qkv": ("temporal_attn", "graph")}
    same = _decide(model, {"sample": torch.randn(2, 4, 4, 2, 2)})  # 4 frames, 4 tokens a frame
    assert {n: (d.role, d.source) for n, d in same.items() if ".qkv" in n} == {
        "spatial.qkv": ("self_attn", "name"), "temp.qkv": ("temporal_attn", "name")}
    assert "sizes cannot tell time from space" in same["temp.qkv"].reason
    assert (same["embed"].role, same["embed"].source) == ("other", "graph")
    # frame_axis replaces the [B, C, F, H, W] guess: naming the channel axis (4 channels, 3
    # frames) leaves no attention over frames
    gm, sites = _graph_and_sites(model, {"sample": torch.randn(2, 4, 3, 2, 4)})
    assert layer_roles(gm, sites, frame_axis=1)["temp.qkv"] == "self_attn"
    with pytest.raises(ValueError, match=r"frame_axis 5 is out of range for the latent 'sample'"):
        layer_roles(gm, sites, frame_axis=5)


def test_without_an_attention_in_the_graph_the_names_decide():
    class SigmoidAttention(nn.Module):  # no softmax, no SDPA: nothing the graph calls attention
        def __init__(self, d=16):
            super().__init__()
            self.attn = nn.ModuleDict({"to_q": nn.Linear(d, d), "to_k": nn.Linear(d, d), "to_v": nn.Linear(d, d)})
            self.temporal_attn = nn.ModuleDict({"to_q": nn.Linear(d, d)})
            self.ff = nn.ModuleDict({"fc1": nn.Linear(d, d)})
            self.head = nn.Linear(d, d)

        def forward(self, x):
            a = torch.sigmoid(self.attn["to_q"](x) @ self.attn["to_k"](x).transpose(-1, -2))
            x = x + a @ self.attn["to_v"](x) + self.temporal_attn["to_q"](x)
            return self.head(self.ff["fc1"](x))

    decisions = _decide(SigmoidAttention().eval(), {"x": torch.randn(2, 6, 16)})
    assert {n: (d.role, d.source) for n, d in decisions.items()} == {
        "attn.to_q": ("self_attn", "name"), "attn.to_k": ("self_attn", "name"),
        "attn.to_v": ("self_attn", "name"), "temporal_attn.to_q": ("temporal_attn", "name"),
        "ff.fc1": ("mlp", "name"), "head": ("other", "name")}
    assert decisions["ff.fc1"].reason == "no attention found in the graph; name has 'ff'"


# ----------------------------------------------------------------------------------------------
def test_overrides_come_last_and_the_first_matching_regex_wins(zoo_graph, zoo_roles):
    gm, sites = zoo_graph("pixart")
    overrides = {r"attn2\.to_out": "mlp", r"attn2": "self_attn", r"^proj_out$": "mlp"}
    decisions = layer_roles_with_reasons(gm, sites, overrides=overrides)
    graph = zoo_roles("pixart")
    for name, d in decisions.items():
        if re.search(r"attn2\.to_out", name):
            assert (d.role, d.source, d.reason) == ("mlp", "override", r"matches 'attn2\\.to_out'")
        elif "attn2" in name:
            assert (d.role, d.source) == ("self_attn", "override")
        elif name == "proj_out":
            assert (d.role, d.source) == ("mlp", "override")
        else:
            assert d == graph[name]
    assert layer_roles(gm, sites, overrides={}) == {n: d.role for n, d in graph.items()}


@pytest.mark.parametrize("overrides, message", [
    ({r"attn2": "cross"}, r"override 'attn2': unknown role 'cross'; roles are cross_attn, self_attn"),
    ({r"attn(": "mlp"}, r"override regex 'attn\(' is not a valid regular expression"),
    ({"": "mlp"}, r"override regex '' for role 'mlp' must be a non-empty string"),
    ({r"^(([\w.])+)+!$": "mlp"},
     r"override regex for role 'mlp': regex '\^\(\(\[\\\\w\.\]\)\+\)\+!\$' refused: .*nested"),
    ({"x" * 1001: "mlp"}, r"override regex for role 'mlp': .*1001 characters"),
])
def test_bad_overrides_are_refused_by_name(zoo_graph, overrides, message):
    gm, sites = zoo_graph("dit")
    with pytest.raises(ValueError, match=message):
        layer_roles(gm, sites, overrides=overrides)


def test_every_role_is_a_known_one(zoo_roles):
    assert {d.role for m in zoo.ALL_BUILDERS for d in zoo_roles(m).values()} == set(ROLES)


def test_a_catastrophic_override_regex_is_refused_before_any_layer_is_matched(zoo_graph):
    import time

    gm, sites = zoo_graph("dit")
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="nested quantifiers"):
        layer_roles(gm, sites, overrides={"attn": "mlp", r"^(([\w.])+)+!$": "self_attn"})
    assert time.perf_counter() - t0 < 0.5
