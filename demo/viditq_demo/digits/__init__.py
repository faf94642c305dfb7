"""A trained demo DiT on the handwritten digits, and a digit classifier to score its samples.

- ``load_digits(size=16)``: ``(images [N, 1, size, size] float32 in [-1, 1], labels [N] int64)``;
- ``load_demo_dit()``: the class-conditional diffusers ``DiTTransformer2DModel`` (eval, fp32);
- ``load_classifier()``: a small CNN, ``forward`` -> logits, ``features`` -> [B, 128];
- ``make_scheduler(num_steps)``: the DDIM sampler; ``sample(transformer, labels, seeds, ...)``;
- ``calibration_calls(n, seed)`` / ``example_call()``: model calls for ``viditq_compile``.

Assets (``assets/``): the data (UCI digits, CC BY 4.0) and both checkpoints, made by
``scripts/train_digits.py --out demo/viditq_demo/digits/assets --seed 0``. ``diffusers`` is needed
for the DiT and the sampler, not for the data or the classifier.
"""

from viditq_demo.digits.classifier import FEATURE_DIM, DigitClassifier
from viditq_demo.digits.data import DEFAULT_SIZE, NULL_CLASS, NUM_CLASSES, load_digits
from viditq_demo.digits.model import DIT_CONFIG, SCHEDULE, classifier_accuracy, load_classifier, load_demo_dit
from viditq_demo.digits.sampling import (
           DEFAULT_GUIDANCE,
           DEFAULT_NUM_STEPS,
           balanced_labels,
           calibration_calls,
           example_call,
           initial_noise,
           make_scheduler,
           sample,
)

__all__ = ["load_digits", "load_demo_dit", "load_classifier", "make_scheduler", "sample", "calibration_calls",
           "example_call", "balanced_labels", "initial_noise", "classifier_accuracy", "DigitClassifier",
           "DIT_CONFIG", "SCHEDULE", "DEFAULT_SIZE", "DEFAULT_NUM_STEPS", "DEFAULT_GUIDANCE", "NUM_CLASSES",
           "NULL_CLASS", "FEATURE_DIM"]
