"""The family table of the README: every DiT class the tests build, quantized as a user would.

    PYTHONPATH=. .venv/bin/python scripts/family_table.py [--out benchmarks/FAMILIES.md] [NAME ...]

For each tiny seeded model (tests/zoo.py: the five families the tests started with;
tests/diffusers_zoo.py: 21 more diffusers classes) it reports the route (``vq.quantize`` when
``torch.export`` captures the model, else the ``viditq`` torch.compile backend), the linear layers
quantized, the layers kept in floating point and what decided that (the graph's data flow or a
family name), the output SQNR against fp32 at W8A8 and W4A8 (ViDiT-Q balancing, calibrated on 4
calls) and at W4A8 without balancing (``w4a8-dynamic``), and which of three latent sizes and
batch sizes 2 and 3 the quantized model runs. Seeded: the same command prints the same table.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import torch

import viditq_compile as vq
from tests import diffusers_zoo, zoo
from viditq_compile.graph.capture import CaptureError
from viditq_compile.graph.modules import linear_layers
from viditq_compile.numerics.quant import sqnr_db


def _builder(name: str):
    if name in diffusers_zoo.ZOO:
        return diffusers_zoo.ZOO[name], diffusers_zoo.SIZES[name], diffusers_zoo.KEEP_FP[name]
    return zoo.ZOO[name], [None], zoo.KEEP_FP[name]


def _inputs(build, seed: int, batch: int = 2, size=None) -> dict:
    kwargs = {"batch": batch} | ({"size": size} if size is not None else {})
    return build(seed=seed, **kwargs)[1]


class _Route:
    """One quantized model: an exported program, or the backend-compiled model."""

    def __init__(self, model, kwargs, recipe, calls):
        self.model, self.recipe = model, recipe
        try:
            self.qm = vq.quantize(model, kwargs=kwargs, recipe=recipe, calibration=calls)
            self.name, self.plan = "export", self.qm.plan
        except CaptureError:
            stats = vq.calibrate(model, calls, progress=False) if calls else None
            options = {"recipe": recipe} | ({"calibration": stats} if stats is not None else {})
            from viditq_compile import backend

            torch._dynamo.reset()
            backend.REPORTS.clear()
            self.qm = torch.compile(model, backend="viditq", options=options)
            self.name = "backend"
            with torch.no_grad():
                self.qm(**kwargs)
            layers = {}
            for report in list(backend.REPORTS):
                layers.update({r.name: r for r in report.rows})
            self.plan = None
            self.rows = layers

    def fp_layers(self) -> dict[str, str]:
        if self.plan is not None:
            return {n: lp.reason or "" for n, lp in self.plan.layers.items() if not lp.quantized}
        return {n: r.note for n, r in self.rows.items() if not r.quantized}

    def seen(self) -> set[str]:
        """The layers the quantized graphs call (export drops dead ones; a backend graph sees
        only what runs)."""
        return set(self.plan.layers) if self.plan is not None else set(self.rows)

    def quantized(self) -> int:
        if self.plan is not None:
            return len(self.plan.quantized)
        return sum(1 for r in self.rows.values() if r.quantized)

    def sqnr(self, kwargs) -> float:
        with torch.no_grad():
            return float(sqnr_db(diffusers_zoo.denoiser_output(self.model(**kwargs)),
                               diffusers_zoo.denoiser_output(self.qm(**kwargs))))


def row(name: str) -> dict:
    build, sizes, keep = _builder(name)
    model, kwargs = build(seed=0)
    calls = [((), _inputs(build, seed)) for seed in range(1, 5)]
    w8 = _Route(model, kwargs, "w8a8", None)
    fp = w8.fp_layers()
    linears = set(linear_layers(model))  # nn.Linear and 1x1 convolutions, as the quantizer counts them
    runs = []
    for size in sizes:
        for batch in (2, 3):
            try:
                w8.sqnr(_inputs(build, 7, batch, size))
                runs.append(f"{'x'.join(map(str, size)) if size else 'default'}/b{batch}")
            except Exception as e:  # recorded: the table says which shapes the program refuses
                logging.getLogger(__name__).info("%s at %s batch %d: %s", name, size, batch, e)
    w4 = _Route(model, kwargs, "w4a8", calls)
    w4d = _Route(model, kwargs, "w4a8-dynamic", None)
    return {
        "name": name,
        "class": type(model).__name__,
        "route": w8.name,
        "quantized": f"{w8.quantized()}/{len(linears)}",
        "fp_graph": sum(1 for r in fp.values() if r.startswith("kept by the graph")),
        "fp_name": sum(1 for r in fp.values() if r.startswith("kept by name")),
        "fp_as_expected": set(fp) == set(keep) & w8.seen(),
        "w8a8": w8.sqnr(kwargs),
        "w4a8": w4.sqnr(kwargs),
        "w4a8_dynamic": w4d.sqnr(kwargs),
        "shapes": f"{len(runs)}/{2 * len(sizes)}",
        "refused": [f"{'x'.join(map(str, s)) if s else 'default'}/b{b}" for s in sizes for b in (2, 3)
                    if f"{'x'.join(map(str, s)) if s else 'default'}/b{b}" not in runs],
    }


HEADER = ("| class | route | quantized | FP: graph / name | FP = expected | W8A8 dB | W4A8 dB | "
          "W4A8 unbalanced dB | shapes run | refused |\n|---|---|---|---|---|---|---|---|---|---|")


def markdown(r: dict) -> str:
    return (f"| {r['class']} | {r['route']} | {r['quantized']} | {r['fp_graph']} / {r['fp_name']} | "
            f"{'yes' if r['fp_as_expected'] else 'NO'} | {r['w8a8']:.1f} | {r['w4a8']:.1f} | "
            f"{r['w4a8_dynamic']:.1f} | {r['shapes']} | {', '.join(r['refused']) or '-'} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help="zoo names (default: all)")
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    names = a.names or [*zoo.ZOO, *diffusers_zoo.ZOO]
    lines = [HEADER]
    print(HEADER, flush=True)
    for name in names:
        t = time.time()
        try:
            line = markdown(row(name))
        except Exception as e:  # one broken class must not hide the others' rows
            line = f"| {name} | ERROR | {type(e).__name__}: {str(e).splitlines()[0][:120]} |"
        lines.append(line)
        print(line, f"<!-- {time.time() - t:.0f} s -->", flush=True)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
