"""Image quality of quantized samples: the metrics, the picture grid, and the suite on the digits DiT.

The suite (``run_quality``, ``viditq quality``) samples the trained demo DiT (``viditq_demo.digits``)
in floating point and under each recipe from the same noise and classes, and reports per recipe:

- **accuracy**: the digit classifier's accuracy on the requested class (the text-alignment
  analogue: does the sample show what was asked for);
- **FD**: Fréchet distance between the classifier's features of the samples and of the real
  digits (the FID analogue: does the set of samples look like the data);
- **PSNR** and **SSIM** of each quantized sample against the floating-point sample from the same
  noise and class (how far quantization moved each picture), averaged over the samples;

and writes a PNG grid, one row per recipe, one column per (seed, class).

Metrics take images ``[B, 1, H, W]`` (or ``[B, C, H, W]``) with values in ``[-1, 1]``
(``data_range`` 2). SSIM is the standard Gaussian-window form (Wang et al. 2004: window 7 for
images this small, sigma 1.5, K1 = 0.01, K2 = 0.03), computed per image over valid positions.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from viditq_compile.report.png import draw_text, encode_png, text_width

DEFAULT_RECIPES = ("fp", "w8a8-naive", "w8a8", "w4a8-naive", "w4a8", "w4a8-mp", "w4a4-mp")


def _check_images(name: str, x) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point() or x.shape[0] == 0:
        raise ValueError(f"{name} must be a float tensor [B, C, H, W] with B >= 1, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    return x.detach().to(torch.float64)


def _check_pair(ref, x) -> tuple[Tensor, Tensor]:
    r, y = _check_images("reference", ref), _check_images("images", x)
    if r.shape != y.shape:
        raise ValueError(f"images {tuple(y.shape)} and reference {tuple(r.shape)} differ in shape")
    return r, y


def psnr(reference: Tensor, images: Tensor, data_range: float = 2.0) -> Tensor:
    """Per-image PSNR in dB, ``10 log10(data_range^2 / MSE)`` ([B] float64; inf for equal images)."""
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    r, y = _check_pair(reference, images)
    mse = (r - y).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range ** 2 / mse)


def _gaussian_window(size: int, sigma: float) -> Tensor:
    t = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(reference: Tensor, images: Tensor, data_range: float = 2.0, window: int = 7,
         sigma: float = 1.5) -> Tensor:
    """Per-image mean SSIM ([B] float64), Gaussian window ``window`` x ``window`` (odd, at most
    the image size) over valid positions, channels averaged."""
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    r, y = _check_pair(reference, images)
    if window < 1 or window % 2 == 0 or window > min(r.shape[-2:]):
        raise ValueError(f"window must be odd and at most the image size {tuple(r.shape[-2:])}, got {window}")
    c = r.shape[1]
    w = _gaussian_window(window, sigma).expand(c, 1, window, window).contiguous()

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, w, groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_r, mu_y = blur(r), blur(y)
    var_r = blur(r * r) - mu_r ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(r * y) - mu_r * mu_y
    s = ((2 * mu_r * mu_y + c1) * (2 * cov + c2)) / ((mu_r ** 2 + mu_y ** 2 + c1) * (var_r + var_y + c2))
    return s.flatten(1).mean(1)


def _sqrtm_psd(m: Tensor) -> Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``[N, D]`` (N >= 2 each):
    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)``, in float64. The matrix
    square root of the symmetric product makes it exact for PSD covariances (no complex parts)."""
    for name, f in (("features_a", features_a), ("features_b", features_b)):
        if not isinstance(f, Tensor) or f.dim() != 2 or f.shape[0] < 2:
            raise ValueError(f"{name} must be [N, D] with N >= 2, got {tuple(getattr(f, 'shape', ()))}")
    if features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"feature sizes differ: {features_a.shape[1]} vs {features_b.shape[1]}")
    a, b = features_a.detach().to(torch.float64), features_b.detach().to(torch.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrtm_psd(s_a)
    cross = _sqrtm_psd(root_a @ s_b @ root_a)
    d = (mu_a - mu_b).pow(2).sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * torch.trace(cross)
    return max(float(d), 0.0)


@torch.no_grad()
def classifier_accuracy(classifier: Callable[[Tensor], Tensor], images: Tensor, labels: Tensor) -> float:
    """Fraction of ``images`` the classifier assigns to ``labels`` ([B] int64)."""
    _check_images("images", images)
    if not isinstance(labels, Tensor) or labels.shape != (images.shape[0],):
        raise ValueError(f"labels must be [B={images.shape[0]}], got {tuple(getattr(labels, 'shape', ()))}")
    pred = classifier(images).argmax(-1)
    return float((pred == labels).float().mean())


# --- the picture grid ---------------------------------------------------------------------------

def _check_error_gain(error_gain) -> None:
    if error_gain is not None and not (isinstance(error_gain, (int, float)) and math.isfinite(error_gain)
                                       and error_gain > 0):
        raise ValueError(f"error_gain must be a positive finite number or None, got {error_gain!r}")


def grid_png(rows: Sequence[Tensor], row_labels: Sequence[str], *, scale: int = 4, gap: int = 2,
             title: str = "", error_gain: float | None = None) -> bytes:
    """A PNG of image rows: ``rows[i]`` is ``[C, 1, H, W]`` in ``[-1, 1]`` (grey), labelled on the
    left with ``row_labels[i]``; every row holds the same number of images of one size.

    error_gain: when given, ``rows[0]`` is the reference and a second panel to the right shows
    ``|rows[i] - rows[0]| * error_gain`` per pixel, white = no error, red = an error of at least
    ``1 / error_gain`` (on the [-1, 1] scale). Errors of 40 dB PSNR are invisible in the samples;
    the amplified difference is what makes recipes that stay close to FP tell apart by eye.
    """
    if not rows or len(rows) != len(row_labels):
        raise ValueError(f"need one label per row and at least one row, got {len(rows)} rows and "
                         f"{len(row_labels)} labels")
    shape = tuple(rows[0].shape)
    for i, r in enumerate(rows):
        if not isinstance(r, Tensor) or r.dim() != 4 or r.shape[1] != 1 or tuple(r.shape) != shape:
            raise ValueError(f"row {i} must be [C, 1, H, W] like row 0 {shape}, got "
                             f"{tuple(getattr(r, 'shape', ()))}")
    if scale < 1 or gap < 0:
        raise ValueError(f"scale must be >= 1 and gap >= 0, got scale={scale}, gap={gap}")
    _check_error_gain(error_gain)
    cols, _, h, w = shape
    ch, cw = h * scale, w * scale
    pad = 6
    label_w = max(text_width(s) for s in row_labels) + 2 * pad
    title_h = 9 * 2 + 2 * pad if title else pad
    head_h = 9 + pad if error_gain is not None else 0
    panel_w = cols * (cw + gap)
    panel_gap = 4 * pad
    height = title_h + head_h + len(rows) * (ch + gap) + pad
    width = label_w + panel_w + pad + (panel_gap + panel_w if error_gain is not None else 0)
    img = np.full((height, width, 3), 255, np.uint8)
    ink = (40, 40, 40)
    if title:
        draw_text(img, pad, pad, title, ink, scale=2)
    x_err = label_w + panel_w + panel_gap
    if error_gain is not None:
        draw_text(img, label_w, title_h, "samples", ink)
        draw_text(img, x_err, title_h, f"|sample - {row_labels[0]}| x {error_gain:g}", ink)
    if error_gain is not None:  # grey behind the error tiles, so white (no error) tiles stay visible
        top = title_h + head_h
        img[top - gap:top + len(rows) * (ch + gap), x_err - gap:x_err + panel_w] = 200
    ref = rows[0].detach().float().clamp(-1, 1)
    for i, (r, label) in enumerate(zip(rows, row_labels)):
        y0 = title_h + head_h + i * (ch + gap)
        draw_text(img, label_w - pad - text_width(label), y0 + (ch - 9) // 2, label, ink)
        x = r.detach().float().clamp(-1, 1)
        pix = ((x + 1) * 127.5).round().to(torch.uint8).numpy()
        if error_gain is not None:
            fade = 255 - ((x - ref).abs() * error_gain).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
        for j in range(cols):
            x0 = label_w + j * (cw + gap)
            img[y0:y0 + ch, x0:x0 + cw] = pix[j, 0].repeat(scale, 0).repeat(scale, 1)[..., None]
            if error_gain is not None:
                e = fade[j, 0].repeat(scale, 0).repeat(scale, 1)
                xe = x_err + j * (cw + gap)
                img[y0:y0 + ch, xe:xe + cw, 0] = 255
                img[y0:y0 + ch, xe:xe + cw, 1] = e
                img[y0:y0 + ch, xe:xe + cw, 2] = e
    return encode_png(img)


# --- the suite ----------------------------------------------------------------------------------

@dataclass
class RecipeQuality:
    recipe: str
    accuracy: float
    fd: float
    psnr_db: float
    ssim: float
    weight_bytes: int
    quantized_layers: int = 0
    fp_layers: int = 0
    seconds: float = 0.0
    notes: list = field(default_factory=list)


@dataclass
class QualityResult:
    rows: list
    labels: list
    seeds: list
    num_steps: int
    guidance_scale: float
    grid_path: str | None = None

    def row(self, recipe: str) -> RecipeQuality:
        for r in self.rows:
            if r.recipe == recipe:
                return r
        raise KeyError(f"no recipe {recipe!r} in this result; recipes: {[r.recipe for r in self.rows]}")

    def table(self) -> str:
        """A Markdown table, one row per recipe; the accuracy change is against ``fp``."""
        base = next((r.accuracy for r in self.rows if r.recipe == "fp"), None)
        head = ("| recipe | accuracy | Δ vs fp (points) | FD to real digits | PSNR vs fp (dB) | SSIM vs fp "
                "| weights (KiB) | layers quantized |")
        lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in self.rows:
            delta = "" if base is None or r.recipe == "fp" else f"{100 * (r.accuracy - base):+.1f}"
            p = "∞" if math.isinf(r.psnr_db) else f"{r.psnr_db:.1f}"
            lines.append(f"| `{r.recipe}` | {100 * r.accuracy:.1f}% | {delta} | {r.fd:.2f} | {p} | {r.ssim:.3f} "
                         f"| {r.weight_bytes / 1024:.0f} | {r.quantized_layers} / {r.quantized_layers + r.fp_layers} |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"rows": [asdict(r) for r in self.rows], "labels": self.labels, "seeds": self.seeds,
                "num_steps": self.num_steps, "guidance_scale": self.guidance_scale,
                "grid_path": self.grid_path}


def _weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def run_quality(recipes: Sequence[str] = DEFAULT_RECIPES, *, per_class: int = 10, seed: int = 0,
                num_steps: int = 20, guidance_scale: float | None = None, grid: str | None = None,
                grid_columns: int = 10, error_gain: float | None = 10.0,
                calibration_calls: int | None = None,
                progress: Callable[[str], None] | None = None) -> QualityResult:
    """Sample the digits DiT in FP and under each recipe from the same noise and classes; score.

    recipes: preset names (``"fp"`` is the reference and always runs first); per_class: samples
    per digit (10 classes); seed: the first noise seed (sample i uses seed + i); num_steps,
    guidance_scale: the sampler's (``digits.sample`` defaults when None); grid: path of the PNG
    grid (rows = recipes, the first ``grid_columns`` samples as columns), or None; error_gain: the
    grid's second panel shows each sample's difference from FP times this (None: no panel);
    calibration_calls: how many recorded sampler calls calibrate (and, for ``-mp`` recipes, drive
    the search); None: ``digits.calibration_calls``' default.
    """
    from viditq_compile import api
    from viditq_demo import digits

    if isinstance(recipes, str) or not recipes:
        raise ValueError(f"recipes must be a non-empty sequence of preset names, got {recipes!r}")
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if grid_columns < 1:
        raise ValueError(f"grid_columns must be >= 1, got {grid_columns}")
    _check_error_gain(error_gain)
    say = progress or (lambda s: None)
    order = ["fp"] + [r for r in dict.fromkeys(recipes) if r != "fp"]

    model = digits.load_demo_dit()
    classifier = digits.load_classifier()
    labels = torch.arange(10).repeat_interleave(per_class)
    seeds = [seed + i for i in range(labels.numel())]
    # interleave classes so the grid's first columns show different digits
    perm = torch.arange(labels.numel()).reshape(10, per_class).T.reshape(-1)
    labels = labels[perm]
    sample_kw: dict[str, Any] = {"num_steps": num_steps}
    if guidance_scale is not None:
        sample_kw["guidance_scale"] = guidance_scale

    real, _ = digits.load_digits()
    with torch.no_grad():
        real_features = classifier.features(real)
    calls = digits.calibration_calls() if calibration_calls is None else digits.calibration_calls(n=calibration_calls)
    args, kwargs = digits.example_call()

    rows, pictures, reference = [], [], None
    for name in order:
        t0 = time.perf_counter()
        if name == "fp":
            runner, wbytes, nq, nfp, notes = model, _weight_bytes(model), 0, 0, []
        else:
            say(f"quantizing with {name}")
            qm = api.quantize(model, args, kwargs, recipe=name, calibration=calls)
            runner, wbytes = qm, qm.weight_bytes
            nq, nfp = qm.report.num_quantized, qm.report.num_fp
            notes = sorted({r.note for r in qm.report.rows if r.note})
        say(f"sampling {labels.numel()} digits with {name}")
        with torch.no_grad():
            images = digits.sample(runner, labels, seeds, **sample_kw)
            feats = classifier.features(images)
        if reference is None:
            reference = images
        rows.append(RecipeQuality(
            recipe=name, accuracy=classifier_accuracy(classifier, images, labels),
            fd=frechet_distance(feats, real_features),
            psnr_db=float(psnr(reference, images).mean()), ssim=float(ssim(reference, images).mean()),
            weight_bytes=wbytes, quantized_layers=nq, fp_layers=nfp,
            seconds=time.perf_counter() - t0, notes=notes))
        pictures.append(images[:grid_columns])
    result = QualityResult(rows=rows, labels=labels.tolist(), seeds=seeds, num_steps=num_steps,
                           guidance_scale=guidance_scale if guidance_scale is not None else float("nan"))
    if grid is not None:
        os.makedirs(os.path.dirname(os.path.abspath(grid)), exist_ok=True)
        with open(grid, "wb") as f:
            f.write(grid_png(pictures, order, title="digits DiT: same noise and class per column",
                             error_gain=error_gain))
        result.grid_path = str(grid)
    return result
