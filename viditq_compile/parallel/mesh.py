"""The process group a parallel route runs over, from what a user passes (a 1-D ``DeviceMesh``, a
``ProcessGroup`` or nothing), checked once so each route states its own requirement."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Group:
    """One communicator: ``group`` (a ``ProcessGroup``), ``size`` (ranks in it) and ``rank`` (this
    process's rank in it)."""

    group: dist.ProcessGroup
    size: int
    rank: int


def resolve_group(mesh, *, what: str) -> Group:
    """The ``Group`` of ``mesh``: a 1-D ``torch.distributed.DeviceMesh``, a ``ProcessGroup``, or
    ``None`` for the default (world) group. ``what`` names the caller in errors. ``RuntimeError``
    when ``torch.distributed`` is not initialized; ``ValueError`` for a mesh of more than one
    dimension (pass the sub-mesh: ``mesh["cfg"]``); ``TypeError`` for anything else."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{what}: torch.distributed is not initialized; call "
                           f"torch.distributed.init_process_group first (gloo on CPU, nccl on CUDA)")
    from torch.distributed.device_mesh import DeviceMesh

    if mesh is None:
        group = dist.group.WORLD
    elif isinstance(mesh, DeviceMesh):
        if mesh.ndim != 1:
            raise ValueError(f"{what}: the device mesh has {mesh.ndim} dimensions "
                             f"{mesh.mesh_dim_names}; pass the 1-D sub-mesh this route runs over")
        group = mesh.get_group()
    elif isinstance(mesh, dist.ProcessGroup):
        group = mesh
    else:
        raise TypeError(f"{what}: mesh must be a 1-D DeviceMesh, a ProcessGroup or None, got "
                        f"{type(mesh).__name__}")
    assert group is not None
    return Group(group, dist.get_world_size(group), dist.get_rank(group))


def shard(x: torch.Tensor, dim: int, g: Group) -> torch.Tensor:
    """This rank's contiguous ``1/size`` slice of ``x`` along ``dim`` (rank order); ``ValueError``
    when ``x.shape[dim]`` does not divide by the group size."""
    n = x.shape[dim]
    if n % g.size:
        raise ValueError(f"dimension {dim} of size {n} does not divide by {g.size} ranks")
    step = n // g.size
    return x.narrow(dim, g.rank * step, step).contiguous()
