"""The device mesh: (pp, dp, ep, cp, tp) over torch.distributed, built from what torchrun sets.

One node:   torchrun --nproc_per_node 4 experiments/siglip_mixtral.py parallel.tp=2 parallel.pp=2
Many nodes: torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 ...
Slurm:      srun --nodes 2 --ntasks-per-node 1 torchrun --nnodes 2 --nproc_per_node 8 \\
                --rdzv_backend c10d --rdzv_endpoint $(scontrol show hostnames | head -n1):29500 ...
gloo on CPU, NCCL on GPU. A size-1 axis gets no group at all (its collectives vanish).
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as tdist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from neva import comm
from neva.comm import Dist
from neva.parallel.plan import AXES, Layout


def launched() -> bool:
    """True under torchrun (or any launcher that sets the env:// variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_process_group(backend: str | None = None, timeout_s: int = 600) -> None:
    if tdist.is_initialized():
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    tdist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def build(layout: Layout, device_type: str | None = None) -> tuple[Dist, DeviceMesh | None]:
    """The Dist of this rank for ``layout`` over the initialised default group (or a single
    process when nothing is initialised and the layout is 1 everywhere)."""
    if not tdist.is_initialized():
        if layout.world != 1:
            raise RuntimeError(f"layout {layout} needs {layout.world} processes: launch with "
                               f"torchrun --nproc_per_node {layout.world} ...")
        return Dist(), None
    world = tdist.get_world_size()
    if world != layout.world:
        raise ValueError(f"layout {layout} needs {layout.world} processes, but the world has {world}")
    device_type = device_type or ("cuda" if tdist.get_backend() == "nccl" else "cpu")
    mesh = init_device_mesh(device_type, tuple(layout.size(a) for a in AXES), mesh_dim_names=AXES)
    # coordinates from the mesh, not the global rank: in a simulated world (LocalTensorMode) they are
    # per-rank SymInts, so the same code slices per rank
    coords = {a: mesh.get_local_rank(a) for a in AXES}

    def group(axis: str):
        g = mesh.get_group(axis) if layout.size(axis) > 1 else None
        comm.name_group(g, axis)
        return g

    groups = {a: group(a) for a in AXES}
    data = None
    if layout.dp * layout.ep > 1:
        data = mesh["dp", "ep"]._flatten("data").get_group() if layout.dp > 1 and layout.ep > 1 else (
            groups["dp"] or groups["ep"])
        if layout.dp > 1 and layout.ep > 1:
            comm.name_group(data, "data")
    dist = Dist(tp=groups["tp"], tp_size=layout.tp, tp_rank=coords["tp"],
                ep=groups["ep"], ep_size=layout.ep, ep_rank=coords["ep"],
                dp=groups["dp"], dp_size=layout.dp, dp_rank=coords["dp"],
                pp=groups["pp"], pp_size=layout.pp, pp_rank=coords["pp"],
                cp=groups["cp"], cp_size=layout.cp, cp_rank=coords["cp"],
                sp=layout.sp and layout.tp > 1, data=data, data_size=layout.dp * layout.ep,
                data_rank=layout.data_index(coords), mesh=mesh)
    return dist, mesh
