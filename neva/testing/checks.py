"""Equivalence of one training step: the real ``compute_grads`` under a plan against the real
``compute_grads`` in one process over the same micro-batches, loss statistics and every gradient."""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as tdist
from torch import Tensor

from neva import comm, llm
from neva.batch import split
from neva.config import ModelConfig
from neva.params import flatten, unflatten
from neva.parallel.plan import Layout
from neva.parallel.runtime import Parallel
from neva.testing.worlds import parallel, value_on
from neva.train.step import compute_grads

STATS = ("loss", "ce", "aux", "z", "n_tokens")


def reference_grads(params: dict, cfg: ModelConfig, batch: dict, n_micro: int, mode: str = "autograd") -> tuple[dict, dict]:
    """One process: the step over ``batch`` cut into ``n_micro`` micro-batches -> (stats, full grads)."""
    grads, stats = compute_grads(params, cfg, split(batch, cfg, n_micro), None, trainable=list(flatten(params)),
                                 mode=mode)
    return stats, unflatten(grads)


def data_shard(par: Parallel, cfg: ModelConfig, batch: dict) -> dict:
    """This rank's rows of a global batch (what its data loader would read)."""
    return split(batch, cfg, par.dist.data_size)[par.dist.data_rank]


def _my_micro_batches(par: Parallel, cfg: ModelConfig, batch: dict, n_micro: int, mode=None) -> list[dict]:
    """This data rank's rows of the global ``batch``, cut into ``n_micro`` micro-batches (in a
    simulated world: per-rank tensors, each rank its own rows)."""
    if mode is None:
        return split(data_shard(par, cfg, batch), cfg, n_micro)
    lay = par.layout
    shards = split(batch, cfg, lay.dp * lay.ep)
    mine = [split(s, cfg, n_micro) for s in shards]
    idx = [lay.data_index(lay.coords(r)) for r in range(lay.world)]

    def per_rank(m: int, k: str):
        if isinstance(mine[0][m][k], dict):                  # pixel_values per tower (kind=fused)
            return {t: mode.rank_map(lambda r, t=t: mine[idx[r]][m][k][t]) for t in mine[0][m][k]}
        return mode.rank_map(lambda r: mine[idx[r]][m][k])
    return [{k: per_rank(m, k) for k in mine[0][m]} for m in range(n_micro)]


def sharded_grads(par: Parallel, params: dict, cfg: ModelConfig, batch: dict, n_micro: int = 1,
                  mode=None, grad_mode: str = "autograd", remat=None) -> tuple[dict, dict]:
    """The step under ``par``: the global ``batch`` split over the data ranks, each rank's share into
    ``n_micro`` micro-batches, the params sharded -> (stats, this rank's gradients, synchronised).
    ``mode``: the LocalTensorMode of a simulated world (None: real processes). ``grad_mode="func"``
    (torch.func.grad) needs real processes: LocalTensors cannot leave C++ under functorch.
    ``remat``: a ``RematPolicy`` for this side (the reference never rematerialises)."""
    if mode is None:
        local = par.shard(params)
    else:                                  # a plain tensor cannot be sliced by a per-rank offset: build each rank's slice
        pl, lay = par.placements(), par.layout
        local = unflatten({p: mode.rank_map(lambda r, t=t, p=p: par.plan.shard_leaf(t, pl[p], lay.coords(r)))
                           for p, t in flatten(params).items()})
    grads, stats = compute_grads(local, cfg, _my_micro_batches(par, cfg, batch, n_micro, mode), par,
                                 trainable=list(flatten(local)), mode=grad_mode, remat=remat)
    return stats, unflatten(grads)


def replica_mismatches(par: Parallel, tree: dict) -> tuple[int, list[str]] | None:
    """A collective over real processes: every rank's copy of every leaf shard (``tree``: this rank's
    local leaves) goes to rank 0, which compares the copies that ranks holding the same shard keep
    (replicas over dp, over tp for replicated leaves, over ep for non-expert leaves) byte for byte.
    -> on rank 0 (number of copies compared with a first copy, [leaves whose copies differ]); None elsewhere."""
    flat = {p: t.detach().contiguous() for p, t in flatten(tree).items()}
    trees = [None] * par.layout.world if par.rank == 0 else None
    tdist.gather_object(flat, trees, dst=0)
    if par.rank != 0:
        return None
    pl, lay = par.placements({p for t in trees for p in t}), par.layout
    first: dict[tuple, tuple[int, Tensor]] = {}
    compared, bad = 0, []
    for r, t in enumerate(trees):
        c = lay.coords(r)
        for p, v in t.items():
            key = (p, tuple(c[ax] for ax in pl[p] if ax))
            if key not in first:
                first[key] = (r, v)
                continue
            r0, v0 = first[key]
            compared += 1
            if v.shape != v0.shape or not torch.equal(v.view(-1).view(torch.uint8), v0.view(-1).view(torch.uint8)):
                bad.append(f"{p} shard {key[1]}: rank {r} differs from rank {r0} "
                           f"(max |diff| {float((v.float() - v0.float()).abs().max()) if v.shape == v0.shape else 'shape'})")
    return compared, bad


def gather(par: Parallel, local: dict, mode=None) -> dict | None:
    """Every rank's local tree -> the full tree (real worlds: on rank 0, None elsewhere)."""
    if mode is None:
        return par.gather(local)
    flat, lay = flatten(local), par.layout
    pieces = [{p: value_on(t, r) for p, t in flat.items()} for r in range(lay.world)]
    pl = par.placements()
    return unflatten({p: par.plan.assemble(pl[p], {r: pieces[r][p] for r in range(lay.world)}) for p in flat})


def max_rel_err(a: dict, b: dict) -> float:
    """Largest |a - b| / max|a| over the leaves of two trees, each leaf's scale floored at 1e-4 of
    the whole tree's (a leaf whose gradient is ~0 at init, e.g. q/k with near-uniform attention,
    otherwise compares fp32 rounding noise with itself)."""
    fa, fb = flatten(a), flatten(b)
    if fa.keys() != fb.keys():
        raise KeyError(f"trees differ: {sorted(set(fa) ^ set(fb))[:5]}")
    floor = max(float(t.abs().max()) for t in fa.values()) * 1e-4 + 1e-12
    return max(float((fa[k] - fb[k]).abs().max()) / max(float(fa[k].abs().max()), floor) for k in fa)


@contextlib.contextmanager
def layer_runs():
    """While open, counts how often each decoder layer runs (``neva.llm.block``: once per forward, and
    once more per recomputation under remat) -> the dict {layer index: runs} it fills."""
    runs: dict[int, int] = {}
    block = llm.block

    def counted(lp, x, ctx, c, dist, i, *a, **k):
        runs[i] = runs.get(i, 0) + 1
        return block(lp, x, ctx, c, dist, i, *a, **k)
    llm.block = counted
    try:
        yield runs
    finally:
        llm.block = block


def check_step(rank: int, cfg: ModelConfig, layout: Layout, params: dict, batch: dict, n_micro: int = 1,
               schedule: str = "1f1b", grad_mode: str = "autograd", vision: str = "tp", remat=None) -> dict | None:
    """A pool job: the step under ``layout`` (pp > 1: the ``schedule``; ``remat``: a RematPolicy on
    the sharded side; ``vision``: the vision tower's layout), and on rank 0 the same step in one process
    over the same micro-batches, without remat. -> on rank 0 {"stats", "stats_ref", "grad_err",
    "layer_runs"}: layer_runs[r][i] is how often rank r ran decoder layer i (a forward, and each
    recomputation)."""
    par = parallel(cfg, layout, schedule=schedule, vision=vision)
    with layer_runs() as runs:
        stats, grads = sharded_grads(par, params, cfg, batch, n_micro, grad_mode=grad_mode, remat=remat)
    all_runs = [None] * layout.world if rank == 0 else None
    tdist.gather_object(runs, all_runs, dst=0)
    full = gather(par, grads)
    if rank != 0:
        return None
    ref_stats, ref = reference_grads(params, cfg, batch, layout.dp * layout.ep * n_micro, grad_mode)
    return {"stats": stats, "stats_ref": ref_stats, "grad_err": max_rel_err(ref, full), "layer_runs": all_runs}


def same_stats(got: dict, want: dict, rel: float = 1e-4) -> list[str]:
    """The statistics that differ by more than ``rel`` (relative; 1e-6 absolute)."""
    return [f"{k}: {got[k]} vs {want[k]}" for k in STATS if abs(got[k] - want[k]) > rel * abs(want[k]) + 1e-6]


def all_to_all_vmap_check(rank: int, batch: int = 3, rows: int = 2, dim: int = 5) -> float:
    """A pool job: ``comm.all_to_all`` under ``torch.func.vmap`` (and vmap of grad) equals running it
    example by example; -> the largest difference."""
    g = torch.Generator().manual_seed(rank)
    n = tdist.get_world_size()
    x = torch.randn(batch, rows * n, dim, generator=g)
    wt = torch.randn(rows * n, dim, generator=g)
    s = [rows] * n

    def f(xe: Tensor) -> Tensor:
        return (comm.all_to_all(xe, s, s, tdist.group.WORLD) * wt).sum()

    got = torch.func.vmap(lambda xe: comm.all_to_all(xe, s, s, tdist.group.WORLD))(x)
    want = torch.stack([comm.all_to_all(xe, s, s, tdist.group.WORLD) for xe in x])
    ggot = torch.func.vmap(torch.func.grad(f))(x)
    gwant = torch.stack([torch.func.grad(f)(xe) for xe in x])
    return max(float((got - want).abs().max()), float((ggot - gwant).abs().max()))


def gather_kv_vmap_check(rank: int, batch: int = 3, heads: int = 2, chunk: int = 2, hd: int = 4) -> float:
    """A pool job (every rank one cp rank): ``comm.gather_kv`` under ``torch.func.vmap`` (and vmap of
    grad) equals running it example by example; -> the largest difference."""
    from neva.comm import Dist

    n = tdist.get_world_size()
    d = Dist(cp=tdist.group.WORLD, cp_size=n, cp_rank=rank)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(batch, heads, 2 * chunk, hd, generator=g)
    wt = torch.randn(heads, 2 * n * chunk, hd, generator=g)

    def f(xe: Tensor) -> Tensor:
        return (comm.gather_kv(xe, d, 1) * wt).sum()

    got = torch.func.vmap(lambda xe: comm.gather_kv(xe, d, 1))(x)
    want = torch.stack([comm.gather_kv(xe, d, 1) for xe in x])
    ggot = torch.func.vmap(torch.func.grad(f))(x)
    gwant = torch.stack([torch.func.grad(f)(xe) for xe in x])
    return max(float((got - want).abs().max()), float((ggot - gwant).abs().max()))
