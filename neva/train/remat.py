"""Activation checkpointing that works under plain autograd and under ``torch.func.grad``.

``torch.utils.checkpoint`` fails under ``torch.func`` transforms, so a checkpointed chunk is a custom
``autograd.Function`` (with ``setup_context``, which functorch requires) whose forward keeps only its
inputs and whose backward recomputes the chunk with ``torch.func.vjp``. The autocast state and the
attention kernel choice of the forward are restored for the recomputation, so bf16 runs recompute
the same values.

Policies, as NeMo/Megatron name them (``recompute_method`` with ``recompute_num_layers``):
  uniform  every layer is checkpointed, in chunks of ``num_layers`` consecutive layers (the chunk's
           input is kept, everything inside it recomputed)
  block    only the first ``num_layers`` layers (of the layers this rank runs) are checkpointed, one
           chunk each; the rest keep their activations

``layers(policy)`` wraps ``neva.llm.layers`` into a function of the same signature that runs the
layers it is given in chunks, checkpointing the chunks the policy names; the model's trunk and each
pipeline stage take it as their ``layers``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from neva import llm
from neva.params import flatten, unflatten

METHODS = ("none", "uniform", "block")


@dataclass(frozen=True)
class RematPolicy:
    method: str = "none"
    num_layers: int = 1

    def validate(self) -> "RematPolicy":
        if self.method not in METHODS:
            raise ValueError(f"train.remat.method={self.method!r}: use one of {METHODS}")
        if self.num_layers < 1:
            raise ValueError(f"train.remat.num_layers={self.num_layers} must be >= 1")
        return self


def _sdpa_backends():
    """The attention kernels allowed now (``sdpa_kernel`` may have narrowed them), or None."""
    cur = getattr(torch.nn.attention, "_cur_sdpa_kernel_backends", None)
    return cur() if cur is not None else None


def _sdpa_kernel(backends):
    if backends is None:
        return contextlib.nullcontext()
    return torch.nn.attention.sdpa_kernel(backends)


class _Remat(torch.autograd.Function):
    @staticmethod
    def forward(fn, keys, x, *leaves):
        return fn(unflatten(dict(zip(keys, leaves))), x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        fn, keys, x, *leaves = inputs
        ctx.fn, ctx.keys = fn, keys
        ctx.autocast = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
        ctx.sdpa = _sdpa_backends()
        ctx.save_for_backward(x, *leaves)

    @staticmethod
    def backward(ctx, *grads_out):
        x, *leaves = ctx.saved_tensors
        keys, fn = ctx.keys, ctx.fn

        def run(xx, *ls):
            return fn(unflatten(dict(zip(keys, ls))), xx)

        on, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast("cpu", dtype=dtype, enabled=on), _sdpa_kernel(ctx.sdpa):
            outs, vjp = torch.func.vjp(run, x, *leaves)
        # outputs nobody used come back as None: give vjp zeros of the right shape
        cot = tuple(torch.zeros_like(o) if g is None else g for o, g in zip(outs, grads_out))
        gx, *gl = vjp(cot)
        return (None, None, gx, *gl)


def checkpoint(fn: Callable[[dict, Tensor], tuple], p: dict, x: Tensor) -> tuple:
    """``fn(p, x)`` -> tuple of tensors, storing only ``x`` and ``p`` for the backward."""
    flat = flatten(p)
    return _Remat.apply(fn, tuple(flat), x, *flat.values())


def chunks(pol: RematPolicy, ids: list[int]) -> list[tuple[list[int], bool]]:
    """``ids`` cut into runs of consecutive layers, each with whether it is checkpointed."""
    if pol.method == "uniform":
        return [(ids[k:k + pol.num_layers], True) for k in range(0, len(ids), pol.num_layers)]
    if pol.method == "block":
        return [([i], True) for i in ids[:pol.num_layers]] + ([(ids[pol.num_layers:], False)] if ids[pol.num_layers:] else [])
    return [(ids, False)] if ids else []


def layers(pol: RematPolicy | None, run: llm.Layers = llm.layers) -> llm.Layers:
    """``run`` (``neva.llm.layers``) with ``pol`` applied to whatever layers it is asked to run (a
    pipeline stage: its own; ``block`` counts from the first of them)."""
    if pol is None or pol.method == "none":
        return run

    def remat_layers(p: dict, x: Tensor, ctx, cfg, dist, ids, **kw) -> tuple[Tensor, Tensor, Tensor]:
        aux = z = x.new_zeros((), dtype=torch.float32)
        for chunk, ckpt in chunks(pol, list(ids)):
            lp = {"layers": {str(i): p["layers"][str(i)] for i in chunk}}
            fn = lambda pp, xx, chunk=chunk: run(pp, xx, ctx, cfg, dist, chunk, **kw)   # noqa: E731
            x, a, zz = checkpoint(fn, lp, x) if ckpt else fn(lp, x)
            aux, z = aux + a, z + zz
        return x, aux, z
    return remat_layers
