"""Training of the demo DiT and the digit classifier (CPU, seeded; ``scripts/train_digits.py``)."""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from viditq_demo.digits.classifier import DigitClassifier
from viditq_demo.digits.data import DEFAULT_SIZE, NULL_CLASS, load_digits
from viditq_demo.digits.model import CLASSIFIER_WEIGHTS, DIT_CONFIG, DIT_CONFIG_FILE, DIT_WEIGHTS, SCHEDULE, build_dit

Log = Callable[[str], None]


def _lr(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _shift(x: torch.Tensor, g: torch.Generator, pad: int = 1) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels (background -1 fills in)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), value=-1.0)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None].expand(b, 1, h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :].expand(b, 1, h, w)
    return out.gather(3, cols)


def train_classifier(*, seed: int = 0, epochs: int = 20, batch_size: int = 64, lr: float = 2e-3,
                     log: Log = print) -> tuple[DigitClassifier, dict]:
    """A ``DigitClassifier`` trained on the ``"train"`` split (random 1-pixel shifts); returns the
    model (eval) and metrics (``test_accuracy`` on the held-out split)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    x, y = load_digits(DEFAULT_SIZE, split="train")
    xt, yt = load_digits(DEFAULT_SIZE, split="test")
    model = DigitClassifier(DEFAULT_SIZE)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    total = epochs * steps_per_epoch
    t0 = time.perf_counter()
    step = 0
    for _epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            for group in opt.param_groups:
                group["lr"] = _lr(step, total, lr, steps_per_epoch)
            loss = F.cross_entropy(model(_shift(x[idx], g)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    model.eval()
    with torch.no_grad():
        acc = (model(xt).argmax(-1) == yt).float().mean().item()
        train_acc = (model(x).argmax(-1) == y).float().mean().item()
    metrics = {"seconds": time.perf_counter() - t0, "final_loss": loss.item(), "test_accuracy": acc,
               "train_accuracy": train_acc, "epochs": epochs}
    log(f"classifier: {metrics['seconds']:.1f} s, final loss {metrics['final_loss']:.4f}, train accuracy "
        f"{train_acc:.4f}, held-out accuracy {acc:.4f} ({len(xt)} images)")
    return model, metrics


def init_dit_(model: nn.Module) -> None:
    """DiT-paper initialisation: Xavier-uniform linears, N(0, 0.02) label / timestep embeddings,
    zero adaLN modulations and output layer (every block starts as the identity)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    w = model.pos_embed.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(model.pos_embed.proj.bias)
    for block in model.transformer_blocks:
        emb = block.norm1.emb
        nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
    for layer in (model.proj_out_1, model.proj_out_2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def train_dit(*, seed: int = 0, steps: int = 2000, batch_size: int = 64, lr: float = 2e-3, warmup: int = 100,
              ema_decay: float = 0.999, p_uncond: float = 0.1, min_snr_gamma: float | None = 5.0,
              config: dict | None = None,
              log: Log = print, log_every: int = 250, callback: Callable[[int, nn.Module], None] | None = None):
    """Train the demo DiT (epsilon prediction, DDPM schedule ``SCHEDULE``) on the ``"train"``
    split, labels replaced by the null class with probability ``p_uncond``. Returns the EMA model
    (eval) and metrics. min_snr_gamma: Min-SNR loss weighting ``min(SNR_t, gamma) / SNR_t`` (Hang
    et al. 2023; None: plain MSE). callback(step, ema_model) runs every ``log_every`` steps."""
    from diffusers import DDPMScheduler
    from diffusers.models.embeddings import LabelEmbedding

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    model = build_dit(config)
    init_dit_(model)
    # diffusers drops labels inside every block independently in train mode; drop them here
    # instead, once per sample, so that all blocks see the same (possibly null) label
    for m in model.modules():
        if isinstance(m, LabelEmbedding):
            m.dropout_prob = 0.0
    ema = copy.deepcopy(model).requires_grad_(False)
    x, y = load_digits(DEFAULT_SIZE, split="train")
    ddpm = DDPMScheduler(**SCHEDULE)
    snr = ddpm.alphas_cumprod / (1 - ddpm.alphas_cumprod)
    weight = torch.ones_like(snr) if min_snr_gamma is None else snr.clamp(max=min_snr_gamma) / snr
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    params, ema_params = list(model.parameters()), list(ema.parameters())
    model.train()
    t0 = time.perf_counter()
    running, losses = 0.0, []
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        x0, labels = x[idx], y[idx]
        labels = torch.where(torch.rand(batch_size, generator=g) < p_uncond, NULL_CLASS, labels)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, SCHEDULE["num_train_timesteps"], (batch_size,), generator=g)
        pred = model(hidden_states=ddpm.add_noise(x0, noise, t), timestep=t, class_labels=labels,
                     return_dict=False)[0]
        loss = (weight[t] * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr, warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - d)
        running += loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            k = (step % log_every) + 1
            losses.append(running / k)
            log(f"dit step {step + 1}/{steps}: loss {running / k:.4f} ({time.perf_counter() - t0:.0f} s)")
            running = 0.0
            if callback is not None:
                ema.eval()
                callback(step + 1, ema)
    ema.eval()
    metrics = {"seconds": time.perf_counter() - t0, "final_loss": losses[-1], "steps": steps,
               "batch_size": batch_size, "lr": lr, "ema_decay": ema_decay, "p_uncond": p_uncond,
               "min_snr_gamma": min_snr_gamma}
    return ema, metrics


def save_dit(model: nn.Module, out: str, metadata: dict | None = None, *, half: bool = True) -> None:
    """``dit.safetensors`` (fp16 unless ``half=False``; loaded as fp32) and ``dit_config.json``."""
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    dtype = torch.float16 if half else torch.float32
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(out, DIT_WEIGHTS), metadata={k: str(v) for k, v in (metadata or {}).items()})
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    with open(os.path.join(out, DIT_CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def save_classifier(model: nn.Module, out: str, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(out, CLASSIFIER_WEIGHTS),
              metadata={k: str(v) for k, v in (metadata or {}).items()})


__all__ = ["DIT_CONFIG", "init_dit_", "save_classifier", "save_dit", "train_classifier", "train_dit"]
