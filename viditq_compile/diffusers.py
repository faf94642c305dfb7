"""viditq_compile as a diffusers quantization backend: ``ViditqConfig`` for ``from_pretrained``.

    import viditq_compile.diffusers  # registers "viditq" with diffusers (also: register())
    from viditq_compile.diffusers import ViditqConfig

    t = PixArtTransformer2DModel.from_pretrained(path, quantization_config=ViditqConfig("w8a8"))
    t.save_pretrained("pixart-w8a8/")                         # config.json + safetensors
    t = PixArtTransformer2DModel.from_pretrained("pixart-w8a8/")  # no arguments, bit-exact

or for a pipeline, ``PipelineQuantizationConfig(quant_mapping={"transformer": ViditqConfig(...)})``
(or ``quant_backend="viditq", quant_kwargs={"recipe": "w8a8"}``).

The quantized model is in module form (``viditq_compile.module_form``): each quantized layer a
``QuantizedLinear`` calling the ``viditq`` ops, so the model stays the diffusers class, and
``torch.compile(..., backend="viditq")``, regional compilation, LoRA and offloading see modules.

- **Quantizing at load** (a floating-point checkpoint): after the weights are loaded the model is
  captured on the example inputs of its family (``families``: built from its config) and quantized
  by ``recipe`` (data-free) or ``plan`` (a ``Plan``, e.g. searched, with the calibration statistics
  it carries; or ``calibration=`` statistics / their path for a recipe that smooths). A model class
  no family knows is refused; quantize it with ``quantize_model(model, args, kwargs, ...)``.
- **Reloading** (a checkpoint this backend saved): ``config.json``'s ``quantization_config`` holds
  the recipe's name and the layout (``module_form.layout``: per layer its widths and its tensors'
  dtypes and shapes). Loading validates the layout (a bad one is a ``LayoutError`` naming the
  value), puts empty ``QuantizedLinear`` modules in place and fills them from the safetensors file
  as stored: scales stay fp32 whatever ``torch_dtype`` says. Nothing in the directory is executed
  (JSON and safetensors only; ``Plan`` objects are never read from a config).

diffusers has no public registration API for third-party quantizers: ``register()`` adds
``"viditq"`` to ``diffusers.quantizers.auto``'s two mappings, as diffusers' own backends are
listed there. It runs on ``import viditq_compile.diffusers``, never on ``import viditq_compile``.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.quantizers import auto as _auto
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin
from torch import nn

from viditq_compile import module_form as mf

log = logging.getLogger(__name__)

__all__ = ["ViditqConfig", "ViditqQuantizer", "register", "quantize_model", "quantize_pipeline", "record_pipeline",
           "PipelineCalls", "denoiser_of", "single_denoiser", "example_kwargs", "METHOD"]

METHOD = "viditq"


class QuantMethod(str, enum.Enum):
    """diffusers reads ``quant_method.value``; a ``str`` enum is also written to JSON as its value."""

    VIDITQ = METHOD


class ViditqConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a viditq-quantized diffusers model.

    recipe: a preset name (``"w8a8"``, ``"w4a8-viditq"``, ...) or a mapping in the reference YAML
    format (stored in ``config.json``); plan: a ``viditq_compile.Plan`` to apply instead of the
    recipe's selection (not stored: the layout records its outcome); calibration:
    ``CalibrationStats`` or the path of saved statistics (not stored); modules_to_not_convert:
    module-name regexes kept in floating point (added to the recipe's keep-FP rules); layout:
    written by the quantizer after quantizing (``module_form.layout``), read when reloading.
    """

    def __init__(self, recipe: str | Mapping = "w8a8", plan: Any = None, calibration: Any = None,
                 modules_to_not_convert: list[str] | None = None, layout: Mapping | None = None,
                 viditq_version: str | None = None):
        from viditq_compile.config.plan import Plan

        self.quant_method = QuantMethod.VIDITQ  # type: ignore[assignment]  # diffusers' enum lists its own
        if not isinstance(recipe, (str, Mapping)):
            raise TypeError(f"ViditqConfig: recipe must be a preset name or a mapping in the reference "
                            f"format (stored in config.json), got {type(recipe).__name__}")
        if plan is not None and not isinstance(plan, Plan):
            raise TypeError(f"ViditqConfig: plan must be a viditq_compile.Plan, got {type(plan).__name__}")
        if modules_to_not_convert is not None and not (
                isinstance(modules_to_not_convert, list) and all(isinstance(m, str) for m in modules_to_not_convert)):
            raise TypeError(f"ViditqConfig: modules_to_not_convert must be a list of regexes, got "
                            f"{modules_to_not_convert!r}")
        if layout is not None and not isinstance(layout, Mapping):
            raise mf.LayoutError(f"quantization_config.layout: expected a mapping, got {type(layout).__name__}")
        self.recipe = recipe if isinstance(recipe, str) else dict(recipe)
        self.plan = plan
        self.calibration = calibration
        self.modules_to_not_convert = modules_to_not_convert
        self.layout = dict(layout) if layout is not None else None
        self.viditq_version = viditq_version

    @classmethod
    def from_dict(cls, config_dict: Mapping, return_unused_kwargs: bool = False, **kwargs):
        """From ``config.json``'s ``quantization_config``: only the stored keys are accepted."""
        if not isinstance(config_dict, Mapping):
            raise TypeError(f"quantization_config: expected a mapping, got {type(config_dict).__name__}")
        allowed = {"quant_method", "recipe", "modules_to_not_convert", "layout", "viditq_version"}
        unknown = sorted(set(config_dict) - allowed)
        if unknown:
            raise ValueError(f"quantization_config: unknown key(s) {unknown} for quant_method {METHOD!r} "
                             f"(keys: {sorted(allowed)})")
        if config_dict.get("quant_method", METHOD) != METHOD:
            raise ValueError(f"quantization_config.quant_method: {config_dict['quant_method']!r} is not {METHOD!r}")
        config = cls(**{k: v for k, v in config_dict.items() if k != "quant_method"})
        return (config, kwargs) if return_unused_kwargs else config

    def to_dict(self) -> dict[str, Any]:
        from viditq_compile import __version__

        out: dict[str, Any] = {"quant_method": METHOD, "recipe": self.recipe,
                               "viditq_version": self.viditq_version or __version__}
        if self.modules_to_not_convert:
            out["modules_to_not_convert"] = list(self.modules_to_not_convert)
        if self.layout is not None:
            out["layout"] = self.layout
        return out

    def __repr__(self) -> str:
        n = len(self.layout["layers"]) if self.layout else 0
        return f"ViditqConfig(recipe={self.recipe!r}, plan={'given' if self.plan else None}, layers={n})"


class ViditqQuantizer(DiffusersQuantizer):
    """diffusers' hooks for ``ViditqConfig`` (see the module docstring)."""

    requires_calibration = False
    use_keep_in_fp32_modules = True

    def __init__(self, quantization_config: ViditqConfig, **kwargs):
        if not isinstance(quantization_config, ViditqConfig):
            raise TypeError(f"ViditqQuantizer takes a ViditqConfig, got {type(quantization_config).__name__}")
        super().__init__(quantization_config, **kwargs)
        if self.pre_quantized and quantization_config.layout is None:
            raise mf.LayoutError("quantization_config: a saved viditq model needs its 'layout' (the config "
                                 "was not written by viditq_compile, or was edited)")

    def _process_model_before_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            mf.from_layout(model, self.quantization_config.layout)
        return model

    def check_if_quantized_param(self, model, param_value, param_name: str, state_dict, **kwargs) -> bool:
        module, name = _owner(model, param_name)
        return isinstance(module, mf.QuantizedLinear) and name in module.quantized_tensors()

    def create_quantized_param(self, model, param_value, param_name, target_device, state_dict,
                               unexpected_keys=None, **kwargs):
        module, name = _owner(model, param_name)
        value = state_dict[param_name]  # as stored: the loader has cast param_value to torch_dtype
        empty = getattr(module, name)
        if value.dtype != empty.dtype or value.shape != empty.shape:
            raise mf.LayoutError(f"{param_name}: the checkpoint holds {value.dtype} {tuple(value.shape)}, the layout "
                                 f"says {empty.dtype} {tuple(empty.shape)}")
        value = value.to(target_device)
        if name == "weight":
            module.weight = nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[name] = value

    def check_quantized_param_shape(self, param_name, current_param, loaded_param):
        raise mf.LayoutError(f"{param_name}: the checkpoint holds shape {tuple(loaded_param.shape)}, the layout "
                             f"says {tuple(current_param.shape)}")

    def _process_model_after_weight_loading(self, model, **kwargs):
        cfg = self.quantization_config
        if self.pre_quantized:
            return model
        report = quantize_model(model, recipe=cfg.recipe, plan=cfg.plan, calibration=cfg.calibration,
                                modules_to_not_convert=cfg.modules_to_not_convert, config=cfg)
        log.info("viditq: %s", report.summary())
        return model

    def update_torch_dtype(self, torch_dtype):
        return torch_dtype

    @property
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def _owner(model: nn.Module, param_name: str) -> tuple[nn.Module, str]:
    path, _, name = param_name.rpartition(".")
    try:
        return (model.get_submodule(path) if path else model), name
    except AttributeError:
        return model, param_name


def example_kwargs(model: nn.Module, batch: int = 2, seed: int = 0) -> dict:
    """Example keyword arguments for ``model`` from its family's builder (``families``), floating
    tensors in the model's dtype; ``ValueError`` naming the class when no family builds them."""
    from viditq_compile.families import registry

    family = registry.for_model(model)
    if family is None or family.example_inputs is None:
        why = family.inputs_note if family is not None else "no family knows this class"
        raise ValueError(f"{type(model).__name__}: no example inputs ({why}); quantize it with "
                         f"viditq_compile.diffusers.quantize_model(model, args, kwargs, ...)")
    kwargs = family.example_inputs(dict(model.config), batch, seed)  # type: ignore[arg-type, attr-defined]
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return {k: (v.to(device=device, dtype=dtype) if isinstance(v, torch.Tensor) and v.is_floating_point()
                else v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}


def quantize_model(model: nn.Module, args: tuple = (), kwargs: dict | None = None, *,
                   recipe: str | Mapping = "w8a8", plan: Any = None, calibration: Any = None,
                   modules_to_not_convert: list[str] | None = None, config: ViditqConfig | None = None):
    """Quantize a loaded diffusers model in place, in module form, so that ``save_pretrained``
    writes a checkpoint ``from_pretrained`` reloads with no arguments. ``args`` / ``kwargs``: an
    example call (default: the family's example inputs, ``example_kwargs``); the rest as
    ``vq.quantize``. Returns the ``Report``."""
    from viditq_compile.config.recipe import Recipe

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if kwargs is None and not args:
        kwargs = example_kwargs(model)
    cfg = config if config is not None else ViditqConfig(recipe, plan, calibration, modules_to_not_convert)
    r = Recipe.resolve(cfg.recipe)
    if cfg.modules_to_not_convert:
        r = _keep_fp_also(r, cfg.modules_to_not_convert)
    report = mf.quantize_modules(model, args, kwargs, recipe=r, plan=cfg.plan, calibration=cfg.calibration)
    cfg.layout = mf.layout(model)
    _attach(model, cfg)
    return report


def _keep_fp_also(r, patterns: list[str]):
    """``r`` keeping the layers ``patterns`` match in floating point too (each checked by the
    user-regex guard)."""
    import dataclasses

    from viditq_compile.io.user_regex import compile_user_regex

    for i, p in enumerate(patterns):
        compile_user_regex(p, f"modules_to_not_convert[{i}]")
    joined = "|".join(f"(?:{p})" for p in ([r.remain_fp_regex] if r.remain_fp_regex else []) + list(patterns))
    compile_user_regex(joined, "modules_to_not_convert")
    return dataclasses.replace(r, remain_fp_regex=joined)


def _attach(model: nn.Module, cfg: ViditqConfig) -> None:
    """What diffusers' ``from_pretrained`` leaves on a quantized model, so that ``save_pretrained``
    writes the quantization config beside the weights."""
    if hasattr(model, "register_to_config"):
        model.register_to_config(quantization_config=cfg)  # type: ignore[operator]
    model.hf_quantizer = ViditqQuantizer(cfg, pre_quantized=True)  # type: ignore[assignment]
    model.is_quantized = True  # type: ignore[assignment]


def register() -> None:
    """Make ``"viditq"`` a diffusers quantization method (idempotent)."""
    _auto.AUTO_QUANTIZER_MAPPING[METHOD] = ViditqQuantizer
    _auto.AUTO_QUANTIZATION_CONFIG_MAPPING[METHOD] = ViditqConfig


register()


# --- a whole pipeline -----------------------------------------------------------------------------
def denoiser_of(pipe) -> tuple[str, nn.Module]:
    """``("transformer", module)`` of a diffusers pipeline; ``TypeError`` for a pipeline without
    one (a UNet pipeline is not a DiT)."""
    components = getattr(pipe, "components", None)
    if not isinstance(components, Mapping):
        raise TypeError(f"pipe must be a diffusers pipeline, got {type(pipe).__name__}")
    for name in ("transformer", "transformer_2"):
        m = components.get(name)
        if isinstance(m, nn.Module):
            return name, m
    raise TypeError(f"{type(pipe).__name__} has no transformer (components: {sorted(components)}); "
                    f"viditq_compile quantizes diffusion transformers")


@dataclass(frozen=True)
class PipelineCalls:
    """The transformer calls of one sampling run of a pipeline (``record_pipeline``).

    calls: each call's ``(args, kwargs)``, tensors detached and cloned, in order.
    timesteps: each call's timestep (its ``timestep`` argument's first value; NaN when none).
    samples: the samples the run produced (prompts or labels x images per prompt).
    batches: each call's latent batch.
    cfg: how the run applied guidance: ``"batched"`` (both classifier-free guidance halves in one
        call of twice the samples: PixArt, DiT, SD3, Sana), ``"separate"`` (two calls a step,
        conditional and unconditional: Wan, Flux's true CFG), ``"guidance-embedding"`` (one call a
        step with a ``guidance`` input: guidance-distilled Flux), ``"none"`` or ``"mixed"`` (calls
        of other batch sizes or counts a step, e.g. skip-layer guidance).
    """

    calls: list[tuple[tuple, dict]]
    timesteps: list[float]
    samples: int
    batches: list[int]
    cfg: str

    @property
    def steps(self) -> list[list[int]]:
        """Call indices grouped by step: consecutive calls at the same timestep."""
        groups: list[list[int]] = []
        for i, t in enumerate(self.timesteps):
            same = groups and (self.timesteps[groups[-1][0]] == t)
            if same:
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups

    def summary(self) -> str:
        per_step = sorted({len(g) for g in self.steps})
        return (f"{len(self.calls)} transformer calls: {len(self.steps)} steps x "
                f"{'/'.join(map(str, per_step))} call(s), latent batch {'/'.join(map(str, sorted(set(self.batches))))} "
                f"for {self.samples} sample(s), guidance {self.cfg}")


def _latent_batch(signature, args: tuple, kwargs: dict, names: tuple[str, ...]) -> int:
    bound: dict = {}
    if signature is not None:
        try:
            bound = dict(signature.bind(*args, **kwargs).arguments)
        except TypeError:
            bound = {}
    for n in names:
        v = bound.get(n, kwargs.get(n))
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    first = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
    if isinstance(first, torch.Tensor) and first.dim() > 0:
        return int(first.shape[0])
    raise ValueError("cannot tell the latent batch of a transformer call: no tensor argument")


def _output_samples(out) -> int:
    for key in ("images", "frames", "audios"):
        v = getattr(out, key, None)
        if v is not None:
            return len(v)
    if isinstance(out, (tuple, list)) and out:
        return len(out[0])
    raise TypeError(f"cannot count the samples of a pipeline output of type {type(out).__name__}")


def _guidance_mode(calls: list[tuple[tuple, dict]], timesteps: list[float], batches: list[int], samples: int) -> str:
    if all(b == 2 * samples for b in batches):
        return "batched"
    if all(b == samples for b in batches):
        groups = PipelineCalls(calls, timesteps, samples, batches, "").steps
        if groups and all(len(g) == 2 for g in groups):
            return "separate"
        if all(len(g) == 1 for g in groups):
            guided = all(isinstance(kw.get("guidance"), torch.Tensor) for _, kw in calls)
            return "guidance-embedding" if guided else "none"
    return "mixed"


def _pipeline_inputs(prompts, class_labels, call_kwargs: dict) -> dict:
    if prompts is not None and class_labels is not None:
        raise ValueError("give prompts (text pipelines) or class_labels (DiTPipeline), not both")
    inputs = dict(call_kwargs)
    for reserved in ("num_inference_steps", "generator", "output_type"):
        if reserved in inputs:
            raise ValueError(f"{reserved} is set by quantize_pipeline itself (num_inference_steps=, seed=); "
                             f"do not pass it among the pipeline's arguments")
    if prompts is not None:
        if not (isinstance(prompts, str) or (isinstance(prompts, list) and prompts
                                             and all(isinstance(p, str) for p in prompts))):
            raise TypeError(f"prompts must be a string or a non-empty list of strings, got {prompts!r}")
        inputs["prompt"] = prompts
    if class_labels is not None:
        labels = [class_labels] if isinstance(class_labels, int) and not isinstance(class_labels, bool) \
            else class_labels
        if not (isinstance(labels, list) and labels and all(isinstance(c, int) and not isinstance(c, bool)
                                                            for c in labels)):
            raise TypeError(f"class_labels must be an int or a non-empty list of ints, got {class_labels!r}")
        inputs["class_labels"] = labels
    if not inputs:
        raise ValueError("quantize_pipeline needs the pipeline's inputs: prompts=, class_labels= or its "
                         "own arguments (e.g. prompt_embeds=)")
    return inputs


def _check_steps_seed(num_inference_steps, seed) -> None:
    if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")


def single_denoiser(pipe) -> nn.Module:
    """``denoiser_of(pipe)``'s module; ``NotImplementedError`` for a pipeline with two transformers."""
    name, transformer = denoiser_of(pipe)
    others = [k for k in ("transformer", "transformer_2") if k != name
              and isinstance(pipe.components.get(k), nn.Module)]
    if others:
        raise NotImplementedError(f"{type(pipe).__name__} has two transformers ({name}, {others[0]}: e.g. Wan 2.2's "
                                  f"high- and low-noise experts); quantize_pipeline quantizes one. Quantize each "
                                  f"with quantize_model(pipe.{name}, args, kwargs, ...) on calls you record")
    return transformer


def record_pipeline(pipe, *, prompts: str | list[str] | None = None, class_labels: int | list[int] | None = None,
                    num_inference_steps: int = 20, seed: int = 0, **call_kwargs) -> PipelineCalls:
    """Run ``pipe`` once in floating point (``num_inference_steps`` steps, generator seeded with
    ``seed``, ``output_type="latent"``) on ``prompts`` / ``class_labels`` and ``call_kwargs`` (any
    other argument of the pipeline's ``__call__``), and record every call of its transformer:
    each step, and both classifier-free guidance halves however the pipeline makes them (one
    batched call or two calls; ``PipelineCalls.cfg`` says which)."""
    import inspect

    from viditq_compile.calibration.observe import record_calls, timestep_argument
    from viditq_compile.families import registry

    _check_steps_seed(num_inference_steps, seed)
    inputs = _pipeline_inputs(prompts, class_labels, call_kwargs)
    transformer = single_denoiser(pipe)
    device = next((p.device for p in transformer.parameters()), torch.device("cpu"))
    result: list = []

    def sampler(_model):
        generator = torch.Generator(device=device).manual_seed(seed)
        result.append(pipe(**inputs, num_inference_steps=num_inference_steps, generator=generator,
                           output_type="latent"))

    calls = record_calls(transformer, sampler)
    signature = inspect.signature(transformer.forward)
    family = registry.for_model(transformer)
    names = family.latent_names if family is not None else ("hidden_states",)
    timesteps = [timestep_argument(signature, a, k)[1] for a, k in calls]
    batches = [_latent_batch(signature, a, k, names) for a, k in calls]
    samples = _output_samples(result[0])
    return PipelineCalls(calls, timesteps, samples, batches, _guidance_mode(calls, timesteps, batches, samples))


def quantize_pipeline(pipe, *, prompts: str | list[str] | None = None, class_labels: int | list[int] | None = None,
                      recipe: str | Mapping = "w8a8", num_inference_steps: int = 20, seed: int = 0,
                      compile: bool = False, modules_to_not_convert: list[str] | None = None,
                      **call_kwargs):
    """Quantize ``pipe``'s transformer in place from the pipeline's own sampling loop; returns the
    ``Report``.

    The pipeline runs once in floating point (``record_pipeline``: ``num_inference_steps`` steps,
    ``seed``) on ``prompts`` (text pipelines: PixArt, SD3, Flux, Sana, Wan, ...) or ``class_labels``
    (``DiTPipeline``) and any other argument of its ``__call__`` (``call_kwargs``:
    ``guidance_scale``, ``height``, or ``prompt_embeds`` where the pipeline has no text encoder),
    and every transformer call is recorded (each step; both classifier-free guidance halves,
    batched into one call by PixArt, DiT, SD3 and Sana, two calls a step in Wan; Flux embeds its
    guidance). The recorded calls calibrate the recipe (smoothing statistics) and, for a recipe
    with a budget, drive the mixed-precision search; the call with the largest batch is the
    example the transformer is captured on. The transformer is then quantized in module form
    (``quantize_model``: ``save_pretrained`` writes a checkpoint ``from_pretrained`` reloads with
    no arguments) and, with ``compile``, compiled in place with the ``viditq`` backend. A
    pipeline with two transformers (Wan 2.2) is refused. The pipeline's own progress bar shows
    the calibration run; each phase is logged.
    """
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be a bool, got {compile!r}")
    log.info("viditq: recording the transformer calls of %d sampling steps", num_inference_steps)
    recorded = record_pipeline(pipe, prompts=prompts, class_labels=class_labels,
                               num_inference_steps=num_inference_steps, seed=seed, **call_kwargs)
    transformer = single_denoiser(pipe)
    log.info("viditq: %s; quantizing (%s)", recorded.summary(), recipe if isinstance(recipe, str) else "recipe")
    example = max(range(len(recorded.calls)), key=lambda i: recorded.batches[i])
    args, kwargs = recorded.calls[example]
    report = quantize_model(transformer, args, kwargs, recipe=recipe, calibration=recorded.calls,
                            modules_to_not_convert=modules_to_not_convert)
    if compile:
        log.info("viditq: compiling the transformer with the viditq backend")
        # recipe fp: the graphs hold the viditq ops already; the layers kept FP stay so
        transformer.compile(backend="viditq", options={"recipe": "fp"})  # type: ignore[operator]
    log.info("viditq: %s", report.summary())
    return report
