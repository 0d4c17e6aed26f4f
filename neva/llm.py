"""One decoder, configured into Llama 2/3/3.1, Mistral, Mixtral and Nemotron-4: the trunk that the
model's forward, each pipeline stage and generation all run.

  ctx = context(cfg, positions, ...)           rotary tables, attention mask, MoE token mask, KV cache
  x = embed(p, ids, dist)                      (media are spliced in by model.py)
  x, aux, z = layers(p, x, ctx, cfg, dist, ids)  any range of layers: x += attn(norm(x)); x += ffn(norm(x))
  logits = head(p, x, cfg, dist)               final norm, then x @ lm_head.T (this rank's vocab slice)

Llama/Mistral: RMSNorm, SwiGLU, full rotary (Llama-3.1 scaling, Mistral sliding window).
Mixtral: the FFN is a top-k MoE. Nemotron: LayerNorm1p, squared-ReLU MLP, rotary on half of each head.
The FFN of a block is looked up by name in ``neva.registry.FFNS`` (``cfg.ffn``).

Init: embed and lm_head normal(init_std); q/k/v, w1/w3 normal(init_std); wo, w2 (the projections
into the residual stream) normal(init_std / sqrt(2 * n_layers)); norms ones (LayerNorm1p: zeros).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from neva import comm
from neva.comm import Dist
from neva.config import LLMConfig
from neva.layers.attention import attention, attention_specs, make_mask
from neva.layers.embedding import embed as embed_tokens
from neva.layers.embedding import embedding_specs
from neva.layers.mlp import ACTS, mlp, mlp_specs, swiglu, swiglu_specs
from neva.layers.moe import moe, moe_specs
from neva.layers.norm import NORMS
from neva.layers.rope import cos_sin, inv_freq
from neva.params import ParamSpec, normal
from neva.registry import FFN, FFNS


def specs(cfg: LLMConfig) -> dict:
    std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
    norm_specs = NORMS[cfg.norm][0]
    ffn = FFNS[cfg.ffn]
    out = {"embed": embedding_specs(cfg.vocab_size, cfg.dim, std),
           "layers": {str(i): {"attn_norm": norm_specs(cfg.dim),
                               "attn": attention_specs(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.hd,
                                                       std=std, out_std=out_std),
                               "mlp_norm": norm_specs(cfg.dim),
                               "mlp": ffn.specs(cfg, std, out_std)}
                      for i in range(cfg.n_layers)},
           "norm": norm_specs(cfg.dim)}
    if not cfg.tie_embeddings:
        out["lm_head"] = {"w": ParamSpec((cfg.vocab_size, cfg.dim), ("vocab", "embed"), normal(std))}
    return out


def norm(p: dict, x: Tensor, cfg: LLMConfig) -> Tensor:
    return NORMS[cfg.norm][1](p, x, cfg.eps)


@dataclass
class Context:
    """What every layer of one forward shares: rotary tables, the attention mask, the tokens that
    count for MoE statistics, and (generation) the KV cache."""

    rope: tuple[Tensor, Tensor]                 # cos, sin [B, T, rot_dim] (full sequence)
    mask: Tensor | None                         # bool[B, 1, T, S] or None for plain causal
    valid: Tensor | None = None                 # bool[B, T(/tp)] tokens counted by MoE statistics
    cache: dict | None = None                   # {layer id: {"k", "v"}} for generation
    cache_pos: int = 0
    stats: bool = True                          # False: no MoE balance statistics (generation needs none)


def context(cfg: LLMConfig, pos_bt: Tensor, dtype: torch.dtype, *, mask: bool = True,
            segments_bt: Tensor | None = None, k_valid_bs: Tensor | None = None, q_slots_t: Tensor | None = None,
            valid_bt: Tensor | None = None, cache: dict | None = None, cache_pos: int = 0,
            local_t: Tensor | None = None) -> Context:
    """The Context of a forward over positions ``pos`` int[B, T] (rotary tables in ``dtype``).

    ``mask=False``: plain causal attention, no mask built (SDPA's ``is_causal``). Otherwise a mask
    over S key slots (S = ``k_valid``'s width, else T): causal and windowed by slot, never across
    packed samples (``segments``), never to padding (``k_valid`` bool[B, S]); ``q_slots`` int[T] are
    the queries' slots (default 0..T-1; generation: past the cache). ``valid``: MoE token mask.
    ``local_t`` int[T_local] (context parallel): the slots this rank's tokens hold (``comm.cp_slots``);
    rotary tables and queries are at those, keys span all T slots (every rank's keys are gathered)."""
    B, T = pos_bt.shape
    q_seg = segments_bt
    if local_t is not None:
        pos_bt, q_slots_t = pos_bt[:, local_t], local_t
        q_seg = None if segments_bt is None else segments_bt[:, local_t]
    rope = rope_tables(cfg, pos_bt, dtype)
    m = None
    if mask:
        S = T if k_valid_bs is None else k_valid_bs.shape[1]
        q = torch.arange(T, device=pos_bt.device) if q_slots_t is None else q_slots_t
        m = make_mask(q.expand(B, q.shape[0]), torch.arange(S, device=pos_bt.device).expand(B, S), causal=True,
                      window=cfg.sliding_window, q_seg=q_seg, k_seg=segments_bt, k_valid=k_valid_bs)
    return Context(rope=rope, mask=m, valid=valid_bt, cache=cache, cache_pos=cache_pos)


def rope_tables(cfg: LLMConfig, pos_bt: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Rotary (cos, sin) [B, T, rot_dim] in ``dtype`` at positions int[B, T]."""
    return cos_sin(pos_bt, inv_freq(cfg.rot_dim, cfg.rope_theta, cfg.rope_scaling), dtype)


def embed(p: dict, ids_bt: Tensor, dist: Dist) -> Tensor:
    """int[B, T] -> [B, T, D], whole on every tp rank (vocab-parallel lookup, then an all-reduce)."""
    return embed_tokens(p["embed"], ids_bt, dist)


def block(p: dict, x: Tensor, ctx: Context, cfg: LLMConfig, dist: Dist, layer: int,
          moe_dispatch: str = "sorted") -> tuple[Tensor, Tensor, Tensor]:
    """One decoder layer: x [B, T(/tp), D] -> (x, aux, z); aux and z are 0 for dense layers."""
    cache = None if ctx.cache is None else ctx.cache[layer]
    x = x + attention(p["attn"], norm(p["attn_norm"], x, cfg), dist, head_dim=cfg.hd, rope=ctx.rope,
                      mask=ctx.mask, cache=cache, cache_pos=ctx.cache_pos)
    y, aux, z = FFNS[cfg.ffn].apply(p["mlp"], norm(p["mlp_norm"], x, cfg), cfg, dist, valid=ctx.valid,
                                    dispatch=moe_dispatch, stats=ctx.stats)
    return x + y, aux, z


def layers(p: dict, x: Tensor, ctx: Context, cfg: LLMConfig, dist: Dist, ids: Iterable[int],
           moe_dispatch: str = "sorted") -> tuple[Tensor, Tensor, Tensor]:
    """Run layers ``ids`` (global indices: a pipeline stage runs its own range; ``p["layers"]`` needs
    only those) -> (x, sum of aux, sum of z over them)."""
    aux = z = x.new_zeros((), dtype=torch.float32)
    for i in ids:
        x, a, zz = block(p["layers"][str(i)], x, ctx, cfg, dist, int(i), moe_dispatch)
        aux, z = aux + a, z + zz
    return x, aux, z


Layers = Callable[..., tuple[Tensor, Tensor, Tensor]]   # ``layers`` or a wrapper with its signature (remat)


def lm_head_weight(p: dict) -> Tensor:
    return p["lm_head"]["w"] if "lm_head" in p else p["embed"]["w"]


def head_input(p: dict, x_btd: Tensor, cfg: LLMConfig, dist: Dist, rows_bt: Tensor | None = None) -> Tensor:
    """Final norm: x [B, T(/tp), D] -> [B, T, D] (the sequence gathered under SP), or [M, D] at the M
    positions where ``rows`` (bool[B, T]) is set; what the LM head multiplies."""
    h = comm.enter_tp(norm(p["norm"], x_btd, cfg), dist)
    return h if rows_bt is None else h[rows_bt]


def head(p: dict, x_btd: Tensor, cfg: LLMConfig, dist: Dist, rows_bt: Tensor | None = None) -> Tensor:
    """Final norm and LM head: -> logits [B, T, V/tp] (this rank's vocab slice) or [M, V/tp]."""
    return F.linear(head_input(p, x_btd, cfg, dist, rows_bt), lm_head_weight(p))


# --------------------------------------------------------------------------- FFNs, by name
def _dense(fn: Callable) -> Callable:
    def apply(p: dict, x: Tensor, cfg: LLMConfig, dist: Dist, **_) -> tuple[Tensor, Tensor, Tensor]:
        zero = x.new_zeros((), dtype=torch.float32)
        return fn(p, x, dist, cfg), zero, zero
    return apply


def _moe(p: dict, x: Tensor, cfg: LLMConfig, dist: Dist, *, valid=None, dispatch: str = "sorted", stats: bool = True):
    return moe(p, x, dist, top_k=cfg.top_k, dispatch=dispatch, valid_bt=valid, stats=stats)


FFNS.register("moe", FFN(lambda c, std, out: moe_specs(c.dim, c.ffn_dim, c.n_experts, std, out), _moe))
FFNS.register("swiglu", FFN(lambda c, std, out: swiglu_specs(c.dim, c.ffn_dim, std, out),
                            _dense(lambda p, x, dist, c: swiglu(p, x, dist))))
for _act in ACTS:                     # two-matrix MLPs without biases: relu2 (Nemotron), gelu, ...
    FFNS.register(_act, FFN(lambda c, std, out: mlp_specs(c.dim, c.ffn_dim, bias=False, std=std, out_std=out),
                            _dense(lambda p, x, dist, c: mlp(p, x, dist, c.mlp))))
