"""Quantized attention as a method: its eager reference, for scoring attentions on the eager model.

``passes.quantize_attention`` rewrites a captured graph's SDPA calls into ``viditq.attention``;
``EagerAttention`` does the same to an eager model for the attentions it names: while one of those
modules runs, each ``torch.nn.functional.scaled_dot_product_attention`` call it makes computes
``numerics.attention.attention_ref`` (the reference the op is tested against, bit-exact with its
CPU implementation) instead. Calls the pass would refuse (mask, causal, dropout, GQA) run as SDPA
and are counted in ``refused``. ``tests/passes/test_quantize_attention.py`` holds it to the
program the pass builds. The mixed-precision search does not score attentions yet.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from viditq_compile.numerics import attention as attn

NAME = "attention"


class EagerAttention(TorchFunctionMode):
    """``with EagerAttention(model, names, block=128): model(...)``: the attentions of the modules
    ``names`` (module paths, e.g. ``transformer_blocks.0.attn1``) run quantized (module docstring).
    ``calls`` / ``refused``: SDPA calls made inside them that were quantized / left as they are.
    An unknown name raises ``KeyError``."""

    def __init__(self, model: nn.Module, names: Iterable[str], block: int = attn.DEFAULT_BLOCK):
        super().__init__()
        modules = dict(model.named_modules())
        self.names = list(names)
        missing = [n for n in self.names if n not in modules]
        if missing:
            raise KeyError(f"EagerAttention: no module {missing[0]!r} in the model")
        self.modules = [modules[n] for n in self.names]
        self.block = block
        self.calls = 0
        self.refused = 0
        self._depth = 0
        self._handles: list = []

    def _enter(self, *_):
        self._depth += 1

    def _exit(self, *_):
        self._depth -= 1

    def __enter__(self):
        for m in self.modules:
            self._handles.append(m.register_forward_pre_hook(self._enter))
            self._handles.append(m.register_forward_hook(self._exit, always_call=True))
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._depth > 0 and func is F.scaled_dot_product_attention:
            names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
            a = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False,
                 **dict(zip(names, args)), **kwargs}
            q, k, v = a["query"], a["key"], a["value"]
            if a["attn_mask"] is None and not a["is_causal"] and a["dropout_p"] == 0 and not a["enable_gqa"] \
                    and q.dim() >= 3 and q.shape[:-2] == k.shape[:-2] == v.shape[:-2] \
                    and q.dtype == k.dtype == v.dtype and q.dtype in attn.FLOAT_DTYPES:
                self.calls += 1
                scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(q.shape[-1])
                return attn.attention_ref(q, k, v, scale, block_q=self.block, block_k=self.block)
            self.refused += 1
        return func(*args, **kwargs)
