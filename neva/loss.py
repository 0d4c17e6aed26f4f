"""The loss: next-token cross-entropy over label positions only, vocab-parallel under TP (no rank ever
holds the full logits; Megatron's VocabParallelCrossEntropy), fused with the LM head in chunks of
rows for training (``linear_cross_entropy_sum``: no [M, V] tensor at all), and ``LossTerms``, the
one contract by which a forward reports its share of a step's loss and a step reduces them.

A step's loss is ``CE summed over its label tokens / its label count + (aux_coef * aux + z_coef * z) /
(MoE layers x micro-batches)``, where the step spans every micro-batch of every data-parallel rank.
Each forward returns its sums (``LossTerms``); ``total`` weighs them into its share of that loss, so
the shares of all micro-batches, pipeline stages and ranks add up to the step's loss exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import Tensor

from neva import comm
from neva.batch import IGNORE
from neva.comm import Dist
from neva.config import LLMConfig


def _softmax_nll(lg: Tensor, local: Tensor, group, out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """lg float32[m, V/tp]: this rank's slice of some rows' logits (overwritten), local int[m]: the targets
    minus the slice's start -> (CE per row float[m], softmax over the whole vocabulary, this slice
    float[m, V/tp], target index in the slice int[m], whether the target is in the slice bool[m]).
    Split over tp ranks: the global max, picked logit and sum are all-reduced. Whole: one softmax kernel
    (into ``out`` if given), half the passes over the rows, and the CE read from p[target]."""
    V = lg.shape[-1]
    rows = torch.arange(lg.shape[0], device=lg.device)
    inside = (local >= 0) & (local < V)
    idx = local.clamp(0, V - 1)
    if group is None:
        p = lg.softmax(-1) if out is None else torch.ops.aten._softmax.out(lg, -1, False, out=out)
        pt = p[rows, idx]
        nll = -pt.log()
        low = pt < 1e-30                   # -log p is exact to ~87 nats; rows past 69 take the long way
        if bool(low.any()):
            nll = torch.where(low, lg.logsumexp(-1) - lg[rows, idx], nll)
        return nll, p, idx, inside
    m = comm.all_reduce_nograd(lg.max(-1, keepdim=True).values, group, "max")          # [m, 1]
    picked = comm.all_reduce_nograd((lg[rows, idx] - m.squeeze(-1)) * inside, group, "sum")
    p = lg.sub_(m).exp_()
    se = comm.all_reduce_nograd(p.sum(-1, keepdim=True), group, "sum")
    return se.squeeze(-1).log() - picked, p.div_(se), idx, inside


class _VocabParallelCE(torch.autograd.Function):
    """logits float[M, V/tp] (this rank's vocab slice starting at ``start``), targets int[M]
    -> per-row loss float[M]; the gradient is softmax - onehot, computed locally."""

    @staticmethod
    def forward(logits, target, start, group):
        return _softmax_nll(logits.to(torch.float32, copy=True), target - start, group)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, soft, idx, inside = output
        ctx.mark_non_differentiable(soft, idx, inside)
        ctx.save_for_backward(soft, idx, inside)
        ctx.dtype = inputs[0].dtype

    @staticmethod
    def backward(ctx, g, *_):
        soft, idx, inside = ctx.saved_tensors
        rows = torch.arange(soft.shape[0], device=soft.device)
        grad = soft.index_put((rows, idx), -inside.to(soft.dtype), accumulate=True)
        return (grad * g.unsqueeze(-1)).to(ctx.dtype), None, None, None


def cross_entropy_sum(logits_mv: Tensor, target_m: Tensor, dist: Dist) -> Tensor:
    """Sum over rows of CE(logits, target) in fp32; ``logits`` holds this rank's vocab slice. Rows whose
    target is IGNORE add 0 (as ``F.cross_entropy``'s ignore_index: per-example gradients run the head on
    every row); zero rows give 0 (a cp rank whose chunks hold no label). Rows are picked by advanced
    indexing rather than gather: the simulated world (LocalTensorMode) takes it when ranks hold
    different row counts."""
    keep = target_m != IGNORE
    if dist.tp is None:
        logp = F.log_softmax(logits_mv.float(), -1)
        return -(logp[torch.arange(logp.shape[0], device=logp.device), target_m.clamp_min(0)] * keep).sum()
    start = dist.tp_rank * logits_mv.shape[-1]
    return (_VocabParallelCE.apply(logits_mv, target_m, start, dist.tp)[0] * keep).sum()


# Rows of logits made at once by ``linear_cross_entropy_sum``: [256, 32000] fp32 is 32 MB. In the
# bench's training step chunks of 64 to 2048 rows ran within 5% of each other (64 the slowest: the
# weight gradient's accumulation is read and written once per chunk), so this bounds memory.
CE_CHUNK_ROWS = 256


class _LinearCE(torch.autograd.Function):
    """h [M, D], w [V/tp, D] (this rank's vocab slice starting at ``start``), target int[M] -> the CE
    summed over the rows (fp32, 0-dim), and the gradients of that sum for h and w (fp32; empty where
    not asked for). Chunks of rows go through head, softmax and gradient at once, so no [M, V] tensor
    exists: on a 32k vocabulary the [M, V] logits, log-probabilities and their gradient are 3 x 128 MB
    per 1k labels, and an elementwise pass over them costs more than a matmul on a CPU."""

    @staticmethod
    def forward(h, w, target, start, group, need_h, need_w):
        M, V = h.shape[0], w.shape[0]
        total = torch.zeros((), device=h.device, dtype=torch.float32)
        gh, gw = [], None
        # A simulated world's ranks may hold different M (a symbolic size): one chunk there.
        chunks = list(zip(h.split(CE_CHUNK_ROWS), target.split(CE_CHUNK_ROWS))) if isinstance(M, int) else [(h, target)]
        # one buffer for every chunk's logits: a fresh 32 MB tensor per chunk costs its page faults again
        buf = torch.empty(chunks[0][0].shape[0], V, device=h.device, dtype=torch.float32) if len(chunks) > 1 else None
        pbuf = torch.empty_like(buf) if buf is not None and group is None else None
        for hc, tc in chunks:
            if buf is None:
                lg = F.linear(hc, w).float()                                         # [m, V/tp]
            elif w.dtype == torch.float32:
                lg = torch.mm(hc, w.t(), out=buf[:hc.shape[0]])
            else:
                lg = buf[:hc.shape[0]].copy_(F.linear(hc, w))
            nll, p, idx, inside = _softmax_nll(lg, tc - start, group, None if pbuf is None else pbuf[:hc.shape[0]])
            total += nll.sum()
            rows = torch.arange(hc.shape[0], device=h.device)
            p = p.index_put_((rows, idx), -inside.float(), accumulate=True).to(w.dtype)    # softmax - onehot
            if need_h:
                gh.append(p @ w)
            if need_w:   # accumulated in place in fp32: no [V, D] temporary per chunk
                gw = (p.T @ hc).float() if gw is None else gw.addmm_(p.T, hc) if p.dtype == gw.dtype else \
                    gw.add_(p.T @ hc)
        empty = h.new_zeros(0, h.shape[1], dtype=torch.float32)
        return total, torch.cat(gh).float() if need_h else empty, empty if gw is None else gw

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, gh, gw = output
        ctx.mark_non_differentiable(gh, gw)
        ctx.save_for_backward(gh, gw)
        ctx.dtypes = inputs[0].dtype, inputs[1].dtype
        ctx.need = inputs[5], inputs[6]

    @staticmethod
    def backward(ctx, g, *_):
        gh, gw = ctx.saved_tensors
        return ((gh * g).to(ctx.dtypes[0]) if ctx.need[0] else None, (gw * g).to(ctx.dtypes[1]) if ctx.need[1] else None,
                None, None, None, None, None)


def linear_cross_entropy_sum(h_md: Tensor, w_vd: Tensor, target_m: Tensor, dist: Dist) -> Tensor:
    """``cross_entropy_sum(F.linear(h, w), target)`` where every target is a label (not IGNORE), in
    chunks of rows that never hold the [M, V] logits: forward computes the gradients too (it is meant
    for training, and without autograd this is the two-step form). ``w`` is this rank's vocab slice under TP;
    h's gradient is then this rank's part, which the head's entry to TP sums."""
    need_h, need_w = torch.is_grad_enabled() and h_md.requires_grad, torch.is_grad_enabled() and w_vd.requires_grad
    if not (need_h or need_w):
        return cross_entropy_sum(F.linear(h_md, w_vd), target_m, dist)
    start = dist.tp_rank * w_vd.shape[0] if dist.tp is not None else 0
    return _LinearCE.apply(h_md, w_vd, target_m, start, dist.tp, need_h, need_w)[0]


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


def label_count(batch: dict) -> Tensor:
    """Tokens the loss trains on in a batch: labels that some position predicts (after the shift).
    A 0-dim tensor, so a count over ranks is one all-reduce away."""
    return (shift_labels(batch["labels"], batch.get("segment_ids")) != IGNORE).sum()


@dataclass
class LossTerms:
    """One forward's share of a step's loss, as sums (fp32 scalars): ``ce`` over its label tokens,
    ``n_tokens`` of them, and the MoE balance (``aux``) and router z-losses summed over the MoE
    layers it ran (its own tokens' share under SP). A pytree, so it passes through ``torch.func``."""

    ce: Tensor
    n_tokens: Tensor
    aux: Tensor
    z: Tensor

    @staticmethod
    def zeros(device=None) -> "LossTerms":
        return LossTerms(*(torch.zeros((), device=device) for _ in range(4)))

    def __add__(self, other: "LossTerms") -> "LossTerms":
        return LossTerms(self.ce + other.ce, self.n_tokens + other.n_tokens, self.aux + other.aux, self.z + other.z)

    def detach(self) -> "LossTerms":
        return LossTerms(*(t.detach().float() for t in (self.ce, self.n_tokens, self.aux, self.z)))

    def total(self, cfg: LLMConfig, n_tokens: Tensor | float | None = None, n_micro: int = 1) -> Tensor:
        """The share of a step's loss these terms make: the step has ``n_tokens`` label tokens and
        ``n_micro`` micro-batches over all data ranks (default: these terms are the whole step)."""
        n = self.n_tokens if n_tokens is None else n_tokens
        loss = self.ce / torch.as_tensor(n).clamp_min(1)
        if cfg.n_experts:
            loss = loss + (cfg.aux_loss_coef * self.aux + cfg.z_loss_coef * self.z) / (cfg.n_layers * n_micro)
        return loss

    def reduce(self, dist: Dist) -> "LossTerms":
        """Summed over the ranks that hold parts of a step (no autograd): pipeline stages (each its
        layers' MoE terms, the last one the CE), tp ranks under SP (each its tokens' MoE terms), cp
        ranks (each the CE, label count and MoE terms of its chunks; a rank without a label adds 0),
        and the data ranks."""
        v = torch.stack([self.ce, self.n_tokens, self.aux, self.z]).float()
        v = comm.all_reduce_nograd(v, dist.pp)
        if dist.sp:
            v = torch.cat([v[:2], comm.all_reduce_nograd(v[2:], dist.tp)])
        v = comm.all_reduce_nograd(v, dist.cp)
        return LossTerms(*comm.all_reduce_nograd(v, dist.data).unbind())

    def means(self, cfg: LLMConfig, n_micro: int) -> dict[str, float]:
        """A step's reduced terms as a metrics row: loss, mean CE per label token, aux and z per MoE
        layer and micro-batch."""
        L = (cfg.n_layers if cfg.n_experts else 1) * n_micro
        return {"loss": float(self.total(cfg, n_micro=n_micro)), "ce": float(self.ce / self.n_tokens.clamp_min(1)),
                "aux": float(self.aux) / L, "z": float(self.z) / L}


pytree.register_dataclass(LossTerms)
