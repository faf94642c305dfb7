#!/usr/bin/env python
"""Train the demo DiT and the digit classifier of ``viditq_demo.digits`` (CPU, seeded).

    python scripts/train_digits.py --out demo/viditq_demo/digits/assets --seed 0

(with the demo installed: ``make install``, or ``pip install -e demo``).

Writes ``classifier.safetensors``, ``dit.safetensors`` (fp16 weights, loaded as fp32) and
``dit_config.json`` into --out, and prints the training times, final losses, the classifier's
held-out accuracy and the classifier accuracy of FP DiT samples on the requested digit.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from viditq_demo.digits import (
    DEFAULT_GUIDANCE,
    DEFAULT_NUM_STEPS,
    NUM_CLASSES,
    balanced_labels,
    classifier_accuracy,
    sample,
)
from viditq_demo.digits.train import save_classifier, save_dit, train_classifier, train_dit


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (the demo's assets: demo/viditq_demo/digits/assets)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--dit-steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--classifier-epochs", type=int, default=20)
    p.add_argument("--eval-per-class", type=int, default=20, help="FP samples per digit for the accuracy")
    p.add_argument("--num-steps", type=int, default=DEFAULT_NUM_STEPS, help="sampler steps for the evaluation")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()

    clf, cm = train_classifier(seed=a.seed, epochs=a.classifier_epochs)
    save_classifier(clf, a.out, {"seed": a.seed, "epochs": a.classifier_epochs,
                                 "test_accuracy": f"{cm['test_accuracy']:.4f}"})

    dit, dm = train_dit(seed=a.seed, steps=a.dit_steps, batch_size=a.batch_size, lr=a.lr)
    print(f"dit: {dm['seconds']:.1f} s, {dm['steps']} steps of batch {dm['batch_size']}, "
          f"final loss {dm['final_loss']:.4f}")
    # evaluate what ships: the weights rounded to fp16
    dit.load_state_dict({k: v.half().float() for k, v in dit.state_dict().items()})
    t0 = time.perf_counter()
    labels = balanced_labels(a.eval_per_class)
    images = sample(dit, labels, list(range(len(labels))), num_steps=a.num_steps, guidance_scale=a.guidance)
    acc = classifier_accuracy(clf, images, labels)
    with torch.no_grad():
        pred = clf(images).argmax(-1)
    per_class = [(pred[labels == c] == c).float().mean().item() for c in range(NUM_CLASSES)]
    print(f"FP samples: classifier accuracy on the requested digit {acc:.4f} ({len(labels)} samples, "
          f"{a.num_steps} DDIM steps, guidance {a.guidance}; {time.perf_counter() - t0:.1f} s); per digit "
          + " ".join(f"{c}:{v:.2f}" for c, v in enumerate(per_class)))
    save_dit(dit, a.out, {"seed": a.seed, "steps": a.dit_steps, "batch_size": a.batch_size, "lr": a.lr,
                          "final_loss": f"{dm['final_loss']:.4f}", "fp_accuracy": f"{acc:.4f}",
                          "eval": f"{len(labels)} samples, {a.num_steps} steps, guidance {a.guidance}"})
    print(f"total {time.perf_counter() - t_start:.1f} s; wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
