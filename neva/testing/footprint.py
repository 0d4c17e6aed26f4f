"""What one training step actually holds and sends on a rank, to check ``neva.planner`` against:
the bytes of the params and the optimizer state, the bytes autograd saves for the backward of a
micro-batch's forward, and the payload bytes of every collective (``neva.comm.counting``).

    pool.run(step_footprint, cfg, Layout(tp=2, cp=2, sp=True), params, batch)   # -> one dict per rank
"""
from __future__ import annotations

import torch

from neva import comm, model
from neva.batch import IGNORE, split
from neva.config import ModelConfig
from neva.params import flatten, unflatten
from neva.parallel.plan import Layout
from neva.testing.checks import data_shard
from neva.testing.worlds import parallel
from neva.train import optim
from neva.train.step import StepSetup, init_state, train_step


def saved_bytes(fn, exclude: set[int]) -> int:
    """Bytes of the storages autograd saves while ``fn()`` runs (each storage once), leaving out the
    storages in ``exclude`` (the parameters')."""
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in exclude:
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def label_rows(cfg: ModelConfig, mb: dict, dist) -> int:
    """Positions of a micro-batch whose target this rank's loss reads (its cp chunks)."""
    nb = model.normalize_batch(cfg, mb, dist)
    return int((model.targets(nb, dist) != IGNORE).sum())


def step_footprint(rank: int, cfg: ModelConfig, layout: Layout, params: dict, batch: dict, n_micro: int = 1,
                   precision: str = "fp32", zero1: bool = False, vision: str = "tp") -> dict:
    """A pool job: one real training step under ``layout`` -> this rank's {"params", "optimizer"
    (bytes held), "activations" (bytes saved by its first micro-batch's forward; pp = 1 only),
    "sent" ({(axis, kind): bytes}), "label_rows" (per micro-batch)}."""
    par = parallel(cfg, layout, zero1=zero1, vision=vision)
    setup = StepSetup(cfg, optim.AdamW(lr=1e-3, warmup=0, total=1), precision=precision, par=par)
    state = init_state(unflatten({p: v.clone() for p, v in flatten(par.shard(params)).items()}), setup)
    mbs = split(data_shard(par, cfg, batch), cfg, n_micro)
    out = {"params": sum(t.numel() * t.element_size() for t in flatten(state.params).values()),
           "optimizer": sum(t.numel() * t.element_size() for part in ("m", "v", "master")
                            for t in state.opt_state.get(part, {}).values()),
           "label_rows": [label_rows(cfg, mb, par.dist) for mb in mbs]}
    if layout.pp == 1:
        leaves = {p: v.detach().requires_grad_() for p, v in flatten(state.params).items()}
        ptrs = {v.untyped_storage().data_ptr() for v in leaves.values()}
        out["activations"] = saved_bytes(lambda: model.loss_terms(unflatten(leaves), cfg, mbs[0], par.dist), ptrs)
    with comm.counting() as sent:
        train_step(state, mbs, setup)
    out["sent"] = dict(sent)
    return out
