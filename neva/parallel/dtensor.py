"""DTensor at the checkpoint boundary, and nowhere else.

A flat state dict (``params/<leaf>``, ``optim/<part>/<leaf>``, ...) of local shards becomes DTensors
on this rank's pipeline stage's (dp, ep, cp, tp) sub-mesh with the plan's placements, so
``torch.distributed.checkpoint`` records global shapes and each rank's slice: a checkpoint written
under one layout loads under any other (DCP reshards), or in one process as plain full tensors.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

STAGE_AXES = ("dp", "ep", "cp", "tp")
_PREFIX = re.compile(r"^(params|optim/[^/]+)/(.+)$")


def leaf_of(key: str) -> str | None:
    """The params path a state-dict key stores (``optim/m/llm/...`` -> ``llm/...``), else None."""
    m = _PREFIX.match(key)
    return m.group(2) if m else None


def _placements(place: tuple) -> list:
    return [next((Shard(d) for d, ax in enumerate(place) if ax == axis), Replicate()) for axis in STAGE_AXES]


def global_shape(local: Tensor, place: tuple, mesh: DeviceMesh) -> tuple:
    shape = list(local.shape)
    for d, ax in enumerate(place):
        if ax is not None:
            shape[d] *= mesh.size(mesh.mesh_dim_names.index(ax))
    return tuple(shape)


def wrap(sd: dict, placements: dict[str, tuple], mesh: DeviceMesh | None) -> dict:
    """Local shards -> DTensors on this rank's stage sub-mesh (identity without a mesh). Keys whose
    leaf has no placement (e.g. RNG state, metadata) pass through."""
    if mesh is None:
        return sd
    stage = mesh[STAGE_AXES]
    out = {}
    for k, v in sd.items():
        leaf = leaf_of(k)
        if isinstance(v, Tensor) and leaf in placements:
            place = placements[leaf]
            shape = global_shape(v, place, mesh)
            out[k] = DTensor.from_local(v, stage, _placements(place), run_check=False, shape=torch.Size(shape),
                                        stride=torch.empty(shape, device="meta").stride())
        else:
            out[k] = v
    return out


def unwrap(sd: dict) -> dict:
    """DTensors -> this rank's local shards (other values unchanged)."""
    return {k: (v.to_local() if isinstance(v, DTensor) else v) for k, v in sd.items()}
