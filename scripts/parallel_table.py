"""What each route past one GPU changes per PixArt-Σ block, in memory and in communication:
computed from the block's shapes, and measured on 2 gloo CPU ranks by counting the bytes every
collective is handed (a ``TorchDispatchMode`` that sees ``c10d`` / ``_c10d_functional`` ops).

    .venv/bin/python scripts/parallel_table.py                 # measure at 256 tokens, print both tables
    .venv/bin/python scripts/parallel_table.py --tokens 1024   # (sample size 64) slower
    .venv/bin/python scripts/parallel_table.py --no-measure    # the computed table only

The measured model is a one-block ``PixArtTransformer2DModel`` at PixArt-Σ's widths (hidden 1152,
16 heads x 72, MLP 4608, 120 caption tokens, batch 2, learned-sigma output), random weights,
W8A8 (recipe ``w8a8``), fp32 activations on CPU. Routes: sequence parallel (the artifact route,
``sequence_parallel(qm)``), CFG parallel (``cfg_parallel(qm)``), tensor parallel (module form
quantized with ``tensor_parallel=2`` and sharded by ``parallelize`` with the Megatron plan below;
PixArt's ``AttnProcessor2_0`` takes the head count from ``attn.heads``, so each rank sets it to
``heads / 2``). The computed table is for the real block at 4096 tokens in bf16 (2 bytes).
FSDP2 is computed only (its 2-rank tests are in ``tests/parallel/test_fsdp.py``).
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import sys
from collections import defaultdict

import torch
import torch.multiprocessing as mp

HIDDEN, HEADS, HEAD_DIM, MLP, TEXT, BATCH, OUT_CH = 1152, 16, 72, 4608, 120, 2, 8
TP_PLAN = {f"transformer_blocks.*.{a}.{p}": "colwise" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v")}
TP_PLAN.update({"transformer_blocks.*.attn1.to_out.0": "rowwise", "transformer_blocks.*.attn2.to_out.0": "rowwise",
                "transformer_blocks.*.ff.net.0.proj": "colwise", "transformer_blocks.*.ff.net.2": "rowwise"})

# (name, N, K, style) of the 10 linear layers of a block
LAYERS = ([(f"attn1.{p}", HIDDEN, HIDDEN, "colwise") for p in ("to_q", "to_k", "to_v")]
          + [("attn1.to_out.0", HIDDEN, HIDDEN, "rowwise")]
          + [(f"attn2.{p}", HIDDEN, HIDDEN, "colwise") for p in ("to_q", "to_k", "to_v")]
          + [("attn2.to_out.0", HIDDEN, HIDDEN, "rowwise"), ("ff.net.0.proj", MLP, HIDDEN, "colwise"),
             ("ff.net.2", HIDDEN, MLP, "rowwise")])


def weight_bytes(d: int = 1, tp: bool = False) -> int:
    """W8A8 bytes of a block's weights on one rank: int8 N x K + fp32 per-channel scales."""
    total = 0
    for _, n, k, style in LAYERS:
        if not tp:
            total += n * k + 4 * n
        elif style == "colwise":
            total += n * k // d + 4 * n // d
        else:
            total += n * k // d + 4 * n  # row-parallel: every rank keeps all N scales
    return total


def computed(tokens: int, d: int, a: int) -> dict[str, dict]:
    """Per rank, per block: weights, the block input and MLP hidden activations, and the bytes
    handed to each collective (send+receive buffers are about the same size)."""
    x = BATCH * tokens * HIDDEN * a
    hid = BATCH * tokens * MLP * a
    w = weight_bytes()
    rows = {"one process": {"weights": w, "x": x, "mlp": hid, "comm": {}}}
    rows["sequence parallel (Ulysses)"] = {
        "weights": w, "x": x // d, "mlp": hid // d,
        # self-attention: q, k, v to heads and the output back to tokens; cross-attention local
        "comm": {"all_to_all_single": 4 * BATCH * (tokens // d) * HIDDEN * a}}
    rows["CFG parallel"] = {"weights": w, "x": x // d, "mlp": hid // d, "comm": {}}
    # row-parallel layers (attn1.to_out, attn2.to_out, ff.net.2): MAX of the per-token absmax (fp32)
    # then SUM of the int32 partial GEMM (symmetric weights: no zero-point row sums)
    rows["tensor parallel (row layers int32)"] = {
        "weights": weight_bytes(d, tp=True), "x": x, "mlp": hid // d,
        "comm": {"allreduce_": 3 * (BATCH * tokens * 4 + BATCH * tokens * HIDDEN * 4)}}
    # the block's parameters, sharded at rest, all-gathered before it runs: the int8 weights, their
    # fp32 scales (Parameters after fsdp.prepare), the biases and the adaLN table in the model dtype
    params = w + sum(n for _, n, _, _ in LAYERS) * a + 6 * HIDDEN * a
    rows["FSDP2 (+ batch split)"] = {"weights": w // d, "x": x // d, "mlp": hid // d,
                                     "comm": {"all_gather_into_tensor": params // d}}
    return rows


def per_call(tokens: int, d: int, a: int) -> dict[str, dict[str, int]]:
    """Collectives once per model call (not per block): SP's and CFG's output gathers."""
    out = BATCH * OUT_CH * tokens * 4 * a  # learned sigma: 8 channels x (2x2 patch) per token
    return {"sequence parallel (Ulysses)": {"all_gather_into_tensor": out // d},
            "CFG parallel": {"all_gather_into_tensor": out // d}}


# --------------------------------------------------------------------------------------- measuring
def _counter():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Bytes(TorchDispatchMode):
        """Bytes of the tensors handed to each collective op on this rank."""

        def __init__(self):
            super().__init__()
            self.bytes: dict[str, int] = defaultdict(int)
            self.calls: dict[str, int] = defaultdict(int)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split(".")[0]
            if func.namespace in ("c10d", "_c10d_functional") and name not in ("wait_tensor", "_wrap_tensor_autograd"):
                # c10d._allgather_base_(output, input): count the input, as for the functional ops
                first = args[1] if name == "_allgather_base_" else (args[0] if args else None)
                name = "all_gather_into_tensor" if name == "_allgather_base_" else name
                ts = first if isinstance(first, (list, tuple)) else [first]
                self.bytes[name] += sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))
                self.calls[name] += 1
            return func(*args, **(kwargs or {}))

    return Bytes()


def _model(tokens: int):
    from diffusers import PixArtTransformer2DModel

    side = int(round(tokens ** 0.5)) * 2
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4,
                                     out_channels=OUT_CH, num_layers=1, cross_attention_dim=HIDDEN, sample_size=side,
                                     patch_size=2, caption_channels=HIDDEN, use_additional_conditions=False,
                                     norm_elementwise_affine=False, norm_eps=1e-6).eval()
    g = torch.Generator().manual_seed(1)
    kwargs = {"hidden_states": torch.randn(BATCH, 4, side, side, generator=g),
              "encoder_hidden_states": torch.randn(BATCH, TEXT, HIDDEN, generator=g),
              "timestep": torch.randint(0, 1000, (BATCH,), generator=g),
              "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}, "return_dict": False}
    return model, kwargs


def _worker(rank: int, world: int, port: int, tokens: int, out_path: str) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        import viditq_compile as vq
        from viditq_compile import module_form as mf
        from viditq_compile.parallel import cfg, sequence
        from viditq_compile.parallel import tensor as tp

        model, kwargs = _model(tokens)
        qm = vq.quantize(copy.deepcopy(model), (), kwargs, recipe="w8a8")
        with torch.no_grad():
            one = qm(**kwargs)[0]
        res: dict = {}
        sp = sequence.sequence_parallel(qm)
        with torch.no_grad(), _counter() as c:
            y = sp(**kwargs)[0]
        res["sequence parallel (Ulysses)"] = (dict(c.bytes), dict(c.calls), float((y - one).abs().max()))
        cfg.cfg_parallel(qm)
        with torch.no_grad(), _counter() as c:
            y = qm(**kwargs)[0]
        res["CFG parallel"] = (dict(c.bytes), dict(c.calls), float((y - one).abs().max()))
        cfg.remove_cfg_parallel(qm)
        mod = copy.deepcopy(model)
        mf.quantize_modules(mod, (), kwargs, recipe="w8a8", tensor_parallel=world, tp_plan=TP_PLAN)
        with torch.no_grad():
            one_mod = mod(**kwargs)[0]
        tp.parallelize(mod, init_device_mesh("cpu", (world,)), TP_PLAN)
        for m in mod.modules():  # AttnProcessor2_0 reads the head count from attn.heads
            if type(m).__name__ == "Attention":
                m.heads //= world
        with torch.no_grad(), _counter() as c:
            y = mod(**kwargs)[0]
        res["tensor parallel (row layers int32)"] = (dict(c.bytes), dict(c.calls), float((y - one_mod).abs().max()))
        from torch.distributed.fsdp import fully_shard

        from viditq_compile.parallel import fsdp

        mod = copy.deepcopy(model)
        mf.quantize_modules(mod, (), kwargs, recipe="w8a8")
        with torch.no_grad():
            one_mod = mod(**kwargs)[0]
        fsdp.prepare(mod)
        fully_shard(mod.transformer_blocks[0], mesh=init_device_mesh("cpu", (world,)))  # the block only
        mine = {k: (v[rank:rank + 1] if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        with torch.no_grad(), _counter() as c:
            y = mod(**mine)[0]
        res["FSDP2 (+ batch split)"] = (dict(c.bytes), dict(c.calls), float((y - one_mod[rank:rank + 1]).abs().max()))
        if rank == 0:
            torch.save(res, out_path)
    finally:
        dist.destroy_process_group()


def measure(tokens: int, world: int = 2) -> dict:
    import tempfile

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "res.pt")
        mp.spawn(_worker, args=(world, port, tokens, path), nprocs=world, join=True)
        return torch.load(path, weights_only=False)


# ---------------------------------------------------------------------------------------- printing
def _mb(b: float) -> str:
    return f"{b / 2 ** 20:.2f}"


def table(tokens: int, d: int, a: int, measured: dict | None = None) -> str:
    rows, calls = computed(tokens, d, a), per_call(tokens, d, a)
    head = [f"route (degree {d})", "weights MiB", "block input MiB", "MLP hidden MiB",
            "per block: collective, MiB per rank", "per call"]
    if measured is not None:
        head += ["measured, whole call (MiB per rank)", "max abs diff vs 1 process"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for route, r in rows.items():
        comm = ", ".join(f"{k} {_mb(v)}" for k, v in r["comm"].items()) or "none"
        pc = ", ".join(f"{k} {_mb(v)}" for k, v in calls.get(route, {}).items()) or "none"
        cells = [route, _mb(r["weights"]), _mb(r["x"]), _mb(r["mlp"]), comm, pc]
        if measured is not None:
            m = measured.get(route)
            if m is None:
                cells += ["not measured", "-"]
            else:
                got, n, diff = m
                cells += [", ".join(f"{k} {_mb(v)} ({n[k]} calls)" for k, v in got.items()) or "none",
                          f"{diff:.2e}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=256, help="image tokens of the measured model (a square)")
    ap.add_argument("--no-measure", action="store_true")
    args = ap.parse_args(argv)
    side = int(round(args.tokens ** 0.5))
    if args.tokens < 4 or side * side != args.tokens or side % 2:
        ap.error(f"--tokens must be an even square (256, 1024, 4096), got {args.tokens}")
    print(f"PixArt-Σ block, 4096 tokens, batch {BATCH}, bf16 activations, W8A8, degree 2 (computed):\n")
    print(table(4096, 2, 2))
    if not args.no_measure:
        got = measure(args.tokens)
        print(f"\nmeasured on 2 gloo CPU ranks: one block, {args.tokens} tokens, batch {BATCH}, fp32 activations, "
              f"W8A8 (computed columns for the same shapes):\n")
        print(table(args.tokens, 2, 4, got))
        for route, (b, _, _) in got.items():
            want = computed(args.tokens, 2, 4)[route]["comm"]
            calls = per_call(args.tokens, 2, 4).get(route, {})
            block = {k: v for k, v in b.items() if k not in calls}
            if block != want:
                print(f"MISMATCH {route}: measured {block}, computed {want}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
