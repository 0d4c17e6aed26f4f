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
  gather_kv         all-gather      / reduce-scatter (CP: every rank's keys and values, in sequence order)
  gather_frames     all-gather      / keep own share over tp, reduce-scatter over cp (frame-parallel media)

Context parallelism (``cp``): the sequence is cut into 2 x cp chunks and rank i holds chunks i and
2cp-1-i (Megatron's causal load balancing: every rank gets one early and one late chunk, so the
causal attention work is even). ``cp_local`` takes those chunks of a whole sequence (its backward
puts the gradient back at those positions, zeros elsewhere: the ranks' parts are summed with the
gradients); attention gathers every rank's keys and values (``gather_kv``).

``counting()`` records the bytes each collective moves, by mesh axis and kind, for the planner's
check (``neva.planner``): the payload a rank hands to the collective (the tensor reduced, the
tensor gathered into, the rows sent), not the wire bytes of an algorithm.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import contextlib

import torch
import torch.distributed as tdist
from torch import Tensor

Group = Any  # a torch.distributed ProcessGroup, or None for "not sharded"


@dataclass(frozen=True)
class Dist:
    """Who this rank is on each mesh axis: what every model function takes. A size-1 axis has group
    None (no communication). The parallel plan fills it (``neva.parallel``); ``LOCAL`` is one process.

    ``sp``: sequence parallel over the tp group, for the parts named in ``sp_parts`` (their
    activations outside TP regions are split along T). ``cp``: context parallel, the sequence of
    the parts in ``cp_parts`` split over the cp group (chunks i and 2cp-1-i). ``replicate``: parts
    the plan keeps whole on every tp rank; they run with tp off. ``frame_parts``: parts that run on
    a share of the media (frame-parallel over the cp x tp ranks, which hold the same samples).
    ``part(name)`` gives the Dist a top-level part runs with.
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
    cp: Group = None
    cp_size: int = 1
    cp_rank: int = 0
    sp: bool = False
    sp_parts: frozenset = field(default_factory=frozenset)
    cp_parts: frozenset = field(default_factory=frozenset)
    replicate: frozenset = field(default_factory=frozenset)
    frame_parts: frozenset = field(default_factory=frozenset)
    # dp x ep: the ranks that see different data and share every non-expert parameter
    data: Group = None
    data_size: int = 1
    data_rank: int = 0
    mesh: Any = None          # the (pp, dp, ep, cp, tp) DeviceMesh, for checkpoints (DTensor boundary)

    def part(self, name: str) -> "Dist":
        """The Dist the top-level part ``name`` runs with: SP only if the plan runs it sequence
        parallel, CP only if its sequence is split over cp, no TP if the plan replicates it."""
        d = self if (not self.sp or name in self.sp_parts) else replace(self, sp=False)
        if d.cp is not None and name not in self.cp_parts:
            d = replace(d, cp=None, cp_size=1, cp_rank=0)
        return replace(d, tp=None, tp_size=1, tp_rank=0, sp=False) if name in self.replicate else d


LOCAL = Dist()


def _size(group: Group) -> int:
    return 1 if group is None else tdist.get_world_size(group)


# ------------------------------------------------------------------------- counting the bytes
_AXIS_OF: dict[int, str] = {}     # id(group) -> mesh axis name (``name_group``)
_COUNTS: list[dict] = []          # open ``counting()`` records


def name_group(group: Group, axis: str) -> None:
    """Tell ``counting`` which mesh axis (or flattened axes, e.g. "data") a group is."""
    if group is not None:
        _AXIS_OF[id(group)] = axis


def _count(group: Group, kind: str, x: Tensor) -> None:
    if _COUNTS and group is not None:
        key = (_AXIS_OF.get(id(group), "world"), kind)
        n = x.numel() * x.element_size()
        for c in _COUNTS:
            c[key] = c.get(key, 0) + n


@contextlib.contextmanager
def counting():
    """Record the payload bytes of every collective inside: yields {(axis, kind): bytes}, where kind
    is all_reduce (the tensor reduced), all_gather (the gathered result), reduce_scatter (its
    input), all_to_all (the rows this rank sends), send, broadcast."""
    rec: dict = {}
    _COUNTS.append(rec)
    try:
        yield rec
    finally:
        _COUNTS.remove(rec)


def _all_reduce(x: Tensor, group: Group, op=tdist.ReduceOp.SUM) -> Tensor:
    x = x.contiguous().clone()
    _count(group, "all_reduce", x)
    tdist.all_reduce(x, op=op, group=group)
    return x


def _all_gather(x: Tensor, dim: int, group: Group) -> Tensor:
    n = _size(group)
    x0 = x.movedim(dim, 0).contiguous()
    out = x0.new_empty((n * x0.shape[0],) + tuple(x0.shape[1:]))
    _count(group, "all_gather", out)
    tdist.all_gather_single(out, x0, group=group)
    # contiguous once here: every linear that reads the gathered sequence then saves this one copy
    return out.movedim(0, dim).contiguous()


def _split(x: Tensor, dim: int, group: Group, rank) -> Tensor:
    """This rank's chunk along ``dim``. ``rank`` comes from the Dist (not the group) so that a
    simulated world (LocalTensorMode, where it is a per-rank SymInt) slices per rank."""
    n = _size(group)
    if x.shape[dim] % n:
        raise ValueError(f"sequence split: dim {dim} of size {x.shape[dim]} does not divide by {n} ranks")
    step = x.shape[dim] // n
    return x.narrow(dim, rank * step, step).contiguous()


def _reduce_scatter(x: Tensor, dim: int, group: Group, rank) -> Tensor:
    _count(group, "reduce_scatter", x)
    if tdist.get_backend(group) == "nccl":
        n = _size(group)
        x0 = x.movedim(dim, 0).contiguous()
        out = x0.new_empty((x0.shape[0] // n,) + tuple(x0.shape[1:]))
        tdist.reduce_scatter_single(out, x0, group=group)
        return out.movedim(0, dim)
    # gloo has no reduce-scatter: all-reduce, keep our chunk (same numbers, more bytes on the wire)
    y = x.contiguous().clone()
    tdist.all_reduce(y, group=group)
    return _split(y, dim, group, rank)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(x, group):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx, g):                # the partner Function, so vmap of grad takes its vmap rule
        return _ReduceFromTP.apply(g, ctx.group), None

    @staticmethod
    def vmap(info, in_dims, x, group):
        return _CopyToTP.apply(x, group), in_dims[0]


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(x, group):
        return _all_reduce(x, group)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx, g):
        return _CopyToTP.apply(g, ctx.group), None

    @staticmethod
    def vmap(info, in_dims, x, group):
        return _ReduceFromTP.apply(x, group), in_dims[0]


def _bdim_first(x: Tensor, bdim: int | None, dim: int) -> tuple[Tensor, int]:
    """Move a vmap batch dim to 0; return the tensor and the data dim shifted past it."""
    if bdim is None:
        return x, dim
    x = x.movedim(bdim, 0)
    return x, (dim + 1 if dim >= 0 else dim)


def _seq_function(name: str, fwd) -> type:
    """An autograd Function moving activations along a sequence dim: ``fwd(x, dim, group, rank)`` in
    the forward; its backward is its ``partner`` Function (``_pair``), so the backward has a vmap rule
    too (vmap of grad); its vmap rule moves the vmapped dim first."""

    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(x, dim, group, rank):
            return fwd(x, dim, group, rank)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.dim, ctx.group, ctx.rank = inputs[1], inputs[2], inputs[3]

        @staticmethod
        def backward(ctx, g):
            return Fn.partner.apply(g, ctx.dim, ctx.group, ctx.rank), None, None, None

        @staticmethod
        def vmap(info, in_dims, x, dim, group, rank):
            x, d = _bdim_first(x, in_dims[0], dim)
            return Fn.apply(x, d, group, rank), (None if in_dims[0] is None else 0)

    Fn.__name__ = Fn.__qualname__ = name
    return Fn


def _gather(x: Tensor, dim: int, group: Group, rank) -> Tensor:
    return _all_gather(x, dim, group)


def _pair(a: type, b: type) -> None:
    a.partner, b.partner = b, a


_GatherSeq = _seq_function("_GatherSeq", _gather)                 # all-gather / reduce-scatter
_ReduceScatterSeq = _seq_function("_ReduceScatterSeq", _reduce_scatter)
_ScatterSeq = _seq_function("_ScatterSeq", _split)                # take own chunk / all-gather
# gather a replicated computation's shares: each rank's gradient of the whole is whole already
_GatherShares = _seq_function("_GatherShares", _gather)
_pair(_GatherSeq, _ReduceScatterSeq)
_pair(_ScatterSeq, _GatherShares)


def _all_to_all_rows(x: Tensor, send: tuple, recv: tuple, group: Group) -> Tensor:
    if all(isinstance(s, int) for s in send + recv):
        out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
        _count(group, "all_to_all", x)
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
    _count(group, "all_to_all", counts)
    tdist.all_to_all_single(out, counts.contiguous(), group=group)
    return out


def all_reduce_(x: Tensor, group: Group, op: str = "sum") -> Tensor:
    """In-place, no autograd (gradients, statistics). ``op``: sum | max | avg (sum / size)."""
    if group is None:
        return x
    red = {"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX, "avg": tdist.ReduceOp.SUM}[op]
    _count(group, "all_reduce", x)
    tdist.all_reduce(x, op=red, group=group)
    if op == "avg":
        x.div_(_size(group))
    return x


def all_gather_nograd(x: Tensor, group: Group, dim: int = 0) -> Tensor:
    """Every rank's ``x`` concatenated along ``dim`` in rank order (values only: a vocab-sharded
    logits row made whole for sampling)."""
    return x if group is None else _all_gather(x.detach(), dim, group)


def broadcast_(x: Tensor, group: Group, src: int = 0) -> Tensor:
    """In place, no autograd: ``x`` as the rank ``src`` of ``group`` (a group rank) holds it, on every
    rank of ``group``."""
    if group is None:
        return x
    _count(group, "broadcast", x)
    tdist.broadcast(x, group=group, group_src=src)
    return x


def all_reduce_nograd(x: Tensor, group: Group, op: str = "sum") -> Tensor:
    """Out-of-place all-reduce on a detached copy (values only, e.g. softmax max, token counts)."""
    if group is None:
        return x
    return all_reduce_(x.detach().clone(), group, op)


# ------------------------------------------------------------------------ context parallel
def cp_chunk(T: int, dist: Dist) -> int:
    """Tokens per chunk of a sequence of ``T`` over ``dist.cp_size`` ranks (2 chunks each)."""
    n = 2 * dist.cp_size
    if T % n:
        raise ValueError(f"context parallel: a sequence of {T} tokens does not cut into 2 x cp = {n} chunks "
                         "(model.normalize_batch pads it; pad yours to a multiple of 2 x cp)")
    return T // n


def cp_local(x: Tensor, dist: Dist, dim: int = 1) -> Tensor:
    """This cp rank's part of a whole sequence along ``dim``: chunks i and 2cp-1-i, in that order.
    Not a collective: every cp rank holds the whole input (the gradient outside its chunks is zero
    here and comes from the other ranks when gradients are summed over cp)."""
    if dist.cp is None:
        return x
    c = cp_chunk(x.shape[dim], dist)
    i = dist.cp_rank
    return torch.cat([x.narrow(dim, i * c, c), x.narrow(dim, (2 * dist.cp_size - 1 - i) * c, c)], dim)


def cp_slots(T: int, dist: Dist, device=None) -> Tensor:
    """int[T / cp]: the positions in the whole sequence of this cp rank's tokens (``cp_local`` order)."""
    return cp_local(torch.arange(T, device=device), dist, 0)


def _sequence_order(x: Tensor, dim: int, n: int) -> Tensor:
    """Chunks gathered in rank order (rank i: chunks i, 2n-1-i) -> chunks 0..2n-1 in sequence order."""
    c = x.shape[dim] // (2 * n)
    where = [2 * j if j < n else 2 * (2 * n - 1 - j) + 1 for j in range(2 * n)]
    return torch.cat([x.narrow(dim, w * c, c) for w in where], dim)


def gather_kv(x: Tensor, dist: Dist, dim: int = 2) -> Tensor:
    """Keys or values of this cp rank's tokens -> the whole sequence's, in sequence order (all-gather
    forward; reduce-scatter backward: every rank's queries send gradients to every rank's keys)."""
    if dist.cp is None:
        return x
    return _sequence_order(_GatherSeq.apply(x, dim, dist.cp, dist.cp_rank), dim, dist.cp_size)


# ------------------------------------------------------------------------- frame-parallel media
def frame_share(n: int, dist: Dist) -> tuple[int, int]:
    """(this rank's first media row, rows per rank) when ``n`` rows (padded to a multiple of cp x tp)
    are shared by the ranks that hold the same samples; the share index is cp_rank x tp + tp_rank."""
    g = dist.cp_size * dist.tp_size
    per = -(-n // g)
    return (dist.cp_rank * dist.tp_size + dist.tp_rank) * per, per


def gather_frames(x: Tensor, dist: Dist) -> Tensor:
    """Each rank's share of the media rows (``frame_share``) -> every row, on every rank. Over tp the
    downstream computation is replicated (its gradient arrives whole on each tp rank: keep our
    share); over cp each rank's gradient covers its own tokens only (reduce-scatter sums them)."""
    if dist.tp is not None:
        x = _GatherShares.apply(x, 0, dist.tp, dist.tp_rank)
    if dist.cp is not None:
        x = _GatherSeq.apply(x, 0, dist.cp, dist.cp_rank)
    return x


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
        _count(self.dist.pp, "send", t)
        self.pending.append((tdist.isend(t, dst=to, group=self.dist.pp), t))

    def recv(self, shape: tuple, dtype: torch.dtype, frm: int, device=None) -> Tensor:
        buf = torch.empty(shape, dtype=dtype, device=device)
        tdist.recv(buf, src=frm, group=self.dist.pp)
        return buf

    def finish(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()
