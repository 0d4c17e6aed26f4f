"""A run under a plan: set up the mesh from what torchrun launched, shard params, reduce gradients,
measure the global gradient norm, and gather params whole for evaluation and export.

    par = runtime.setup(cfg, tp=2, pp=2, ep=1, sp=True)   # world size from torchrun; dp = the rest
    local = par.shard(params)                              # this rank's leaves
    ... grads -> par.sync(grads); norm = par.norm(grads) ...
    full = par.gather(local)                               # on rank 0 (None elsewhere)

With ``zero1=True`` each dp rank keeps the optimizer state of a share of the leaves (``owned``),
updates those and broadcasts them (``share_updates``); gradients are still all-reduced whole.

Without torchrun (or with a world of 1) everything here is the identity.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch
import torch.distributed as tdist
from torch import Tensor

from neva import model
from neva.config import ModelConfig
from neva.params import flatten, unflatten
from neva.parallel import comm, mesh
from neva.parallel.comm import Dist
from neva.parallel.grads import sync_grads
from neva.parallel.plan import Layout, Plan

_LORA = re.compile(r"^(.*)_lora_([ab])$")


def lora_placement(path: str, placements: dict[str, tuple]) -> tuple | None:
    """A LoRA leaf follows its weight: ``a [.., r, in]`` takes the weight's ``in`` sharding, ``b
    [.., out, r]`` its ``out`` sharding; the rank dim is never sharded."""
    m = _LORA.match(path)
    if not m or m.group(1) not in placements:
        return None
    *lead, out, inp = placements[m.group(1)]
    return (*lead, None, inp) if m.group(2) == "a" else (*lead, out, None)


@dataclass
class Parallel:
    cfg: ModelConfig
    plan: Plan
    dist: Dist
    specs: dict
    rank: int = 0
    schedule: str = "1f1b"     # pipeline schedule: 1f1b | gpipe
    zero1: bool = False        # optimizer state split over dp: each leaf's state on one dp rank

    @property
    def layout(self) -> Layout:
        return self.plan.layout

    @property
    def single(self) -> bool:
        return self.layout.world == 1

    @property
    def stage(self) -> range:
        """The LLM layers this rank runs."""
        return self.plan.stages(self.cfg)[self.layout.coords(self.rank)["pp"]]

    @property
    def main(self) -> bool:
        return self.rank == 0

    def placements(self, paths=None) -> dict[str, tuple]:
        """Placement of every leaf (LoRA leaves included when their paths are given)."""
        if getattr(self, "_pl", None) is None:
            self._pl = self.plan.placements(self.specs)
        pl = dict(self._pl)
        for p in paths or ():
            if p not in pl:
                lp = lora_placement(p, pl)
                if lp is None:
                    raise KeyError(f"{p} is not a leaf of the model config (nor a LoRA factor of one): "
                                   "the plan cannot place it")
                pl[p] = lp
        return pl

    def shard(self, params: dict) -> dict:
        """Full tree (LoRA leaves allowed) -> this rank's local tree."""
        if self.single:
            return params
        flat = flatten(params)
        pl = self.placements(flat)
        coords = self.layout.coords(self.rank)
        return unflatten({p: self.plan.shard_leaf(t, pl[p], coords) for p, t in flat.items()
                          if self.plan.stage_of(_LORA.sub(r"\1", p), self.cfg) == coords["pp"]})

    WHOLE = ("llm/embed/w", "llm/lm_head/w")   # read whole: the image token may still grow the vocabulary

    def hf_slices(self, path: str, full_shape: tuple) -> tuple | None:
        """For ``neva.hf.load(..., shard=par.hf_slices)``: the slices of a leaf this rank reads from
        an HF folder (empty for leaves of other pipeline stages, whole for the embeddings)."""
        if self.single or path in self.WHOLE:
            return None
        coords = self.layout.coords(self.rank)
        if self.plan.stage_of(path, self.cfg) != coords["pp"]:
            return tuple(slice(0, 0) for _ in full_shape)
        place = self.placements().get(path) or lora_placement(path, self.placements()) or (None,) * len(full_shape)
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
        coords = self.layout.coords(self.rank)
        out = {}
        for p, t in flat.items():
            if self.plan.stage_of(_LORA.sub(r"\1", p), self.cfg) != coords["pp"]:
                continue
            full = spec_shapes.get(p, tuple(t.shape))
            out[p] = self.plan.shard_leaf(t, pl[p], coords) if tuple(t.shape) == full else t
        return unflatten(out)

    def sync(self, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        """Sum gradients (flat path -> tensor, in place) over the ranks that share each leaf."""
        if self.single:
            return grads
        pl = self.placements(grads)
        # a LoRA factor replicated over tp multiplies a tp-sharded weight slice: its gradient is partial
        partial = {p for p in grads if (m := _LORA.match(p)) and "tp" not in pl[p] and "tp" in pl[m.group(1)]}
        sync_grads(grads, pl, self.dist, tp_partial=partial)
        return grads

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
        me = self.layout.coords(self.rank)["dp"]
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
            tdist.broadcast(buf, group=self.dist.dp, group_src=c)
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


def setup(cfg: ModelConfig, tp: int = 1, pp: int = 1, ep: int = 1, sp: bool = False,
          overrides: tuple = (), schedule: str = "1f1b", zero1: bool = False) -> Parallel:
    """The plan for this launch: ``torchrun`` sets the world size and dp is what is left; a plan that
    does not fit the world or the model is an error here, before any work."""
    world = 1
    if mesh.launched():
        mesh.init_process_group()
        world = tdist.get_world_size()
    plan = Plan(Layout.fit(world, tp, pp, ep, sp and tp > 1), overrides=tuple(overrides))
    specs = model.specs(cfg)
    plan.validate(cfg, specs, world)
    dist, _ = mesh.build(plan.layout)
    dist = replace(dist, replicate=plan.replicated_parts(specs))
    from neva.parallel.pipeline import SCHEDULES
    if schedule not in SCHEDULES:
        raise ValueError(f"parallel.pp_schedule={schedule!r}: use one of {SCHEDULES}")
    return Parallel(cfg, plan, dist, specs, tdist.get_rank() if tdist.is_initialized() else 0, schedule, zero1)
