"""Collectives as autograd Functions, with Megatron's forward/backward pairing.

Model code is written once, over local shards, and calls these explicitly; each is the identity when
its group is None, so the single-process run is the same code. They are ``torch.autograd.Function``s
with ``setup_context`` and a ``vmap`` rule, so they work under plain autograd and under
``torch.func.grad`` / ``vmap`` (``torch.distributed.nn.functional`` and ``_functional_collectives``
do not, and a raw in-place all-reduce has an identity backward).

Pairs (forward / backward):
  copy_to_tp        identity        / all-reduce     (enter a column-parallel region, no SP)
  reduce_from_tp    all-reduce      / identity       (leave a row-parallel region, no SP)
  gather_seq        all-gather      / reduce-scatter (enter a TP region from SP, activations)
  reduce_scatter_seq reduce-scatter / all-gather     (leave a TP region into SP)
  scatter_seq       take own chunk  / all-gather     (replicated -> SP)
  all_to_all        all-to-all      / all-to-all with the splits swapped (EP dispatch)
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as tdist
from torch import Tensor

Group = Any  # a torch.distributed ProcessGroup, or None for "not sharded"


@dataclass(frozen=True)
class Dist:
    """Who this rank is on each mesh axis: what every model function takes. A size-1 axis has group
    None (no communication). The parallel plan fills it (``neva.parallel``); ``LOCAL`` is one process.

    ``sp``: sequence parallel over the tp group, for the parts named in ``sp_parts`` (their
    activations outside TP regions are split along T). ``replicate``: parts the plan keeps whole on
    every tp rank; they run with tp off. ``part(name)`` gives the Dist a top-level part runs with.
    """

    tp: Group = None
    tp_size: int = 1
    tp_rank: int = 0
    ep: Group = None
    ep_size: int = 1
    ep_rank: int = 0
    dp: Group = None
    dp_size: int = 1
    dp_rank: int = 0
    pp: Group = None
    pp_size: int = 1
    pp_rank: int = 0
    sp: bool = False
    sp_parts: frozenset = field(default_factory=frozenset)
    replicate: frozenset = field(default_factory=frozenset)
    # dp x ep: the ranks that see different data and share every non-expert parameter
    data: Group = None
    data_size: int = 1
    data_rank: int = 0
    mesh: Any = None          # the (pp, dp, ep, tp) DeviceMesh, for checkpoints (DTensor boundary)

    def part(self, name: str) -> "Dist":
        """The Dist the top-level part ``name`` runs with: SP only if the plan runs it sequence
        parallel, no TP if the plan replicates it."""
        d = self if (not self.sp or name in self.sp_parts) else replace(self, sp=False)
        return replace(d, tp=None, tp_size=1, tp_rank=0, sp=False) if name in self.replicate else d


LOCAL = Dist()


def _size(group: Group) -> int:
    return 1 if group is None else tdist.get_world_size(group)


def _all_reduce(x: Tensor, group: Group, op=tdist.ReduceOp.SUM) -> Tensor:
    x = x.contiguous().clone()
    tdist.all_reduce(x, op=op, group=group)
    return x


def _all_gather(x: Tensor, dim: int, group: Group) -> Tensor:
    n = _size(group)
    x0 = x.movedim(dim, 0).contiguous()
    out = x0.new_empty((n * x0.shape[0],) + tuple(x0.shape[1:]))
    tdist.all_gather_single(out, x0, group=group)
    return out.movedim(0, dim)


def _split(x: Tensor, dim: int, group: Group, rank) -> Tensor:
    """This rank's chunk along ``dim``. ``rank`` comes from the Dist (not the group) so that a
    simulated world (LocalTensorMode, where it is a per-rank SymInt) slices per rank."""
    n = _size(group)
    if x.shape[dim] % n:
        raise ValueError(f"sequence split: dim {dim} of size {x.shape[dim]} does not divide by {n} ranks")
    step = x.shape[dim] // n
    return x.narrow(dim, rank * step, step).contiguous()


def _reduce_scatter(x: Tensor, dim: int, group: Group, rank) -> Tensor:
    if tdist.get_backend(group) == "nccl":
        n = _size(group)
        x0 = x.movedim(dim, 0).contiguous()
        out = x0.new_empty((x0.shape[0] // n,) + tuple(x0.shape[1:]))
        tdist.reduce_scatter_single(out, x0, group=group)
        return out.movedim(0, dim)
    # gloo has no reduce-scatter: all-reduce, keep our chunk (same numbers, more bytes)
    return _split(_all_reduce(x, group), dim, group, rank)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(x, group):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None

    @staticmethod
    def vmap(info, in_dims, x, group):
        return _CopyToTP.apply(x, group), in_dims[0]


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(x, group):
        return _all_reduce(x, group)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g, None

    @staticmethod
    def vmap(info, in_dims, x, group):
        return _ReduceFromTP.apply(x, group), in_dims[0]


def _bdim_first(x: Tensor, bdim: int | None, dim: int) -> tuple[Tensor, int]:
    """Move a vmap batch dim to 0; return the tensor and the data dim shifted past it."""
    if bdim is None:
        return x, dim
    x = x.movedim(bdim, 0)
    return x, (dim + 1 if dim >= 0 else dim)


def _seq_function(name: str, fwd, bwd) -> type:
    """An autograd Function moving activations along a sequence dim: ``fwd(x, dim, group, rank)`` in
    the forward, ``bwd(g, dim, group, rank)`` in the backward; its vmap rule moves the vmapped dim first."""

    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(x, dim, group, rank):
            return fwd(x, dim, group, rank)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.dim, ctx.group, ctx.rank = inputs[1], inputs[2], inputs[3]

        @staticmethod
        def backward(ctx, g):
            return bwd(g, ctx.dim, ctx.group, ctx.rank), None, None, None

        @staticmethod
        def vmap(info, in_dims, x, dim, group, rank):
            x, d = _bdim_first(x, in_dims[0], dim)
            return Fn.apply(x, d, group, rank), (None if in_dims[0] is None else 0)

    Fn.__name__ = Fn.__qualname__ = name
    return Fn


def _gather(x: Tensor, dim: int, group: Group, rank) -> Tensor:
    return _all_gather(x, dim, group)


_GatherSeq = _seq_function("_GatherSeq", _gather, _reduce_scatter)
_ReduceScatterSeq = _seq_function("_ReduceScatterSeq", _reduce_scatter, _gather)
_ScatterSeq = _seq_function("_ScatterSeq", _split, _gather)


def _all_to_all_rows(x: Tensor, send: tuple, recv: tuple, group: Group) -> Tensor:
    if all(isinstance(s, int) for s in send + recv):
        out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
        tdist.all_to_all_single(out, x.contiguous(), list(recv), list(send), group=group)
        return out
    # a simulated world (LocalTensorMode): the splits are per-rank SymInts, which the uneven
    # all_to_all_single cannot take; pad every chunk to the most rows any rank holds, exchange
    # equal chunks, unpad
    n = _size(group)
    rows = torch.ones(x.shape[0], dtype=torch.long).sum().reshape(1)
    m = int(_all_reduce(rows, None, tdist.ReduceOp.MAX).item())  # over the world: one value for all
    chunks = torch.split(x, list(send))
    padded = torch.cat([torch.cat([c, c.new_zeros((m - c.shape[0],) + tuple(c.shape[1:]))]) for c in chunks])
    out = torch.empty_like(padded)
    tdist.all_to_all_single(out, padded.contiguous(), group=group)
    return torch.cat([out[i * m:i * m + recv[i]] for i in range(n)])


class _AllToAll(torch.autograd.Function):
    """Rows of ``x`` [N, ...] go out in chunks of ``send`` rows per rank; ``recv`` rows come back."""

    @staticmethod
    def forward(x, send, recv, group):
        return _all_to_all_rows(x, send, recv, group)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.send, ctx.recv, ctx.group = inputs[1], inputs[2], inputs[3]

    @staticmethod
    def backward(ctx, g):
        return _AllToAll.apply(g, ctx.recv, ctx.send, ctx.group), None, None, None

    @staticmethod
    def vmap(info, in_dims, x, send, recv, group):
        # the splits are the same for every example (a per-example routing has no single split):
        # keep rows first, carry the vmapped dim along as dim 1
        if in_dims[0] is None:
            return _AllToAll.apply(x, send, recv, group), None
        return _AllToAll.apply(x.movedim(in_dims[0], 1), send, recv, group), 1


# ------------------------------------------------------------------------------------ public API
def copy_to_tp(x: Tensor, dist: Dist) -> Tensor:
    return x if dist.tp is None else _CopyToTP.apply(x, dist.tp)


def reduce_from_tp(x: Tensor, dist: Dist) -> Tensor:
    return x if dist.tp is None else _ReduceFromTP.apply(x, dist.tp)


def gather_seq(x: Tensor, dist: Dist, dim: int = 1) -> Tensor:
    return x if dist.tp is None else _GatherSeq.apply(x, dim, dist.tp, dist.tp_rank)


def reduce_scatter_seq(x: Tensor, dist: Dist, dim: int = 1) -> Tensor:
    return x if dist.tp is None else _ReduceScatterSeq.apply(x, dim, dist.tp, dist.tp_rank)


def scatter_seq(x: Tensor, dist: Dist, dim: int = 1) -> Tensor:
    return x if dist.tp is None else _ScatterSeq.apply(x, dim, dist.tp, dist.tp_rank)


def enter_tp(x: Tensor, dist: Dist, dim: int = 1) -> Tensor:
    """Into a column-parallel region: all-gather the sequence under SP, else copy (all-reduce grads)."""
    return gather_seq(x, dist, dim) if dist.sp else copy_to_tp(x, dist)


def exit_tp(x: Tensor, dist: Dist, dim: int = 1) -> Tensor:
    """Out of a row-parallel region: reduce-scatter the sequence under SP, else all-reduce."""
    return reduce_scatter_seq(x, dist, dim) if dist.sp else reduce_from_tp(x, dist)


def all_to_all(x: Tensor, send: list[int], recv: list[int], group: Group) -> Tensor:
    """Uneven all-to-all of rows; backward sends the gradients back the way they came."""
    if group is None:
        return x
    return _AllToAll.apply(x, tuple(send), tuple(recv), group)


def all_to_all_counts(counts: Tensor, group: Group) -> Tensor:
    """Exchange equal-size integer tensors (no autograd): row r of the result came from rank r."""
    if group is None:
        return counts
    out = torch.empty_like(counts)
    tdist.all_to_all_single(out, counts.contiguous(), group=group)
    return out


def all_reduce_(x: Tensor, group: Group, op: str = "sum") -> Tensor:
    """In-place, no autograd (gradients, statistics). ``op``: sum | max | avg (sum / size)."""
    if group is None:
        return x
    red = {"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX, "avg": tdist.ReduceOp.SUM}[op]
    tdist.all_reduce(x, op=red, group=group)
    if op == "avg":
        x.div_(_size(group))
    return x


def all_gather_nograd(x: Tensor, group: Group, dim: int = 0) -> Tensor:
    """Every rank's ``x`` concatenated along ``dim`` in rank order (values only: a vocab-sharded
    logits row made whole for sampling)."""
    return x if group is None else _all_gather(x.detach(), dim, group)


def broadcast_(x: Tensor, group: Group, src: int = 0) -> Tensor:
    """In place, no autograd: ``x`` as global rank ``src`` holds it, on every rank of ``group``."""
    if group is not None:
        tdist.broadcast(x, src=src, group=group)
    return x


def all_reduce_nograd(x: Tensor, group: Group, op: str = "sum") -> Tensor:
    """Out-of-place all-reduce on a detached copy (values only, e.g. softmax max, token counts)."""
    if group is None:
        return x
    return all_reduce_(x.detach().clone(), group, op)


class P2P:
    """Point-to-point with the neighbouring stages of this rank's pipeline (``prev``/``next``: global
    ranks, None at the ends). Not autograd: the pipeline schedule sends activations forward and their
    gradients back itself, as Megatron's p2p communication does; sends are non-blocking (``finish``
    waits for them), receives blocking."""

    def __init__(self, dist: Dist):
        self.dist, self.pending = dist, []
        pp, r = dist.pp, dist.pp_rank
        self.prev = tdist.get_global_rank(pp, r - 1) if r > 0 else None
        self.next = tdist.get_global_rank(pp, r + 1) if r < dist.pp_size - 1 else None

    def send(self, t: Tensor, to: int) -> None:
        t = t.detach().contiguous()
        self.pending.append((tdist.isend(t, dst=to, group=self.dist.pp), t))

    def recv(self, shape: tuple, dtype: torch.dtype, frm: int, device=None) -> Tensor:
        buf = torch.empty(shape, dtype=dtype, device=device)
        tdist.recv(buf, src=frm, group=self.dist.pp)
        return buf

    def finish(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()
