"""Which modules of an eager model are linear layers: ``nn.Linear``, and the convolutions that are
linears in disguise.

A convolution with a kernel of all ones (1×1 conv2d, 1×1×1 conv3d, k=1 conv1d), stride 1,
padding 0, dilation 1 and groups 1 applies one ``[O, I]`` matrix to the channel vector of every
position: ``conv(x, W, b) == linear(x channels-last, W.view(O, I), b)`` moved back channels-first
(Sana's GLUMBConv feed-forward, patch embeddings with patch size 1). The graph pass
``passes.conv_as_linear`` rewrites such calls into linears; calibration (``calibration.observe``),
the eager reference the search scores layers with (``methods.int_weight.EagerLinear``) and the
backend's coverage take the same modules, by the same rule (``conv_refusal``), so that a layer
means the same on every route. Channels are dim 1 of a batched input (dim 0 unbatched).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _ints(v, n: int, what: str) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    if isinstance(v, Sequence) and all(isinstance(i, int) for i in v):
        return tuple(v) * n if len(v) == 1 else tuple(v)
    raise TypeError(f"convolution {what} must be an int or a sequence of ints, got {v!r}")


def _show(v: tuple[int, ...]) -> str:
    """``2`` for (2, 2), ``1×2`` for (1, 2)."""
    return str(v[0]) if len(set(v)) == 1 else "×".join(map(str, v))


def conv_refusal(kernel: Sequence[int], stride=1, padding=0, dilation=1, groups: int = 1,
                 transposed: bool = False) -> str | None:
    """Why a convolution with these arguments is not a linear, or ``None`` when it is (kernel all
    ones, stride 1, padding 0, groups 1, not transposed; dilation does nothing to a kernel of
    ones). ``padding`` may be the strings ``"valid"`` / ``"same"`` (both 0 for a kernel of ones). The reason reads
    ``convolution (3×3 kernel, padding 1, groups 160): not a linear``."""
    k = tuple(int(i) for i in kernel)
    if not k:
        raise ValueError("conv_refusal: the kernel has no spatial dims")
    n = len(k)
    parts = []
    if any(i != 1 for i in k):
        parts.append("×".join(map(str, k)) + " kernel")
    s = _ints(stride, n, "stride")
    if any(i != 1 for i in s):
        parts.append("stride " + _show(s))
    if isinstance(padding, str):
        if padding not in ("valid", "same"):
            raise ValueError(f"convolution padding {padding!r}: torch takes 'valid' or 'same'")
        if padding == "same" and any(i != 1 for i in k):
            parts.append("padding 'same'")
    else:
        p = _ints(padding, n, "padding")
        if any(i != 0 for i in p):
            parts.append("padding " + _show(p))
    d = _ints(dilation, n, "dilation")
    if any(i != 1 for i in d) and any(i != 1 for i in k):
        parts.append("dilation " + _show(d))
    if groups != 1:
        parts.append(f"groups {groups}")
    if transposed:
        parts.append("transposed")
    return f"convolution ({', '.join(parts)}): not a linear" if parts else None


def module_refusal(m: nn.Module) -> str | None:
    """``conv_refusal`` of a convolution module; a reason for any other module but ``nn.Linear``."""
    if isinstance(m, nn.Linear):
        return None
    if isinstance(m, CONV_MODULES):
        return conv_refusal(m.kernel_size, m.stride, m.padding, m.dilation, m.groups, m.transposed)
    return f"{type(m).__name__} is neither an nn.Linear nor a convolution"


def is_linear_layer(m: nn.Module) -> bool:
    """``nn.Linear``, or a convolution that is a linear (``conv_refusal`` is ``None``); not a
    ``module_form.QuantizedLinear`` (an ``nn.Linear`` subclass that is already quantized)."""
    if getattr(m, "viditq_quantized", False):
        return False
    return isinstance(m, nn.Linear) or (isinstance(m, CONV_MODULES) and module_refusal(m) is None)


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> every linear layer of ``model`` (``is_linear_layer``), in module order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return {n: m for n, m in model.named_modules() if is_linear_layer(m)}


def in_features(m: nn.Module) -> int:
    """K of a linear layer: ``in_features``, or a linear convolution's input channels."""
    if isinstance(m, nn.Linear):
        return m.in_features
    if isinstance(m, CONV_MODULES) and module_refusal(m) is None:
        return m.in_channels
    raise TypeError(f"{type(m).__name__} is not a linear layer: {module_refusal(m)}")


def linear_weight(m: nn.Module) -> Tensor:
    """The layer's ``[O, I]`` weight: a linear's own, a linear convolution's ``[O, I, 1, ...]``
    weight viewed as ``[O, I]`` (detached; it shares the parameter's storage and version)."""
    if isinstance(m, nn.Linear):
        return m.weight
    if isinstance(m, CONV_MODULES) and module_refusal(m) is None:
        w = m.weight.detach()
        return w.reshape(w.shape[0], w.shape[1])
    raise TypeError(f"{type(m).__name__} is not a linear layer: {module_refusal(m)}")


def channel_dim(x: Tensor, spatial: int) -> int:
    """The channel dim of a convolution input with ``spatial`` spatial dims: 1 batched, 0
    unbatched. ``ValueError`` for any other rank."""
    c = x.dim() - spatial - 1
    if c not in (0, 1):
        raise ValueError(f"a convolution over {spatial} spatial dim(s) takes a {spatial + 1}-D or "
                         f"{spatial + 2}-D input, got shape {tuple(x.shape)}")
    return c


def to_tokens(m: nn.Module, x: Tensor) -> Tensor:
    """A linear layer's input as rows of features: unchanged for ``nn.Linear``; for a linear
    convolution, channels moved last (``[B, C, *S] -> [B, *S, C]``, a view)."""
    if isinstance(m, CONV_MODULES):
        return x.movedim(channel_dim(x, len(m.kernel_size)), -1)
    return x


def from_tokens(m: nn.Module, y: Tensor, like: Tensor) -> Tensor:
    """The inverse of ``to_tokens`` for the layer's output (``like``: the layer's input)."""
    if isinstance(m, CONV_MODULES):
        return y.movedim(-1, channel_dim(like, len(m.kernel_size)))
    return y

