"""Mixture of experts (Mixtral): softmax router, top-k renormalised, dropless dispatch.

Tokens are grouped by expert with one argsort (no Python loop over tokens; one over the local
experts), run through each expert's SwiGLU, and combined with their routing weights. Expert
parallel: experts are sharded over ``ep`` and rows travel by an uneven all-to-all. Tensor parallel:
each expert's inner dim is sharded over ``tp`` (column then row, as a dense MLP).

Load balancing (Switch): ``aux = E * sum_e f_e * P_e`` with ``f_e`` the fraction of the N*k routing
assignments that went to expert e and ``P_e`` the mean router probability (1.0 when balanced; HF's
Mixtral loss is k times this). Router z-loss: mean over tokens of ``logsumexp(logits)^2``.
Under SP (and CP) the statistics are summed over the tp (and cp) group so the loss equals the
unsharded one; each rank returns its own tokens' share, so gradients need no extra collective.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from neva import comm
from neva.comm import Dist
from neva.params import ParamSpec, normal


def moe_specs(d: int, f: int, n_experts: int, std: float = 0.02, out_std: float | None = None) -> dict:
    """router: [E, d] normal(std); w1 (gate), w3 (up): [E, f, d] normal(std); w2: [E, d, f] normal(out_std)."""
    out_init = normal(out_std if out_std is not None else std)
    return {"router": ParamSpec((n_experts, d), (None, "embed"), normal(std)),
            "w1": ParamSpec((n_experts, f, d), ("experts", "mlp", "embed"), normal(std)),
            "w3": ParamSpec((n_experts, f, d), ("experts", "mlp", "embed"), normal(std)),
            "w2": ParamSpec((n_experts, d, f), ("experts", "embed", "mlp"), out_init)}


def route(router_w: Tensor, x_nd: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """-> router logits float32[N, E], renormalised top-k weights float32[N, k], expert ids int[N, k]."""
    logits = F.linear(x_nd, router_w).float()
    probs = logits.softmax(-1)
    topw, topi = probs.topk(top_k, dim=-1)
    return logits, topw / topw.sum(-1, keepdim=True), topi


def balance_losses(logits_ne: Tensor, topi_nk: Tensor, valid_n: Tensor | None, dist: Dist) -> tuple[Tensor, Tensor]:
    """(aux, z) for this rank's tokens: see the module docstring."""
    E, k = logits_ne.shape[-1], topi_nk.shape[-1]
    w = torch.ones(logits_ne.shape[0], device=logits_ne.device) if valid_n is None else valid_n.float()
    counts = torch.zeros(E, device=logits_ne.device).index_add(     # out of place: vmap (per-example grads)
        0, topi_nk.reshape(-1), w.repeat_interleave(k)).detach()
    n = w.sum().detach()
    if dist.sp:  # the sequence is split over tp: statistics span the whole sequence
        counts, n = comm.all_reduce_nograd(counts, dist.tp), comm.all_reduce_nograd(n, dist.tp)
    if dist.cp is not None:  # and over cp
        counts, n = comm.all_reduce_nograd(counts, dist.cp), comm.all_reduce_nograd(n, dist.cp)
    n = n.clamp_min(1.0)
    prob_sum = (logits_ne.softmax(-1) * w[:, None]).sum(0)
    aux = E * (counts / (n * k) * prob_sum / n).sum()
    z = (torch.logsumexp(logits_ne, -1).square() * w).sum() / n
    return aux, z


def _experts(w1: Tensor, w3: Tensor, w2: Tensor, x_md: Tensor, counts: list[int]) -> Tensor:
    """Rows of x grouped by local expert (``counts`` rows each) -> expert outputs, same order."""
    # an empty group is skipped only when its count is a plain 0 (a decode step routes a few rows
    # to a few experts); in a simulated world counts are per-rank values, and every group runs
    groups = [(e, xe) for e, (xe, c) in enumerate(zip(torch.split(x_md, counts), counts))
              if not (isinstance(c, int) and c == 0)]
    if not groups:   # no rows: expert 0 on none, so the output hangs off the graph like any rank's (under EP
        groups = [(0, x_md)]   # a detached one would drop this rank's all-to-all from the backward: a hang)
    if torch.is_grad_enabled():
        # unbind once: its backward stacks the expert grads in one go, where w1[e] per expert would
        # materialise (and then sum) a zero-filled [E, F, D] gradient for every expert
        w1s, w3s, w2s = w1.unbind(0), w3.unbind(0), w2.unbind(0)
    else:                     # no backward: view only the experts that got rows
        w1s = w3s = w2s = None
    outs = []
    for e, xe in groups:
        a, b, c = (w1s[e], w3s[e], w2s[e]) if w1s is not None else (w1[e], w3[e], w2[e])
        outs.append(F.linear(F.silu(F.linear(xe, a)) * F.linear(xe, b), c))
    return torch.cat(outs)


def dispatch_sorted(p: dict, x_nd: Tensor, topw_nk: Tensor, topi_nk: Tensor, dist: Dist) -> Tensor:
    """Dropless grouped dispatch; under EP rows go to the rank that owns their expert and back."""
    n, k = topi_nk.shape
    e_local = p["w1"].shape[0]
    n_exp = e_local * dist.ep_size
    flat = topi_nk.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tok = order // k
    counts = torch.bincount(flat, minlength=n_exp)
    xs = x_nd[tok]                                                     # [N*k, D] grouped by expert
    if dist.ep is None:
        ys = _experts(p["w1"], p["w3"], p["w2"], xs, counts.tolist())
    else:
        send_ec = counts.view(dist.ep_size, e_local)                     # rows: destination rank
        recv_ec = comm.all_to_all_counts(send_ec, dist.ep)               # rows: source rank
        send, recv = send_ec.sum(1).tolist(), recv_ec.sum(1).tolist()
        xr = comm.all_to_all(xs, send, recv, dist.ep)                    # by source, then local expert
        expert_of_row = torch.arange(e_local, device=xs.device).repeat(dist.ep_size).repeat_interleave(recv_ec.reshape(-1))
        regroup = torch.argsort(expert_of_row, stable=True)
        yr = _experts(p["w1"], p["w3"], p["w2"], xr[regroup], recv_ec.sum(0).tolist())
        yr = yr[torch.argsort(regroup)]
        ys = comm.all_to_all(yr, recv, send, dist.ep)
    w = topw_nk.reshape(-1)[order].to(ys.dtype)
    return ys.new_zeros(n, ys.shape[-1]).index_add(0, tok, ys * w[:, None])   # ys: autocast dtype


def dispatch_dense(p: dict, x_nd: Tensor, topw_nk: Tensor, topi_nk: Tensor, dist: Dist) -> Tensor:
    """Every expert on every token, weighted by a dense combine matrix: data-independent shapes, so
    it runs under ``vmap``; E/k times the FLOPs. Not for EP."""
    if dist.ep is not None:
        raise ValueError("model.moe_dispatch=dense does not support expert parallelism; use sorted")
    combine = torch.zeros(x_nd.shape[0], p["w1"].shape[0], dtype=x_nd.dtype, device=x_nd.device)
    combine = combine.scatter(1, topi_nk, topw_nk.to(x_nd.dtype))
    h = F.silu(torch.einsum("nd,efd->nef", x_nd, p["w1"])) * torch.einsum("nd,efd->nef", x_nd, p["w3"])
    return torch.einsum("ne,nef,edf->nd", combine, h, p["w2"])


def moe(p: dict, x_btd: Tensor, dist: Dist, *, top_k: int, dispatch: str = "sorted",
        valid_bt: Tensor | None = None, stats: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """x: [B, T(/tp), D] -> (y like x, aux loss, z loss) for this rank's tokens (zeros unless ``stats``).

    Routing runs outside the TP region, on this rank's tokens (like a norm); the routed tokens and
    their weights then enter the TP region, so every tp rank dispatches the same rows.
    """
    B, T, D = x_btd.shape
    logits, topw, topi = route(p["router"], x_btd.reshape(-1, D), top_k)
    if stats:
        aux, z = balance_losses(logits, topi, None if valid_bt is None else valid_bt.reshape(-1), dist)
    else:
        aux = z = logits.new_zeros(())
    x = comm.enter_tp(x_btd, dist)
    topw = comm.enter_tp(topw.view(B, T, top_k), dist)
    topi = comm.gather_seq(topi.view(B, T, top_k), dist) if dist.sp else topi.view(B, T, top_k)
    Tf = x.shape[1]
    fn = dispatch_sorted if dispatch == "sorted" else dispatch_dense
    y = fn(p, x.reshape(-1, D), topw.reshape(-1, top_k), topi.reshape(-1, top_k), dist)
    return comm.exit_tp(y.view(B, Tf, D), dist), aux, z
