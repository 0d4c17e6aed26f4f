"""Worlds for equivalence tests: a simulated one in this process, and a persistent gloo pool.

``local_world(layout)``: a fake process group plus PyTorch's LocalTensorMode runs every rank of a
small world (1-4) in one process; each tensor holds one value per rank and collectives combine
them. Fast enough for hypothesis; no send/recv (so no pipeline).

``GlooPool(world)``: real processes on gloo, started once and kept alive for a whole test session;
``pool.run(fn, *args)`` calls the importable function ``fn(world, *args)`` on every rank and returns
the list of results (rank order). Covers everything, pipelines included.

``World`` hides the difference: ``per_rank`` builds a rank-dependent tensor, ``shard`` slices a
full params tree by the plan, ``gather`` puts local trees back together on every rank.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import socket
import traceback
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
import torch.distributed as tdist
from torch import Tensor

from neva.config import ModelConfig
from neva.params import flatten, unflatten
from neva.parallel import comm
from neva.parallel import mesh as mesh_mod
from neva.parallel.comm import Dist
from neva.parallel.plan import Layout, Plan


@dataclass
class World:
    plan: Plan
    dist: Dist
    mode: Any = None          # LocalTensorMode for the simulated world, None for real processes
    rank: int = 0             # this process's global rank (real worlds)

    @property
    def layout(self) -> Layout:
        return self.plan.layout

    def per_rank(self, fn: Callable[[int], Tensor]) -> Tensor:
        """The tensor ``fn(rank)`` on each rank."""
        if self.mode is None:
            return fn(self.rank)
        return self.mode.rank_map(fn)

    def shard(self, params: dict, specs: dict, cfg: ModelConfig) -> dict:
        if self.mode is None:
            return self.plan.shard(params, specs, cfg, self.rank)
        if self.layout.pp > 1:
            raise ValueError("a simulated world has no send/recv: pipelines need the gloo pool")
        pl = self.plan.placements(specs)
        return unflatten({p: self.per_rank(lambda r, t=t, p=p: self.plan.shard_leaf(t, pl[p], self.layout.coords(r)))
                          for p, t in flatten(params).items()})

    def gather(self, local: dict, specs: dict) -> dict:
        """Local trees of every rank -> the full tree (on every rank)."""
        if self.mode is None:
            trees = [None] * self.layout.world
            tdist.all_gather_object(trees, {p: t.detach() for p, t in flatten(local).items()})
            return self.plan.unshard([unflatten(t) for t in trees], specs)
        flat = flatten(local)
        trees = [unflatten({p: _value_on(t, r) for p, t in flat.items()}) for r in range(self.layout.world)]
        return self.plan.unshard(trees, specs)

    def value(self, t: Tensor, rank: int = 0) -> Tensor:
        """A plain tensor: ``t`` as rank ``rank`` holds it (real worlds: this rank's)."""
        return t.detach() if self.mode is None else _value_on(t, rank)


def _value_on(t, rank: int):
    lt = getattr(t, "_local_tensors", None)
    return (lt[rank] if lt is not None else t).detach().clone() if isinstance(t, Tensor) else t


def _build_world(plan: Plan, specs: dict, rank: int, mode=None) -> World:
    dist, _ = mesh_mod.build(plan.layout)
    return World(plan, replace(dist, replicate=plan.replicated_parts(specs)), mode, rank)


@contextlib.contextmanager
def local_world(plan: Plan, specs: dict):
    """A simulated world of ``plan.layout.world`` ranks in this process."""
    from torch.distributed._local_tensor import LocalTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if tdist.is_initialized():
        tdist.destroy_process_group()
    world = plan.layout.world
    tdist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    try:
        with LocalTensorMode(world) as mode:
            yield _build_world(plan, specs, 0, mode)
    finally:
        tdist.destroy_process_group()


# ----------------------------------------------------------------------------- the gloo pool
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, conn) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    while True:
        msg = conn.recv()
        if msg is None:
            break
        fn, args = msg
        try:
            conn.send(("ok", fn(rank, *args)))
        except BaseException:  # noqa: BLE001 - the test process shows it
            conn.send(("error", traceback.format_exc()))
    tdist.destroy_process_group()


class GlooPool:
    """``world`` gloo processes kept alive; ``run(fn, *args)`` runs ``fn(rank, *args)`` on each."""

    def __init__(self, world: int = 4):
        ctx = mp.get_context("spawn")
        self.world, port = world, _free_port()
        self.conns, self.procs = [], []
        for r in range(world):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(r, world, port, child), daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)

    def run(self, fn: Callable, *args, timeout: float = 300.0) -> list:
        for c in self.conns:
            c.send((fn, args))
        out, errors = [], []
        for r, c in enumerate(self.conns):
            if not c.poll(timeout):
                raise TimeoutError(f"gloo pool rank {r} did not answer in {timeout:.0f} s")
            status, val = c.recv()
            (errors.append(f"rank {r}:\n{val}") if status == "error" else out.append(val))
        if errors:
            raise RuntimeError("a pool job failed:\n" + "\n".join(errors))
        return out

    def close(self) -> None:
        for c in self.conns:
            with contextlib.suppress(Exception):
                c.send(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


def pool_world(rank: int, plan: Plan, specs: dict) -> World:
    """Inside a pool job: this rank's World for ``plan`` (the mesh groups are built fresh)."""
    return _build_world(plan, specs, rank)


# ------------------------------------------------------------------- equivalence of a step
def split_batch(batch: dict, cfg: ModelConfig, n: int, i: int) -> dict:
    """Rows ``i*B/n .. (i+1)*B/n`` of a batch, with their images (in order of appearance)."""
    ids = batch["input_ids"]
    B = ids.shape[0]
    if B % n:
        raise ValueError(f"batch of {B} rows does not split over {n} data ranks")
    lo, hi = i * B // n, (i + 1) * B // n
    per_row = ((ids == cfg.image_token_id).sum(1) // cfg.tokens_per_image).tolist()
    first, last = sum(per_row[:lo]), sum(per_row[:hi])
    out = {k: v[lo:hi] for k, v in batch.items() if k != "pixel_values"}
    if batch.get("pixel_values") is not None:
        out["pixel_values"] = batch["pixel_values"][first:last]
    return out


def label_count(batch: dict) -> int:
    from neva.loss import shift_labels
    return int((shift_labels(batch["labels"], batch.get("segment_ids")) != -100).sum())


def reference_step(params: dict, cfg: ModelConfig, batch: dict, n_shards: int) -> tuple[float, float, dict]:
    """Single process: the step's CE (summed, / label count) and aux over ``n_shards`` micro-batches,
    and the gradients of their sum."""
    from neva import model
    n_total = label_count(batch)
    params = {k: v for k, v in params.items()}

    def step_loss(p):
        tot, ce, aux = 0.0, 0.0, 0.0
        for i in range(n_shards):
            t = model.loss_terms(p, cfg, split_batch(batch, cfg, n_shards, i))
            tot = tot + model.combine(t, cfg, n_total, n_micro=n_shards)
            ce, aux = ce + t["ce_sum"].detach(), aux + t["aux"].detach()
        return tot, (ce / n_total, aux / n_shards)

    grads, (ce, aux) = torch.func.grad(step_loss, has_aux=True)(params)
    return float(ce), float(aux), grads


def sharded_step(world: World, params: dict, cfg: ModelConfig, batch: dict,
                 use_func: bool = False) -> tuple[float, float, dict]:
    """The same step under ``world``'s plan: data split over dp x ep, model sharded, gradients
    synchronised, then gathered whole on every rank. ``use_func``: torch.func.grad instead of
    autograd (real worlds only: LocalTensors cannot leave C++ for .tolist() under functorch)."""
    from neva import model
    from neva.parallel.comm import all_reduce_nograd
    from neva.parallel.grads import sync_grads

    specs = model.specs(cfg)
    world.plan.validate(cfg, specs)
    lay, dist = world.layout, world.dist
    n_data = lay.dp * lay.ep
    local = world.shard(params, specs, cfg)
    data_index = lambda r: lay.coords(r)["dp"] * lay.ep + lay.coords(r)["ep"]
    keys = [k for k, v in batch.items() if v is not None]
    mb = {k: world.per_rank(lambda r, k=k: split_batch(batch, cfg, n_data, data_index(r))[k]) for k in keys}
    n_total = label_count(batch)

    def loss_fn(p):
        t = model.loss_terms(p, cfg, mb, dist)
        return model.combine(t, cfg, n_total, n_micro=n_data), t

    if use_func:
        grads, terms = torch.func.grad(loss_fn, has_aux=True)(local)
    else:
        flat = {p: t.detach().requires_grad_(True) for p, t in flatten(local).items()}
        loss, terms = loss_fn(unflatten(flat))
        gl = torch.autograd.grad(loss, list(flat.values()), allow_unused=True)
        grads = unflatten({p: torch.zeros_like(t) if g is None else g for (p, t), g in zip(flat.items(), gl)})
    grads = sync_grads(grads, world.plan.placements(specs), dist)
    ce = all_reduce_nograd(terms["ce_sum"], dist.data) / n_total
    aux = terms["aux"].detach()
    if dist.sp:
        aux = all_reduce_nograd(aux, dist.tp)
    aux = all_reduce_nograd(aux, dist.data) / n_data
    return float(world.value(ce)), float(world.value(aux)), world.gather(grads, specs)


def pipeline_step(world: World, params: dict, cfg: ModelConfig, batch: dict, n_micro: int = 2,
                  schedule: str = "1f1b") -> tuple[float, float, dict]:
    """The step under a plan with pipeline stages (real worlds): each data rank splits its rows into
    ``n_micro`` micro-batches; matches ``reference_step(..., n_shards = data ranks x n_micro)``."""
    from neva import model
    from neva.parallel import pipeline
    from neva.parallel.comm import all_reduce_nograd
    from neva.parallel.grads import sync_grads

    specs = model.specs(cfg)
    plan, dist = world.plan, world.dist
    plan.validate(cfg, specs)
    lay = plan.layout
    n_data = lay.dp * lay.ep
    coords = lay.coords(world.rank)
    d = coords["dp"] * lay.ep + coords["ep"]
    local = plan.shard(params, specs, cfg, world.rank)
    mbs = [split_batch(batch, cfg, n_data * n_micro, d * n_micro + m) for m in range(n_micro)]
    grads, stats = pipeline.compute_grads(local, cfg, mbs, dist, plan.stages(cfg)[coords["pp"]],
                                          trainable=list(flatten(local)), n_total=label_count(batch),
                                          n_micro_total=n_data * n_micro, schedule=schedule)
    grads = sync_grads(unflatten(grads), plan.placements(specs), dist)
    stats = all_reduce_nograd(stats, dist.pp)
    if dist.sp:
        stats[1:3] = all_reduce_nograd(stats[1:3], dist.tp)
    stats = all_reduce_nograd(stats, dist.data)
    return float(stats[0]), float(stats[1]), world.gather(grads, specs)


def max_rel_err(a: dict, b: dict) -> float:
    """Largest |a - b| / max|a| over the leaves of two trees, each leaf's scale floored at 1e-4 of
    the whole tree's (a leaf whose gradient is ~0 at init, e.g. q/k with near-uniform attention,
    otherwise compares fp32 rounding noise with itself)."""
    fa, fb = flatten(a), flatten(b)
    if fa.keys() != fb.keys():
        raise KeyError(f"trees differ: {sorted(set(fa) ^ set(fb))[:5]}")
    floor = max(float(t.abs().max()) for t in fa.values()) * 1e-4 + 1e-12
    return max(float((fa[k] - fb[k]).abs().max()) / max(float(fa[k].abs().max()), floor) for k in fa)


_WORLDS: dict = {}


def pool_check(rank: int, plan: Plan, cfg: ModelConfig, params: dict, batch: dict, kind: str = "step",
               n_micro: int = 2, schedule: str = "1f1b") -> dict | None:
    """A pool job: run the sharded step and compare with the single-process reference on rank 0.
    -> on rank 0 {"ce", "ce_ref", "aux", "aux_ref", "grad_err"}; None elsewhere."""
    from neva import model
    if plan.layout not in _WORLDS:  # building a mesh creates process groups: once per layout
        _WORLDS[plan.layout] = pool_world(rank, plan, {})
    base = _WORLDS[plan.layout]
    world = World(plan, replace(base.dist, replicate=plan.replicated_parts(model.specs(cfg))), None, rank)
    if kind == "pipeline":
        ce, aux, grads = pipeline_step(world, params, cfg, batch, n_micro, schedule)
        n_shards = plan.layout.dp * plan.layout.ep * n_micro
    else:
        ce, aux, grads = sharded_step(world, params, cfg, batch, use_func=(kind == "func"))
        n_shards = plan.layout.dp * plan.layout.ep
    if rank != 0:
        return None
    ce_ref, aux_ref, g_ref = reference_step(params, cfg, batch, n_shards)
    return {"ce": ce, "ce_ref": ce_ref, "aux": aux, "aux_ref": aux_ref, "grad_err": max_rel_err(g_ref, grads)}


def all_to_all_vmap_check(rank: int, batch: int = 3, rows: int = 2, dim: int = 5) -> float:
    """A pool job: ``comm.all_to_all`` under ``torch.func.vmap`` (and vmap of grad) equals running it
    example by example; -> the largest difference."""
    g = torch.Generator().manual_seed(rank)
    n = tdist.get_world_size()
    x = torch.randn(batch, rows * n, dim, generator=g)
    wt = torch.randn(rows * n, dim, generator=g)
    split = [rows] * n

    def f(xe):
        return (comm.all_to_all(xe, split, split, tdist.group.WORLD) * wt).sum()

    got = torch.func.vmap(lambda xe: comm.all_to_all(xe, split, split, tdist.group.WORLD))(x)
    want = torch.stack([comm.all_to_all(xe, split, split, tdist.group.WORLD) for xe in x])
    ggot = torch.func.vmap(torch.func.grad(f))(x)
    gwant = torch.stack([torch.func.grad(f)(xe) for xe in x])
    return max(float((got - want).abs().max()), float((ggot - gwant).abs().max()))
