"""Sequence (context) parallelism: the image tokens split over ranks, attention the only exchange.

Per-token activation scales make every quantized linear token-local (``numerics.quant``: one
scale per row), so a rank that holds a slice of the tokens computes exactly what one process
computes for them; only attention over the tokens communicates. Two routes:

- The module route (``enable_context_parallel``): diffusers' own context parallelism
  (``ModelMixin.enable_parallelism`` with a ``ContextParallelConfig``: Ulysses all-to-all or ring
  attention) on a diffusers transformer, float or quantized in module form
  (``module_form.quantize_modules``), then ``torch.compile(model, backend="viditq")`` as usual.
  diffusers 0.42.1 ships a ``_cp_plan`` for some families; for PixArt, DiT and Latte it has none,
  and their ``Attention`` modules run ``AttnProcessor2_0``, which calls SDPA directly and would
  attend over the local tokens only. For those this module supplies the plan (``CP_PLANS``) and a
  processor that goes through diffusers' attention dispatcher (``ContextParallelAttnProcessor``).
- The artifact route (``sequence_parallel``): a loaded ``QuantizedModel``'s program rewritten by
  an FX pass (``parallel.ulysses``) so that each rank runs its slice of the tokens.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

__all__ = ["CP_PLANS", "ContextParallelAttnProcessor", "FamilyPlan", "enable_context_parallel",
           "sequence_parallel"]


class ContextParallelAttnProcessor:
    """``AttnProcessor2_0`` (diffusers ``Attention``) through diffusers' ``dispatch_attention_fn``,
    so that context parallelism (``_parallel_config``, set by ``enable_parallelism``) reaches it.

    Self-attention runs the parallel attention (Ulysses all-to-all or ring); cross-attention (an
    ``encoder_hidden_states`` argument: the text, replicated on every rank) and a processor made
    with ``local=True`` (Latte's temporal attention: every rank holds whole frame sequences) run
    locally on this rank's query tokens, which is exact. A self-attention mask under context
    parallelism is refused (its key axis is the sharded one). Tensors: hidden_states [B, S, C]
    (or [B, C, H, W]); q/k/v [B, S, heads, head_dim] to the dispatcher.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, local: bool = False):
        self.local = bool(local)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        cross = encoder_hidden_states is not None
        parallel = None if (cross or self.local) else self._parallel_config
        if parallel is not None and attention_mask is not None:
            raise ValueError("context parallel self-attention with an attention_mask: the mask's key "
                             "axis is the sharded token axis; call without a self-attention mask")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (hidden_states if encoder_hidden_states is None
                                          else encoder_hidden_states).shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if not cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch_size, -1, attn.heads, head_dim) for t in (query, key, value))
        if attn.norm_q is not None:  # AttnProcessor2_0 normalizes [B, heads, S, D]: the last dim, the same
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                              is_causal=False, backend=self._attention_backend,
                                              parallel_config=parallel)
        hidden_states = hidden_states.reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@dataclass(frozen=True)
class FamilyPlan:
    """How one model class runs context parallel: ``plan()`` builds the diffusers cp plan (module
    path -> ``ContextParallelInput`` / ``ContextParallelOutput``); ``local`` lists module-path
    prefixes whose attention needs no exchange; ``check`` refuses calls the plan cannot split
    (called with the forward's kwargs, raises ``ValueError``); ``note`` says what it assumes."""

    plan: Callable[[], dict]
    local: tuple[str, ...] = ()
    check: Callable[[dict], None] | None = None
    note: str = ""


def _tokens_plan(gather_at: str) -> dict:
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    # split the patch embedding's [B, N, C] output over the tokens, gather the final projection's
    return {"pos_embed": {0: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)},
            gather_at: ContextParallelOutput(gather_dim=1, expected_dims=3)}


def _latte_plan() -> dict:
    from diffusers.models._modeling_parallel import ContextParallelInput

    # the temporal blocks see [B * N, F, C] rows (spatial tokens in the batch axis, split) and a
    # timestep table of B * N rows built from the full token count: split it the same way, which
    # is exact when every row of the batch has the same timestep (_latte_check)
    return {**_tokens_plan("proj_out"),
            "temporal_transformer_blocks.*": {"timestep": ContextParallelInput(split_dim=0, expected_dims=2)}}


def _latte_check(kwargs: dict) -> None:
    t = kwargs.get("timestep")
    if isinstance(t, torch.Tensor) and t.numel() > 1 and not bool((t == t.reshape(-1)[0]).all()):
        raise ValueError("Latte under context parallelism: the batch's timesteps differ; the temporal "
                         "blocks' timestep rows ([B * N], batch-major) are split as one block per rank, "
                         "which is exact only for one timestep per batch (as pipelines call it)")


CP_PLANS: dict[str, FamilyPlan] = {
    "PixArtTransformer2DModel": FamilyPlan(lambda: _tokens_plan("proj_out"),
                                           note="tokens split after pos_embed, gathered after proj_out"),
    "DiTTransformer2DModel": FamilyPlan(lambda: _tokens_plan("proj_out_2"),
                                        note="tokens split after pos_embed, gathered after proj_out_2"),
    "LatteTransformer3DModel": FamilyPlan(
        _latte_plan, local=("temporal_transformer_blocks",), check=_latte_check,
        note="spatial tokens of every frame split after pos_embed (temporal attention then runs over "
             "whole frame sequences, locally); one timestep per batch"),
}
"""Context-parallel plans for the diffusers classes that have no ``_cp_plan`` in diffusers 0.42.1,
by class name (checked: PixArt, DiT and Latte have none)."""


@contextlib.contextmanager
def _one_device_on_cpu() -> Iterator[bool]:
    """diffusers 0.42.1 ``ModelMixin._resolve_parallel_config`` places rank r on device
    ``r % torch.accelerator.device_count()``, a ``ZeroDivisionError`` where no accelerator exists.
    With none, ``torch.accelerator.device_count`` reads 1 inside this block (the device is then
    ``cpu:0``, which is every rank's CPU) and is restored on leaving; with one, nothing changes.
    Yields whether it patched."""
    original = torch.accelerator.device_count
    if original() > 0:
        yield False
        return
    torch.accelerator.device_count = lambda: 1  # type: ignore[assignment]
    try:
        yield True
    finally:
        torch.accelerator.device_count = original  # type: ignore[assignment]


def _config(mesh_or_config):
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    if isinstance(mesh_or_config, ContextParallelConfig):
        return mesh_or_config
    if isinstance(mesh_or_config, int) and not isinstance(mesh_or_config, bool):
        return ContextParallelConfig(ulysses_degree=mesh_or_config)
    if isinstance(mesh_or_config, DeviceMesh):
        if mesh_or_config.mesh_dim_names == ("ring", "ulysses"):
            ring, ulysses = mesh_or_config.shape
            return ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses, mesh=mesh_or_config)
        if mesh_or_config.ndim != 1:
            raise ValueError(f"enable_context_parallel: a device mesh must be 1-D (Ulysses over it) or "
                             f"named ('ring', 'ulysses'); got dims {mesh_or_config.mesh_dim_names}")
        mesh = init_device_mesh(mesh_or_config.device_type, (1, mesh_or_config.size()),
                                mesh_dim_names=("ring", "ulysses"))
        return ContextParallelConfig(ulysses_degree=mesh_or_config.size(), mesh=mesh)
    raise TypeError(f"enable_context_parallel: mesh_or_config must be a diffusers ContextParallelConfig, "
                    f"a DeviceMesh or an int Ulysses degree, got {type(mesh_or_config).__name__}")


def enable_context_parallel(model: torch.nn.Module, mesh_or_config) -> str:
    """Make a diffusers transformer context parallel (before ``torch.compile``); returns where its
    plan came from: ``"diffusers"`` (the class's ``_cp_plan``) or ``"viditq_compile"`` (``CP_PLANS``).

    model: a diffusers ``ModelMixin``, float or quantized in module form. mesh_or_config: a
    ``ContextParallelConfig`` (``ulysses_degree=N`` or ``ring_degree=N``), an int (Ulysses degree),
    a 1-D ``DeviceMesh`` (Ulysses over it) or one named ("ring", "ulysses").
    For a class in ``CP_PLANS``, every ``Attention`` module's processor (plain ``AttnProcessor`` /
    ``AttnProcessor2_0`` only; others are refused, naming the module) becomes a
    ``ContextParallelAttnProcessor``; heads must divide by the Ulysses degree; then
    ``model.enable_parallelism(config=..., cp_plan=...)``. Ring attention needs a backend that
    returns the log-sum-exp (``model.set_attention_backend(...)`` first); the native one does not.

    Patch, stated: on a machine with no accelerator, ``torch.accelerator.device_count`` is replaced
    by ``lambda: 1`` for the duration of the ``enable_parallelism`` call and restored after it
    (``_one_device_on_cpu``); with an accelerator nothing is patched. Nothing else is.
    """
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
    from diffusers.models.modeling_utils import ModelMixin

    if not isinstance(model, ModelMixin):
        raise TypeError(f"enable_context_parallel takes a diffusers ModelMixin, got {type(model).__name__}; "
                        f"for a QuantizedModel use sequence_parallel(qm, mesh)")
    config = _config(mesh_or_config)
    if config.ring_degree > 1 and torch.accelerator.device_count() == 0:
        raise ValueError("enable_context_parallel: ring attention needs an attention backend that returns "
                         "the log-sum-exp; diffusers 0.42.1 has none on CPU (native refuses return_lse, "
                         "_native_flash is CUDA only); use ulysses_degree on CPU")
    name = type(model).__name__
    family = None
    if getattr(model, "_cp_plan", None) is None:
        family = CP_PLANS.get(name)
        if family is None:
            raise ValueError(f"{name} has no _cp_plan in diffusers and none in viditq_compile.parallel."
                             f"sequence.CP_PLANS ({', '.join(sorted(CP_PLANS))}); pass your own to "
                             f"model.enable_parallelism(config=..., cp_plan=...)")
        degree = config.ulysses_degree
        attentions = [(path, m) for path, m in model.named_modules() if isinstance(m, Attention)]
        for path, m in attentions:
            if not isinstance(m.processor, AttnProcessor | AttnProcessor2_0 | ContextParallelAttnProcessor):
                raise ValueError(f"{path}: attention processor {type(m.processor).__name__} is not the "
                                 f"default one; context parallel replaces only AttnProcessor2_0")
            if m.heads % degree:
                raise ValueError(f"{path}: {m.heads} heads do not divide by ulysses_degree {degree}")
        for path, m in attentions:
            m.set_processor(ContextParallelAttnProcessor(local=path.startswith(family.local)))  # type: ignore[arg-type]
        if family.check is not None:
            check = family.check
            model.register_forward_pre_hook(lambda _m, _a, kw: check(kw), with_kwargs=True)
    with _one_device_on_cpu() as patched:
        if patched:
            log.info("enable_context_parallel: no accelerator; torch.accelerator.device_count read 1 "
                     "during enable_parallelism (diffusers divides by it)")
        model.enable_parallelism(config=config, cp_plan=None if family is None else family.plan())
    return "diffusers" if family is None else "viditq_compile"


def sequence_parallel(qm, mesh=None):
    """The artifact route: ``parallel.ulysses.sequence_parallel`` (see there)."""
    from viditq_compile.parallel.ulysses import sequence_parallel as _sp

    return _sp(qm, mesh)

