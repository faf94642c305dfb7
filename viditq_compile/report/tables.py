"""The quantization report: one row per linear layer, what it became or why it did not, and
the convolutions the graph keeps as convolutions (not linears, so floating point), with why.

A layer whose widths change with the timestep shows them per range, lowest timesteps first
(W ``8|4``, A ``8|8``); the summary counts the layers that keep more than one weight version and
the memory those extra versions cost.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

from viditq_compile.config.capabilities import FP8_GEMM_ROUTE, fp8_unsupported_reason, unsupported_reason
from viditq_compile.kernels import onednn_int8
from viditq_compile.ops.schema import ATTENTION, QLINEAR, QLINEAR_TIMESTEP, W8A8_LINEAR


@dataclass(frozen=True)
class LayerReport:
    name: str
    in_features: int
    out_features: int
    weight_bits: int | None
    act_bits: int | None
    op: str
    note: str = ""
    balance: str = ""
    range_widths: tuple = ()
    """``(weight_bits, act_bits, weight_sym)`` per timestep range for a timestep-dispatching
    layer, else ()."""
    extra_weight_bytes: int = 0
    """Bytes of the weight versions this layer keeps beyond its smallest one."""
    number_format: str = "int"
    """``"int"`` or ``"fp8_e4m3"`` (``LayerPlan.number_format``)."""
    cpu_prepacked_bytes: int = 0
    """Bytes of the copy of this layer's weight that the CPU GEMM prepacks at run time
    (``kernels.onednn_int8``: symmetric per-channel int8 weights), else 0."""

    @property
    def quantized(self) -> bool:
        return self.weight_bits is not None

    @property
    def weight_versions(self) -> int:
        if self.range_widths:
            return len({(w, sym) for w, _, sym in self.range_widths})
        return int(self.quantized)

    def widths(self) -> tuple[str, str]:
        """The W and A cells: ``"4"``, ``"8|4|4|4"`` per timestep range, ``"e4m3"``, ``"fp"``."""
        if self.range_widths:
            return "|".join(str(v[0]) for v in self.range_widths), "|".join(str(v[1]) for v in self.range_widths)
        if not self.quantized:
            return "fp", "fp"
        if self.number_format == "fp8_e4m3":
            return "e4m3", "e4m3"
        return str(self.weight_bits), str(self.act_bits)


class Report:
    """Rows in graph order. ``str(report)`` is a table; ``report.records()`` the same as dicts."""

    def __init__(self, rows: Iterable[LayerReport], title: str = "",
                 timestep_bounds: tuple = (), convolutions: Iterable = (), attentions: Iterable = (),
                 shared_gemms: Iterable = ()):
        self.rows = list(rows)
        self.title = title
        self.timestep_bounds = tuple(timestep_bounds)
        self.convolutions = list(convolutions)
        """``graph.sites.KeptConvolution`` (name, weight shape, reason) per convolution the graph
        runs as a convolution, in floating point: not linear layers, so not among ``rows``."""
        self.attentions = list(attentions)
        """``(name, block_q, block_k)`` per attention the program runs as ``viditq.attention``
        (int8 Q·Kᵀ, fp32 softmax, 16-bit P·V: ``passes.quantize_attention.program_attentions``)."""
        self.shared_gemms = [tuple(g) for g in shared_gemms]
        self.cpu_gemm_fallback: str | None = None
        """Why the CPU int8 GEMMs run ``torch._int_mm`` instead of oneDNN
        (``kernels.onednn_int8.unavailable_reason``), when layers that oneDNN would take exist."""
        self.attentions_kept: dict[str, str] = {}
        """Attention -> why it stays SDPA, for the kinds the recipe asks int8 for (``Plan.attention``)."""
        """The layer names of each integer GEMM several layers share (``passes.fuse_qkv``: q / k / v
        reading one activation quantization), in graph order."""

    @property
    def num_quantized(self) -> int:
        return sum(r.quantized for r in self.rows)

    @property
    def num_fp(self) -> int:
        return len(self.rows) - self.num_quantized

    def records(self) -> list[dict]:
        return [asdict(r) for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def num_multi_version(self) -> int:
        """Layers that keep more than one weight version (timestep-dependent weight widths)."""
        return sum(r.weight_versions > 1 for r in self.rows)

    @property
    def extra_weight_bytes(self) -> int:
        return sum(r.extra_weight_bytes for r in self.rows)

    @property
    def cpu_prepacked_bytes(self) -> int:
        """Bytes the CPU GEMM's prepacked weight copies add at run time (``kernels.onednn_int8``)."""
        return sum(r.cpu_prepacked_bytes for r in self.rows)

    def summary(self) -> str:
        text = (f"{self.num_quantized} of {len(self.rows)} linear layers quantized, "
                f"{self.num_fp} kept in floating point")
        if self.convolutions:
            text += f"; {len(self.convolutions)} convolution(s) kept in floating point (not linears)"
        if self.attentions:
            text += f"; {len(self.attentions)} attention(s) quantized (int8 Q·Kᵀ, 16-bit P·V)"
        if self.attentions_kept:
            text += f"; {len(self.attentions_kept)} attention(s) the recipe asks int8 for kept in floating point"
        folded = sum(1 for r in self.rows if r.balance.endswith("folded"))
        if folded:
            text += f"; {folded} out projection(s) with their balancing folded into the value projection"
        if self.shared_gemms:
            text += (f"; {sum(map(len, self.shared_gemms))} quantized layers run as "
                     f"{len(self.shared_gemms)} shared GEMMs (one per activation they read)")
        if self.cpu_gemm_fallback:
            text += (f"; on CPU the int8 GEMMs run torch._int_mm, not oneDNN "
                     f"({self.cpu_gemm_fallback})")
        packed = self.cpu_prepacked_bytes
        if packed:
            layers = sum(1 for r in self.rows if r.cpu_prepacked_bytes)
            text += (f"; on CPU, {layers} int8 layer(s) run oneDNN's GEMM on prepacked weight copies: "
                     f"{packed} bytes ({packed / 2 ** 20:.2f} MiB) beside the program's weights")
        if any(r.range_widths for r in self.rows):
            b = self.timestep_bounds
            ranges = " | ".join([f"t <= {b[0]:g}"] + [f"{lo:g} < t <= {hi:g}" for lo, hi in zip(b, b[1:])]
                                + [f"t > {b[-1]:g}"]) if b else "one range"
            extra = self.extra_weight_bytes
            text += (f"; widths W|A per timestep range ({ranges}); {self.num_multi_version} "
                     f"layer(s) keep more than one weight version: {extra} extra bytes "
                     f"({extra / 2 ** 20:.2f} MiB)")
        return text

    def __str__(self) -> str:
        head = ("layer", "shape (out x in)", "W", "A", "balance", "op", "note")
        body = [(r.name, f"{r.out_features} x {r.in_features}", *r.widths(), r.balance or "-",
                 r.op, r.note) for r in self.rows]
        widths = [max(len(str(c)) for c in col) for col in zip(head, *body)] if body else \
            [len(h) for h in head]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [self.title] if self.title else []
        lines += [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*row) for row in body]
        if self.convolutions:
            lines.append("convolutions kept in floating point:")
            w = max(len(c.name) for c in self.convolutions)
            lines += [f"  {c.name:<{w}}  {' x '.join(map(str, c.weight_shape))}  {c.reason}"
                      for c in self.convolutions]
        if self.attentions:
            lines.append(f"attentions quantized ({ATTENTION.display}: int8 Q·Kᵀ with K mean-subtracted, "
                         "fp32 softmax, 16-bit P·V):")
            w = max(len(name) for name, _, _ in self.attentions)
            lines += [f"  {name:<{w}}  Q / K scales per {bq} / {bk} token(s)" for name, bq, bk in self.attentions]
        if self.attentions_kept:
            lines.append("attentions the recipe asks int8 for, kept in floating point:")
            w = max(len(name) for name in self.attentions_kept)
            lines += [f"  {name:<{w}}  {why}" for name, why in self.attentions_kept.items()]
        if self.shared_gemms:
            lines.append("layers sharing one integer GEMM (weights concatenated along N):")
            lines += [f"  {' + '.join(g)}" for g in self.shared_gemms]
        lines.append(self.summary())
        return "\n".join(lines)

    __repr__ = __str__


def build_report(plan, title: str = "", convolutions: Iterable = (), attentions: Iterable = (),
                 shared_gemms: Iterable = ()) -> Report:
    """The report of a plan as applied by the quantize pass (one row per layer), with the graph's
    ``convolutions`` kept as convolutions (``GraphTensors.kept_convolutions()``)."""
    rows = []
    cpu_route_layers = 0
    tp = getattr(plan, "tensor_parallel", None) or {"shards": 1, "layers": {}}
    for lp in plan.layers.values():
        tp_entry = tp["layers"].get(lp.name)
        if lp.quantized:
            versions = lp.versions()
            asym = [i for i, v in enumerate(versions) if not v[2]]
            notes = []
            if asym:
                notes.append("asymmetric weights" + ("" if len(asym) == len(versions) else
                                                     f" in range(s) {', '.join(map(str, asym))}"))
            if lp.weight_group:
                notes.append(f"group {lp.weight_group}")
            if lp.act_static:
                notes.append("static per-tensor activations")
            if lp.note:
                notes.append(lp.note)
            if tp_entry is not None:
                notes.append(tensor_parallel_note(tp["shards"], tp_entry, lp))
            gemm_reasons = {unsupported_reason(0, lp.out_features, lp.in_features, v[0], lp.weight_group or 0)
                            for v in versions} - {None}
            if lp.fp8:  # ops/cuda.py: the e4m3 kernel where the shape allows, on sm_89+ (else the reference)
                why = fp8_unsupported_reason(0, lp.out_features, lp.in_features)
                gemm_reasons = {why} if why else set()
                if not why:
                    notes.append(FP8_GEMM_ROUTE)
            if gemm_reasons:
                notes.append(f"on CUDA the reference GEMM runs ({'; '.join(sorted(filter(None, gemm_reasons)))})")
            balance = ""
            if lp.balance:
                balance = lp.balance + (f" a={lp.alpha:g}" if lp.alpha is not None else "")
                if lp.balance_folded_into:
                    balance += " per head, folded" if lp.rotation_blocks else ", folded"
                    notes.append(f"balancing folded into {lp.balance_folded_into} (its input arrives balanced)")
            op = W8A8_LINEAR.display if lp.single_op else QLINEAR.display
            range_widths, extra = (), 0
            if lp.timestep_widths is not None:
                op = QLINEAR_TIMESTEP.display
                range_widths = versions
                sizes = [lp.weight_bytes(w, sym) for w, sym in {(v[0], v[2]) for v in versions}]
                extra = sum(sizes) - min(sizes)
            # lowering.inductor._onednn_takes: per channel, int8 symmetric or int4
            takes = (lp.weight_group is None and lp.number_format == "int" and lp.timestep_widths is None
                     and (lp.weight_bits == 4 or (lp.weight_bits == 8 and lp.weight_sym)))
            cpu_route_layers += takes
            prepacked = lp.out_features * lp.in_features if takes and onednn_int8.available() else 0
            rows.append(LayerReport(lp.name, lp.in_features, lp.out_features, lp.weight_bits,
                                    lp.act_bits, op, "; ".join(notes), balance, range_widths,
                                    extra, lp.number_format, prepacked))
        else:
            why = lp.reason or ""
            if tp_entry is not None:
                why = "; ".join(filter(None, [why, tensor_parallel_note(tp["shards"], tp_entry, lp)]))
            rows.append(LayerReport(lp.name, lp.in_features, lp.out_features, None, None,
                                    "aten.linear (fp)", why))
    report = Report(rows, title, getattr(plan, "timestep_bounds", ()), convolutions, attentions, shared_gemms)
    report.attentions_kept = dict((getattr(plan, "attention", None) or {}).get("kept", {}))
    if cpu_route_layers:
        report.cpu_gemm_fallback = onednn_int8.unavailable_reason()
    return report



def tensor_parallel_note(shards: int, entry: dict, lp) -> str:
    """What tensor parallelism over ``shards`` ranks does to one layer (``Plan.tensor_parallel``'s
    entry): column-parallel, row-parallel as it is, or row-parallel with a block-diagonal
    rotation and its measured cost (or "not measured")."""
    head = f"TP {shards}: "
    if entry["style"] == "colwise":
        return head + "column-parallel (N split, numerics unchanged)"
    if not lp.quantized:
        return head + "row-parallel in floating point"
    blocks = entry["rotation_blocks"]
    if not blocks:
        return head + "row-parallel (K split; unsharded codes with policy 'global')"
    k = lp.in_features
    text = head + f"row-parallel, rotation {blocks} x H({k // blocks}) instead of H({k})"
    full, block = entry["sqnr_full_db"], entry["sqnr_block_db"]
    if full is None or block is None:
        return text + ", cost not measured"
    return text + f": SQNR {block:.2f} dB vs {full:.2f} dB full-width ({block - full:+.2f} dB, example call)"
