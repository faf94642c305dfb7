"""Head maps: which channel of an out projection's input and of its value projection's output is
position i of head h, read from the graph whatever layout the model spells."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from viditq_compile.graph.capture import capture
from viditq_compile.graph.head_layout import HeadLayoutError, reads_attention, value_head_map
from viditq_compile.graph.sites import ExportedTensors

H, D, N = 4, 8, 6


class Attention(nn.Module):
    """Self-attention with the heads laid out as ``layout`` says: ``"major"`` (diffusers:
    ``view(B, N, H, D).transpose(1, 2)``) or ``"minor"`` (einops ``b n (d h) -> b h n d``), separately
    for the value and the output side; ``value_op`` / ``out_op`` put an op on the value / output path."""

    def __init__(self, value_layout="major", out_layout="major", value_op=None, out_op=None):
        super().__init__()
        self.to_q, self.to_k, self.to_v = (nn.Linear(H * D, H * D) for _ in range(3))
        self.to_out = nn.Linear(H * D, H * D)
        self.value_layout, self.out_layout, self.value_op, self.out_op = value_layout, out_layout, value_op, out_op

    @staticmethod
    def heads(t, layout):
        b, n, _ = t.shape
        if layout == "major":
            return t.view(b, n, H, D).transpose(1, 2)
        return t.view(b, n, D, H).permute(0, 3, 1, 2)

    def forward(self, x):
        q, k = self.heads(self.to_q(x), "major"), self.heads(self.to_k(x), "major")
        v = self.to_v(x)
        if self.value_op == "scale":
            v = v * 2.0
        v = self.heads(v, self.value_layout)
        o = F.scaled_dot_product_attention(q, k, v)
        b = o.shape[0]
        o = o.transpose(1, 2).reshape(b, N, H * D) if self.out_layout == "major" else \
            o.permute(0, 2, 3, 1).reshape(b, N, D * H)
        y = self.to_out(o)
        return y + o if self.out_op == "residual" else y


def _sites(model):
    x = torch.randn(2, N, H * D)
    return ExportedTensors(capture(model.eval(), (x,), {})).linear_sites()


def _map(model):
    sites = _sites(model)
    out = next(s for s in sites if s.name == "to_out")
    return value_head_map(out, sites)


def test_diffusers_layout_maps_head_h_to_channels_h_times_d_on_both_sides():
    m = _map(Attention())
    assert (m.out, m.value, m.heads, m.head_dim) == ("to_out", "to_v", H, D)
    want = torch.arange(H * D).view(H, D)
    assert torch.equal(m.out_channels, want) and torch.equal(m.value_channels, want)


def test_einops_head_minor_layout_is_read_as_such():
    m = _map(Attention(value_layout="minor", out_layout="minor"))
    want = torch.arange(D)[None, :] * H + torch.arange(H)[:, None]  # channel d * H + h
    assert torch.equal(m.out_channels, want) and torch.equal(m.value_channels, want)


def test_value_and_output_sides_may_differ():
    m = _map(Attention(value_layout="minor", out_layout="major"))
    assert torch.equal(m.out_channels, torch.arange(H * D).view(H, D))
    assert torch.equal(m.value_channels, torch.arange(D)[None, :] * H + torch.arange(H)[:, None])


def test_a_value_through_an_elementwise_op_is_refused_naming_it():
    with pytest.raises(HeadLayoutError, match="not reached through layout ops alone.*mul"):
        _map(Attention(value_op="scale"))


def test_an_attention_output_also_read_elsewhere_is_refused():
    model = Attention(out_op="residual")
    sites = _sites(model)
    out = next(s for s in sites if s.name == "to_out")
    assert reads_attention(out)
    with pytest.raises(HeadLayoutError, match="read by 2 ops"):
        value_head_map(out, sites)


def test_layers_that_read_no_attention_are_no_out_projections():
    sites = _sites(Attention())
    assert [s.name for s in sites if reads_attention(s)] == ["to_out"]
