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

Plug in with ``neva.llm.layers(..., **remat_kwargs(policy, ids))``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor

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


def remat_kwargs(pol: RematPolicy | None, ids: Iterable[int]) -> dict:
    """Keyword arguments for ``neva.llm.layers`` that apply ``pol`` to the layers ``ids``."""
    ids = list(ids)
    if pol is None or pol.method == "none" or not ids:
        return {}
    if pol.method == "uniform":
        return {"remat": checkpoint, "remat_ids": frozenset(ids), "remat_chunk": pol.num_layers}
    return {"remat": checkpoint, "remat_ids": frozenset(ids[:pol.num_layers]), "remat_chunk": 1}
