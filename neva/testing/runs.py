"""Whole training runs for pool jobs and their single-process references: the real training step
(AdamW, clipping, accumulation, precision, LoRA, ZeRO-1) under a layout, with the replicated copies
of every gradient and param compared across ranks; fp16 steps where one pipeline stage overflows;
checkpointed segments of a run resumed under another layout; and an HF folder read slice by slice
under a plan.

Each function takes ``rank`` first (``GlooPool.run`` passes it; ``None`` means one process, no
process group) and returns its result on rank 0 (``fp16_overflow``: on every rank).
"""
from __future__ import annotations

import torch

from neva import hf, model
from neva.batch import split
from neva.config import ModelConfig
from neva.params import flatten, unflatten
from neva.parallel.plan import Layout
from neva.testing.checks import data_shard, replica_mismatches
from neva.testing.worlds import parallel
from neva.train import checkpoint as ckpt
from neva.train import lora as lora_mod
from neva.train import optim
from neva.train import step as step_mod
from neva.train.step import StepSetup, compute_grads, init_state, train_step


def _copy(tree: dict) -> dict:
    return unflatten({p: v.clone() for p, v in flatten(tree).items()})    # the state updates in place


def train_losses(rank: int | None, layout: Layout | None, cfg: ModelConfig, params: dict, batches: list[dict],
                 grad_accum: int = 1, lr: float = 1e-3, clip: float = 1.0, precision: str = "fp32",
                 lora: str = "", zero1: bool = False, freeze: str = "", replicas: bool = False) -> dict | None:
    """Train on ``batches`` (global batches) with the real training step, under ``layout`` in a pool
    job (``rank`` given) or in one process (``rank=None``: the reference, which accumulates over
    data ranks x ``grad_accum`` micro-batches so both see the same split). -> on rank 0 / the
    reference {"losses": [...], "grad_norms": [...], "params": final full tree}; None elsewhere.
    ``lora``: a LoRA preset (the base frozen, LoRA leaves trained and merged in the forward; their
    specs go to the plan). ``zero1``: optimizer state split over dp; every rank then returns
    {"opt_leaves": the leaves whose state it keeps, "opt_numel": their scalars in m, v and masters}.
    ``freeze``: a path regex of leaves left untrained. ``replicas``: after the run, the gradients of
    one more step and the params are compared copy by copy across the ranks that replicate them
    (``checks.replica_mismatches``): rank 0 adds {"replicas": (copies compared, mismatches)}."""
    groups = (lora_mod.groups() if lora else ()) + ((optim.Group(freeze, frozen=True),) if freeze else ())
    opt = optim.AdamW(lr=lr, weight_decay=0.01, clip=clip, warmup=0, total=len(batches), groups=groups)
    prepare, specs = None, None
    if lora:
        lc = lora_mod.LoraConfig(lora, rank=4, alpha=8.0)
        params = lora_mod.add(params, lc)
        params = unflatten({p: (v + 0.01 if p.endswith("_lora_b") else v) for p, v in flatten(params).items()})
        prepare = lambda p: lora_mod.materialize(p, lc.scale)  # noqa: E731
        specs = lora_mod.specs(model.specs(cfg), lc)
    opt_info: dict = {}
    if rank is None:
        n = layout.dp * layout.ep * grad_accum if layout else grad_accum
        setup = StepSetup(cfg, opt, precision=precision, prepare=prepare)
        state = init_state(_copy(params), setup)
        rows = [train_step(state, split(b, cfg, n), setup) for b in batches]
        full = state.params
    else:
        par = parallel(cfg, layout, specs=specs, zero1=zero1)
        setup = StepSetup(cfg, opt, precision=precision, prepare=prepare, par=par)
        state = init_state(_copy(par.shard(params)), setup)
        rows = [train_step(state, split(data_shard(par, cfg, b), cfg, grad_accum), setup) for b in batches]
        full = par.gather(state.params)
        if replicas:
            grads, _ = compute_grads(state.params, cfg, split(data_shard(par, cfg, batches[-1]), cfg, grad_accum), par,
                                     trainable=state.trainable)
            g, p = replica_mismatches(par, grads), replica_mismatches(par, state.params)
            if rank == 0:
                opt_info["replicas"] = (g[0] + p[0], g[1] + p[1])
    if zero1:
        opt_info.update(opt_leaves=sorted(state.opt_state["m"]), opt_numel=sum(
            t.numel() for part in ("m", "v", "master") for t in state.opt_state.get(part, {}).values()))
    if rank not in (None, 0):
        return opt_info or None
    return {"losses": [r["loss"] for r in rows], "grad_norms": [r["grad_norm"] for r in rows], "params": full,
            **opt_info}


def fp16_overflow(rank: int, layout: Layout, cfg: ModelConfig, params: dict, batches: list[dict],
                  grad_accum: int, overflow_stage: int) -> dict:
    """A pool job: fp16 training steps under ``layout`` where, in the first step, only the ranks of
    pipeline stage ``overflow_stage`` get a non-finite gradient (one of their leaves overflows).
    -> per rank {"stage", "rows" (the metrics rows), "kept" (params bit-identical after the skipped
    step), "moved" (params changed by the steps after it)}."""
    par = parallel(cfg, layout)
    opt = optim.AdamW(lr=1e-3, weight_decay=0.01, clip=1.0, warmup=0, total=len(batches))
    setup = StepSetup(cfg, opt, precision="fp16", par=par)
    state = init_state(_copy(par.shard(params)), setup)
    stage = par.stage_index
    real, calls = step_mod.compute_grads, [0]

    def overflowing(*a, **k):
        grads, st = real(*a, **k)
        calls[0] += 1
        if calls[0] == 1 and stage == overflow_stage:
            next(iter(grads.values())).view(-1)[0] = float("inf")
        return grads, st
    before = {p: v.clone() for p, v in flatten(state.params).items()}
    step_mod.compute_grads = overflowing
    try:
        rows = [train_step(state, split(data_shard(par, cfg, batches[0]), cfg, grad_accum), setup)]
        kept = all(torch.equal(before[p], v) for p, v in flatten(state.params).items())
        rows += [train_step(state, split(data_shard(par, cfg, b), cfg, grad_accum), setup) for b in batches[1:]]
    finally:
        step_mod.compute_grads = real
    moved = any(not torch.equal(before[p], v) for p, v in flatten(state.params).items())
    return {"stage": stage, "rows": rows, "kept": kept, "moved": moved}


def train_segment(rank: int | None, layout: Layout | None, cfg: ModelConfig, params: dict, batches: list[dict],
                  start: int, stop: int, ckpt_dir: str, n_micro: int = 2, lr: float = 1e-3,
                  zero1: bool = False, with_params: bool = False):
    """Steps ``start..stop`` of a run over ``batches`` (``n_micro`` micro-batches per step in all,
    split first over data ranks), resuming from the newest checkpoint in ``ckpt_dir`` when
    ``start > 0`` and saving one at ``stop``. ``rank=None``: one process, no process group.
    -> the per-step losses (on rank 0 / in one process); with ``with_params``, (losses, the full
    params as the run holds them at ``stop``, gathered from every rank)."""
    opt = optim.AdamW(lr=lr, weight_decay=0.01, clip=1.0, warmup=0, total=len(batches))
    par = None if rank is None else parallel(cfg, layout, zero1=zero1)
    setup = StepSetup(cfg, opt, par=par)
    state = init_state(_copy(params if par is None else par.shard(params)), setup)
    if start:
        meta = ckpt.load(ckpt.latest(ckpt_dir), state, par=par)
        assert int(meta["step"]) == start, (meta["step"], start)
    n_data = 1 if par is None else par.dist.data_size
    losses = []
    for i in range(start, stop):
        mine = batches[i] if par is None else data_shard(par, cfg, batches[i])
        losses.append(train_step(state, split(mine, cfg, n_micro // n_data), setup)["loss"])
    ckpt.save(ckpt_dir, stop, state, par=par)
    full = (state.params if par is None else par.gather(state.params)) if with_params else None
    if rank not in (None, 0):
        return None
    return (losses, full) if with_params else losses


def hf_sliced_load(rank: int, layout: Layout, folder: str) -> dict:
    """A pool job: load an HF LLaVA folder reading only this rank's slices; -> per leaf whether the
    local tensor equals the plan's shard of the full load, and how many scalars were read."""
    cfg, full = hf.load(folder)
    par = parallel(cfg, layout)
    _, read = hf.load(folder, shard=par.hf_slices)
    read_scalars = sum(t.numel() for t in flatten(read).values())
    local = flatten(par.localize(read))
    want = flatten(par.shard(full))
    return {"same": local.keys() == want.keys() and all(torch.equal(local[p], want[p]) for p in want),
            "read": read_scalars, "full": sum(t.numel() for t in flatten(full).values())}
