"""Gradient synchronisation across the ranks that share a leaf, in flat buckets.

Each rank computes gradients of its local share of the step's loss (``neva.loss.LossTerms``), so
shared leaves are *summed*. Which groups each leaf sums over is the plan's decision
(``Plan.grad_sums``: the data ranks, and tp for leaves whose gradient each tp rank holds a part of);
this file only moves the bytes: one all-reduce per group and dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor

from neva import comm
from neva.comm import Dist


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


def sync_grads(grads: dict[str, Tensor], sums: dict[str, tuple[str, ...]], dist: Dist) -> dict[str, Tensor]:
    """Sum ``grads`` (flat path -> local shard, in place) over the groups ``sums[path]`` names
    (``Dist`` fields: ``tp``, ``cp``, ``data``, ``dp``)."""
    for axis in ("tp", "cp", "data", "dp"):
        _bucket_all_reduce([g for p, g in grads.items() if axis in sums[p]], getattr(dist, axis))
    return grads
