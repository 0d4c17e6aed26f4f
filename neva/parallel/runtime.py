"""One rank's parallel state, and what a run under a plan does with it: set up the mesh from what
torchrun launched, shard params, sum gradients, measure the global gradient norm, and gather params
whole for evaluation and export. ``Parallel`` is the one object a training function takes; the model
functions take its ``dist``.

    par = runtime.setup(cfg, tp=2, pp=2, ep=1, sp=True)   # world size from torchrun; dp = the rest
    local = par.shard(params)                              # this rank's leaves
    ... grads -> par.sync(grads); norm = par.sq_norm(grads).sqrt() ...
    full = par.gather(local)                               # on rank 0 (None elsewhere)

``specs`` are what the plan places: the model's, plus any leaves a run adds (LoRA factors come with
their own ParamSpecs, ``neva.train.lora.specs``). With ``zero1=True`` each dp rank keeps the optimizer
state of a share of the leaves (``owned``), updates those and broadcasts them (``share_updates``);
gradients are still all-reduced whole.

Without torchrun (or with a world of 1) everything here is the identity. The rank's coordinates come
from its ``Dist`` (the mesh), so a simulated world (``neva.testing``) slices per rank the same way.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as tdist
from torch import Tensor

from neva import comm, model
from neva.comm import Dist
from neva.config import ModelConfig
from neva.params import flatten, unflatten
from neva.parallel import mesh
from neva.parallel.grads import sync_grads
from neva.parallel.pipeline import SCHEDULES
from neva.parallel.plan import AXES, Layout, Plan


@dataclass
class Parallel:
    cfg: ModelConfig
    plan: Plan
    dist: Dist
    specs: dict
    rank: int = 0
    schedule: str = "1f1b"     # pipeline schedule: 1f1b | gpipe
    zero1: bool = False        # optimizer state split over dp: each leaf's state on one dp rank
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def layout(self) -> Layout:
        return self.plan.layout

    @property
    def single(self) -> bool:
        return self.layout.world == 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def coords(self) -> dict:
        """This rank's coordinate on each mesh axis (per-rank SymInts in a simulated world)."""
        d = self.dist
        c = {"pp": d.pp_rank, "dp": d.dp_rank, "ep": d.ep_rank, "cp": d.cp_rank, "tp": d.tp_rank}
        return {a: (0 if self.layout.size(a) == 1 else c[a]) for a in AXES}

    @property
    def stage_index(self) -> int:
        return int(self.coords["pp"])

    @property
    def stage(self) -> range:
        """The LLM layers this rank runs."""
        return self.plan.stages(self.cfg)[self.stage_index]

    def placements(self, paths=None) -> dict[str, tuple]:
        """Placement of every leaf of ``specs``; ``paths`` (if given) must all be among them."""
        if "pl" not in self._cache:
            self._cache["pl"] = self.plan.placements(self.specs)
        pl = self._cache["pl"]
        unknown = [p for p in paths or () if p not in pl]
        if unknown:
            raise KeyError(f"{unknown[:3]} are not leaves of the specs this plan was set up with: pass the "
                           "specs of every leaf you train (e.g. LoRA: runtime.setup(..., specs=lora.specs(...)))")
        return pl

    def _mine(self, path: str) -> bool:
        return self.plan.stage_of(path, self.cfg) == self.stage_index

    def shard(self, params: dict) -> dict:
        """Full tree -> this rank's local tree: its stage's leaves, sliced by placement."""
        if self.single:
            return params
        flat = flatten(params)
        pl = self.placements(flat)
        return unflatten({p: self.plan.shard_leaf(t, pl[p], self.coords) for p, t in flat.items() if self._mine(p)})

    def hf_slices(self, path: str, full_shape: tuple) -> tuple | None:
        """For ``neva.hf.load(..., shard=par.hf_slices)``: the slices of a leaf this rank reads from
        an HF folder (empty for leaves of other pipeline stages, whole for ``plan.read_whole``)."""
        if self.single or any(re.search(rx, path) for rx in self.plan.read_whole):
            return None
        if not self._mine(path):
            return tuple(slice(0, 0) for _ in full_shape)
        place, coords = self.placements()[path], self.coords
        out = []
        for d, ax in enumerate(place):
            n = full_shape[d] // self.layout.size(ax) if ax else full_shape[d]
            c = coords[ax] if ax else 0
            out.append(slice(c * n, (c + 1) * n))
        return tuple(out)

    def localize(self, params: dict) -> dict:
        """A tree read with ``hf_slices`` (some leaves local, some whole, some empty) -> this rank's
        local tree; the same as ``shard`` of the full tree."""
        if self.single:
            return params
        flat = flatten(params)
        pl = self.placements(flat)
        spec_shapes = {p: tuple(s.shape) for p, s in flatten(self.specs).items()}
        return unflatten({p: self.plan.shard_leaf(t, pl[p], self.coords) if tuple(t.shape) == spec_shapes[p] else t
                          for p, t in flat.items() if self._mine(p)})

    def sync(self, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        """Sum gradients (flat path -> tensor, in place) over the ranks that share each leaf."""
        if self.single:
            return grads
        if "sums" not in self._cache:
            self._cache["sums"] = self.plan.grad_sums(self.specs)
        return sync_grads(grads, self._cache["sums"], self.dist)

    def sq_norm(self, grads: dict[str, Tensor]) -> Tensor:
        """Squared global L2 norm of the full (unsharded) gradient: each shard counted once."""
        if self.single:
            return sum((g.float().square().sum() for g in grads.values()), torch.zeros(()))
        pl = self.placements(grads)
        parts: dict[tuple, Tensor] = {}
        for p, g in grads.items():
            key = tuple(sorted({a for a in pl[p] if a}))
            parts[key] = parts.get(key, torch.zeros(())) + g.float().square().sum()
        total = torch.zeros(())
        for axes, s in parts.items():
            for a in axes:
                s = comm.all_reduce_nograd(s, getattr(self.dist, a))
            total = total + s
        return comm.all_reduce_nograd(total, self.dist.pp)

    # ---------------------------------------------------------------- ZeRO-1
    def owners(self, local: dict[str, Tensor], trainable: list[str]) -> dict[str, int]:
        """ZeRO-1: the dp coordinate that keeps each trainable leaf's optimizer state and updates it.
        Whole leaves, greedily balanced by size (as torch's ZeroRedundancyOptimizer partitions); every
        rank of a dp group holds the same local shapes, so they all compute the same assignment."""
        dp = self.layout.dp if self.zero1 else 1
        load, out = [0] * dp, {}
        for p in sorted(trainable, key=lambda p: (-local[p].numel(), p)):
            c = min(range(dp), key=lambda i: (load[i], i))
            out[p] = c
            load[c] += local[p].numel()
        return out

    def owned(self, local: dict[str, Tensor], trainable: list[str]) -> set[str] | None:
        """The trainable leaves whose optimizer state this rank keeps (None: all of them)."""
        if not self.zero1 or self.layout.dp == 1:
            return None
        me = self.coords["dp"]
        return {p for p, c in self.owners(local, trainable).items() if c == me}

    def share_updates(self, params: dict, trainable: list[str]) -> None:
        """ZeRO-1, after the optimizer step: each dp rank broadcasts the leaves it updated, one
        flat bucket per owner and dtype, so every replica holds the new values."""
        if not self.zero1 or self.layout.dp == 1:
            return
        flat = flatten(params)
        by: dict[tuple, list[Tensor]] = {}
        for p, c in self.owners(flat, trainable).items():
            by.setdefault((c, flat[p].dtype), []).append(flat[p])
        for (c, _), ts in sorted(by.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
            buf = torch.cat([t.detach().reshape(-1) for t in ts])
            comm.broadcast_(buf, self.dist.dp, c)
            off = 0
            for t in ts:
                with torch.no_grad():
                    t.copy_(buf[off:off + t.numel()].view_as(t))
                off += t.numel()

    def gather(self, local: dict, dst: int = 0) -> dict | None:
        """Every rank's local tree -> the full tree on rank ``dst`` (None on the others)."""
        if self.single:
            return local
        trees = [None] * self.layout.world if self.rank == dst else None
        tdist.gather_object({p: t.detach() for p, t in flatten(local).items()}, trees, dst=dst)
        if self.rank != dst:
            return None
        flat_all = [dict(t) for t in trees]
        pl = self.placements({p for t in flat_all for p in t})
        out = {}
        for p, place in pl.items():
            holders = {r: t[p] for r, t in enumerate(flat_all) if p in t}
            if holders:
                out[p] = self.plan.assemble(place, holders)
        return unflatten(out)


def setup(cfg: ModelConfig, tp: int = 1, pp: int = 1, ep: int = 1, sp: bool = False, overrides: tuple = (),
          schedule: str = "1f1b", zero1: bool = False, specs: dict | None = None, cp: int = 1,
          vision: str = "tp") -> Parallel:
    """The plan for this launch: ``torchrun`` sets the world size (or an initialised process group
    does) and dp is what is left; a plan that does not fit the world or the model is an error here,
    before any work. ``specs``: every leaf the run trains (default: the model's). ``vision``: the
    vision tower's layout (``Plan.towers``): tp | replicate | frames."""
    if mesh.launched():
        mesh.init_process_group()
    world = tdist.get_world_size() if tdist.is_initialized() else 1
    plan = Plan(Layout.fit(world, tp, pp, ep, sp and tp > 1, cp), overrides=tuple(overrides),
                towers=Plan.vision_rows(vision))
    return make(cfg, plan, mesh.build(plan.layout)[0], specs, tdist.get_rank() if tdist.is_initialized() else 0,
                schedule, zero1)


def make(cfg: ModelConfig, plan: Plan, dist: Dist, specs: dict | None = None, rank: int = 0,
         schedule: str = "1f1b", zero1: bool = False) -> Parallel:
    """The ``Parallel`` of a rank whose mesh is built (``mesh.build``): the plan, checked against the
    model, tells its ``Dist`` which parts run replicated, sequence-parallel, context-parallel and
    frame-parallel."""
    if schedule not in SCHEDULES:
        raise ValueError(f"parallel.pp_schedule={schedule!r}: use one of {SCHEDULES}")
    specs = specs if specs is not None else model.specs(cfg)
    plan.validate(cfg, specs)
    reps = plan.replicated_parts(specs)
    dist = replace(dist, replicate=reps, sp_parts=frozenset(plan.sp_parts) - reps, cp_parts=frozenset(plan.cp_parts),
                   frame_parts=plan.frame_parts(specs))
    return Parallel(cfg, plan, dist, specs, rank, schedule, zero1)
