"""Pipeline parallelism: GPipe and 1F1B schedules over micro-batches, on plain autograd.

Stage 0 holds the vision encoder, the projector and the embedding; every stage a contiguous range of
LLM layers (``Plan.stages``); the last the final norm, the LM head and the loss. Activations go
forward and their gradients backward by point-to-point messages within the ``pp`` group; sends
are non-blocking and receives blocking, which makes both schedules deadlock-free.

  GPipe: all forwards, then all backwards (activation memory grows with the micro-batch count).
  1F1B:  stage s runs pp - s - 1 warm-up forwards, then alternates one forward and one backward,
         then drains; at most pp - s micro-batches are in flight (Megatron's non-interleaved 1F1B).

Every rank of a stage gets the same micro-batches (it needs their shapes, masks and positions);
only stage 0 reads the pixels. A stage runs the model's own trunk (``model.trunk``) over its range of
layers, and weighs its ``LossTerms`` as every forward does (``LossTerms.total``: CE by the step's
label count, MoE losses by its micro-batch count), each stage adding its own layers' share.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from neva import comm, llm, model
from neva.config import ModelConfig
from neva.loss import LossTerms
from neva.params import flatten, unflatten

SCHEDULES = ("1f1b", "gpipe")


def schedule_order(kind: str, n_micro: int, stage: int, n_stages: int) -> list[tuple[str, int]]:
    """[("F"|"B", micro-batch), ...] this stage runs, in order."""
    if kind == "gpipe":
        return [("F", m) for m in range(n_micro)] + [("B", m) for m in range(n_micro)]
    if kind != "1f1b":
        raise ValueError(f"pipeline schedule {kind!r}: use one of {SCHEDULES}")
    warm = min(n_stages - stage - 1, n_micro)
    order = [("F", m) for m in range(warm)]
    for i in range(n_micro - warm):
        order += [("F", warm + i), ("B", i)]
    return order + [("B", m) for m in range(n_micro - warm, n_micro)]


def compute_grads(params: dict, cfg: ModelConfig, micro_batches: list[dict], par, *, trainable: list[str],
                  n_total: float, n_micro: int, autocast: Callable | None = None,
                  layers: llm.Layers = llm.layers, loss_scale: float = 1.0,
                  prepare: Callable | None = None) -> tuple[dict[str, Tensor], LossTerms]:
    """This stage's gradients (path -> fp32 tensor, for its ``trainable`` local leaves, not yet
    summed over ranks) and its LossTerms summed over the micro-batches (reduce them over the ranks).
    ``par``: the rank's ``neva.parallel.runtime.Parallel`` (its stage, pipeline group and schedule);
    ``n_total``: the step's label count over all micro-batches and data ranks; ``n_micro``:
    micro-batches x data ranks."""
    dist = par.dist
    s, S = dist.pp_rank, dist.pp_size
    first, last = s == 0, s == S - 1
    flat = flatten(params)
    tr = {p: flat[p].detach().requires_grad_() for p in trainable}
    frozen = {p: v for p, v in flat.items() if p not in tr}
    lead = next(v for p, v in flat.items() if p.startswith("llm/layers/"))
    dtype, device = lead.dtype, lead.device
    p2p = comm.P2P(dist)
    ctxmgr = autocast or (lambda: torch.autocast("cpu", enabled=False))
    saved: dict[int, tuple] = {}
    terms = LossTerms.zeros(device)

    def forward(m: int) -> None:
        nonlocal terms
        nb = model.normalize_batch(cfg, micro_batches[m], dist)
        p = unflatten({**frozen, **tr})
        p = prepare(p) if prepare is not None else p
        B, T = nb["input_ids"].shape
        shape = (B, model.local_len(T, dist), cfg.llm.dim)
        with torch.enable_grad(), ctxmgr():
            x_in = None if first else p2p.recv(shape, dtype, p2p.prev, device).requires_grad_()
            x, t = model.trunk(p, cfg, nb, dist, x=x_in, ids=par.stage, loss=last, layers=layers)
            if not last:
                p2p.send(x.to(dtype), p2p.next)
            loss = t.total(cfg.llm, n_total, n_micro)
        terms = terms + t.detach()
        saved[m] = (x_in, x, loss)

    def backward(m: int) -> None:
        x_in, x_out, loss = saved.pop(m)
        outs, grads_out = [loss * loss_scale], [None]
        if not last:
            outs.append(x_out)
            grads_out.append(p2p.recv(tuple(x_out.shape), dtype, p2p.next, device).to(x_out.dtype))
        keep = [(o, g) for o, g in zip(outs, grads_out) if o.requires_grad]
        if keep:
            torch.autograd.backward([o for o, _ in keep], [g for _, g in keep])
        if not first:
            p2p.send(x_in.grad if x_in.grad is not None else torch.zeros_like(x_in), p2p.prev)

    for kind, m in schedule_order(par.schedule, len(micro_batches), s, S):
        forward(m) if kind == "F" else backward(m)
    p2p.finish()
    grads = {p: (t.grad.float() if t.grad is not None else torch.zeros_like(t, dtype=torch.float32))
             for p, t in tr.items()}
    return grads, terms
