"""Multi-head attention with GQA, rotary, causal / sliding-window / padding / packed-segment masks,
through ``F.scaled_dot_product_attention`` (flash kernels on GPU), tensor-parallel over heads.

Under TP each rank holds ``n_heads / tp`` query heads and ``n_kv_heads / tp`` kv heads; the head
counts are read off the local weight shapes, so the same function runs sharded and unsharded.

Under context parallelism (``dist.cp``) a rank's queries are its two chunks of the sequence (i and
2cp-1-i); it gathers every rank's keys and values (``comm.gather_kv``: all-gather forward,
reduce-scatter backward) and runs each chunk against the keys up to that chunk's end (the causal
prefix): every rank then does the same work, (2cp + 1) chunk x chunk blocks. The mask (always given
under cp) carries the rest: causality within the last block, windows, packed samples, padding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from neva import comm
from neva.comm import Dist
from neva.layers.linear import linear_specs
from neva.layers.rope import apply_rope
from neva.params import normal


def attention_specs(dim: int, n_heads: int, n_kv_heads: int, head_dim: int, bias: bool = False,
                    std: float = 0.02, out_std: float | None = None) -> dict:
    """wq: [H*hd, D], wk/wv: [KV*hd, D] normal(std); wo: [D, H*hd] normal(out_std); biases zeros."""
    init, out_init = normal(std), normal(out_std if out_std is not None else std)
    return {
        "wq": linear_specs(n_heads * head_dim, dim, ("heads", "embed"), bias, init),
        "wk": linear_specs(n_kv_heads * head_dim, dim, ("kv_heads", "embed"), bias, init),
        "wv": linear_specs(n_kv_heads * head_dim, dim, ("kv_heads", "embed"), bias, init),
        "wo": linear_specs(dim, n_heads * head_dim, ("embed", "heads"), bias, out_init, bias_axis=None),
    }


def make_mask(q_pos: Tensor, k_pos: Tensor, *, causal: bool = True, window: int | None = None,
              q_seg: Tensor | None = None, k_seg: Tensor | None = None,
              k_valid: Tensor | None = None) -> Tensor:
    """bool[B, 1, Tq, Tk], True = may attend.

    q_pos, k_pos: int[B, Tq] / int[B, Tk] indices into one sequence (for causality and the window);
    q_seg, k_seg: packed-sample ids (attention never crosses samples); k_valid: bool[B, Tk] padding.
    A query with nothing to attend to (a padding row) is allowed itself, so no row is all-masked.
    """
    # out of place: under vmap (per-example gradients) the padding and segments are batched, the positions not
    m = torch.ones(q_pos.shape[0], q_pos.shape[1], k_pos.shape[1], dtype=torch.bool, device=q_pos.device)
    d = q_pos[:, :, None] - k_pos[:, None, :]
    if causal:
        m = m & (d >= 0)
    if window is not None:
        m = m & (d < window)
    if q_seg is not None:
        m = m & (q_seg[:, :, None] == k_seg[:, None, :])
    if k_valid is not None:
        m = m & k_valid[:, None, :]
    m = m | (d == 0)
    return m[:, None]


def attention(p: dict, x_btd: Tensor, dist: Dist, *, head_dim: int, rope: tuple[Tensor, Tensor] | None = None,
              mask: Tensor | None = None, causal: bool = True, cache: dict | None = None,
              cache_pos: int = 0) -> Tensor:
    """x: [B, T, D] (or [B, T/tp, D] under SP) -> [B, T(/tp), D].

    mask: bool[B, 1, T, S] from ``make_mask`` (None = plain causal, or full if not ``causal``).
    cache: {"k", "v": [B, KV_local, S_max, hd]} written in place at ``cache_pos`` (generation); the
    queries then attend to the cache's first ``cache_pos + T`` slots (never to later, unwritten ones),
    which the mask spans.
    """
    x = comm.enter_tp(x_btd, dist)
    B, T, _ = x.shape
    q = F.linear(x, p["wq"]["w"], p["wq"].get("b")).view(B, T, -1, head_dim).transpose(1, 2)
    k = F.linear(x, p["wk"]["w"], p["wk"].get("b")).view(B, T, -1, head_dim).transpose(1, 2)
    v = F.linear(x, p["wv"]["w"], p["wv"].get("b")).view(B, T, -1, head_dim).transpose(1, 2)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    if cache is not None:
        end = cache_pos + T
        cache["k"][:, :, cache_pos:end] = k
        cache["v"][:, :, cache_pos:end] = v
        k, v = cache["k"][:, :, :end], cache["v"][:, :, :end]
    gqa = q.shape[1] != k.shape[1]
    if dist.cp is not None:
        if cache is not None or mask is None:
            raise ValueError("context-parallel attention needs the mask of its queries' slots and no KV cache "
                             "(generate with cp=1)")
        o = _cp_attention(q, comm.gather_kv(k, dist, 2), comm.gather_kv(v, dist, 2), mask, dist, gqa)
    elif mask is None:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal and T > 1, enable_gqa=gqa)
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    o = o.transpose(1, 2).reshape(B, T, -1)
    y = comm.exit_tp(F.linear(o, p["wo"]["w"]), dist)
    return y + p["wo"]["b"] if "b" in p["wo"] else y


def _cp_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, dist: Dist, gqa: bool) -> Tensor:
    """q [B, H, 2c, hd] (this cp rank's chunks), k, v [B, KV, 2cp*c, hd] (the whole sequence), mask
    bool[B, 1, 2c, 2cp*c] -> [B, H, 2c, hd]: each chunk against the keys up to its own end."""
    c = q.shape[2] // 2
    outs = []
    for j, chunk in enumerate((dist.cp_rank, 2 * dist.cp_size - 1 - dist.cp_rank)):
        end = (chunk + 1) * c
        outs.append(F.scaled_dot_product_attention(q.narrow(2, j * c, c), k.narrow(2, 0, end), v.narrow(2, 0, end),
                                                   attn_mask=mask.narrow(2, j * c, c).narrow(3, 0, end), enable_gqa=gqa))
    return torch.cat(outs, 2)
