"""Next-token cross-entropy over label positions only, vocab-parallel under TP (no rank ever holds
the full logits; Megatron's VocabParallelCrossEntropy)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from neva.parallel import comm
from neva.parallel.comm import Dist

IGNORE = -100


class _VocabParallelCE(torch.autograd.Function):
    """logits float[M, V/tp] (this rank's vocab slice starting at ``start``), targets int[M]
    -> per-row loss float[M]; the gradient is softmax - onehot, computed locally."""

    @staticmethod
    def forward(logits, target, start, group):
        logits = logits.float()
        lmax = comm.all_reduce_nograd(logits.max(-1).values, group, "max")
        z = logits - lmax[:, None]
        e = z.exp()
        sumexp = comm.all_reduce_nograd(e.sum(-1), group, "sum")
        local = target - start
        inside = (local >= 0) & (local < logits.shape[-1])
        idx = local.clamp(0, logits.shape[-1] - 1)
        picked = z.gather(1, idx[:, None])[:, 0] * inside
        picked = comm.all_reduce_nograd(picked, group, "sum")
        return sumexp.log() - picked, e / sumexp[:, None], idx, inside

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, soft, idx, inside = output
        ctx.mark_non_differentiable(soft, idx, inside)
        ctx.save_for_backward(soft, idx, inside)
        ctx.dtype = inputs[0].dtype

    @staticmethod
    def backward(ctx, g, *_):
        soft, idx, inside = ctx.saved_tensors
        grad = soft.scatter_add(1, idx[:, None], -inside.to(soft.dtype)[:, None])
        return (grad * g[:, None]).to(ctx.dtype), None, None, None


def cross_entropy_sum(logits_mv: Tensor, target_m: Tensor, dist: Dist) -> Tensor:
    """Sum over rows of CE(logits, target) in fp32; ``logits`` holds this rank's vocab slice."""
    if dist.tp is None:
        return F.cross_entropy(logits_mv.float(), target_m, reduction="sum")
    start = dist.tp_rank * logits_mv.shape[-1]
    return _VocabParallelCE.apply(logits_mv, target_m, start, dist.tp)[0].sum()


def shift_labels(labels_bt: Tensor, segment_bt: Tensor | None = None) -> Tensor:
    """Targets for next-token prediction, aligned with the positions that predict them: target[t] =
    labels[t + 1], IGNORE at the end and where t and t + 1 are in different packed samples."""
    tgt = torch.full_like(labels_bt, IGNORE)
    tgt[:, :-1] = labels_bt[:, 1:]
    if segment_bt is not None:
        cross = torch.zeros_like(labels_bt, dtype=torch.bool)
        cross[:, :-1] = segment_bt[:, 1:] != segment_bt[:, :-1]
        tgt = tgt.masked_fill(cross, IGNORE)
    return tgt
