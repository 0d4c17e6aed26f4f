"""Gradient synchronisation across the ranks that share a leaf, in flat buckets.

Each rank computes gradients of its local loss share (CE normalised by the step's global label
count; MoE losses by the step's global micro-batch count), so shared leaves are *summed*:
  - every leaf over the data ranks that see different samples: dp x ep for non-expert leaves, dp
    for expert leaves (experts already receive every ep rank's tokens through the all-to-all);
  - under SP, LLM leaves not sharded by tp (norms, router) over tp: each tp rank saw only its slice
    of the sequence (Megatron all-reduces these "sequence-parallel" gradients too); so are leaves the
    caller names as tp-partial (LoRA factors of tp-sharded weights), each leaf once.
"""
from __future__ import annotations

import torch
from torch import Tensor

from neva.params import flatten, unflatten
from neva.parallel import comm
from neva.parallel.comm import Dist


def _bucket_all_reduce(tensors: list[Tensor], group) -> None:
    """In-place sum of many tensors with one all-reduce per dtype."""
    if group is None or not tensors:
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for ts in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        comm.all_reduce_(flat, group)
        off = 0
        for t in ts:
            t.copy_(flat[off:off + t.numel()].view_as(t))
            off += t.numel()


def sync_grads(grads: dict, placements: dict[str, tuple], dist: Dist, tp_partial: set[str] = frozenset()) -> dict:
    """Sum ``grads`` (local shards, same tree as the local params) over the ranks sharing them.
    ``tp_partial``: leaves whose gradient each tp rank holds only a part of (e.g. a LoRA factor of a
    tp-sharded weight), summed over tp as well."""
    flat = flatten(grads)
    over_tp = [g for p, g in flat.items()
               if p in tp_partial or (dist.sp and p.startswith("llm/") and "tp" not in placements[p])]
    _bucket_all_reduce(over_tp, dist.tp)
    _bucket_all_reduce([g for p, g in flat.items() if "ep" not in placements[p]], dist.data)
    _bucket_all_reduce([g for p, g in flat.items() if "ep" in placements[p]], dist.dp)
    return unflatten(flat)
