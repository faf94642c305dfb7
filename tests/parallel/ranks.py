"""Run a test body on 2 CPU ranks (gloo on 127.0.0.1, a free port), bounded by a timeout.

``run(fn, *args, timeout=120)`` spawns ``fn(rank, world, out_dir, *args)`` in each process with the
process group initialized; ``fn`` must be a module-level function (spawn pickles it by name). Each
rank may write results under ``out_dir``; an exception in a rank fails the test with its
traceback; a rank still running at the timeout is killed and the test fails.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time

import torch
import torch.multiprocessing as mp

WORLD = 2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out_dir: str, fn, args) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)  # two ranks on two cores
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, out_dir, *args)
        # no rank tears the group down while another's collectives are in flight: a rank that
        # exited with gloo work pending aborted once in CI ("terminate called without an active
        # exception", the context-parallel test under load). Not after an exception: the other
        # rank may never reach the barrier, and the traceback must come back.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(fn, *args, timeout: float = 120.0, world: int = WORLD) -> list[dict]:
    """Run ``fn`` on ``world`` ranks; returns each rank's ``out_dir/rank{r}.pt`` (``torch.save``d
    dict), or ``{}`` for a rank that wrote none."""
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.spawn(_entry, args=(world, free_port(), out_dir, fn, args), nprocs=world, join=False)
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(f"{fn.__name__} on {world} ranks ran past {timeout} s")
        out = []
        for r in range(world):
            path = os.path.join(out_dir, f"rank{r}.pt")
            out.append(torch.load(path, weights_only=True) if os.path.exists(path) else {})
        return out


def save(out_dir: str, rank: int, **values) -> None:
    """Write this rank's results for the parent (plain tensors, numbers, strings)."""
    torch.save(values, os.path.join(out_dir, f"rank{rank}.pt"))
