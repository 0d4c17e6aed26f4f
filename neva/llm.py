"""One decoder function, configured into Llama 2/3/3.1, Mistral, Mixtral and Nemotron-4.

  x = embed(ids) (+ media spliced in by model.py)
  per layer:  x += attn(norm(x));  x += mlp_or_moe(norm(x))
  logits = norm(x) @ lm_head.T

Llama/Mistral: RMSNorm, SwiGLU, full rotary (Llama-3.1 scaling, Mistral sliding window).
Mixtral: the MLP is a top-k MoE. Nemotron: LayerNorm1p, squared-ReLU MLP, rotary on half of each head.

Init: embed and lm_head normal(init_std); q/k/v, w1/w3 normal(init_std); wo, w2 (the projections
into the residual stream) normal(init_std / sqrt(2 * n_layers)); norms ones (LayerNorm1p: zeros).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor

from neva.config import LLMConfig
from neva.layers.attention import attention, attention_specs
from neva.layers.embedding import embedding_specs
from neva.layers.mlp import mlp, mlp_specs, swiglu, swiglu_specs
from neva.layers.moe import moe, moe_specs
from neva.layers.norm import NORMS
from neva.params import ParamSpec, normal
from neva.parallel.comm import Dist


def specs(cfg: LLMConfig) -> dict:
    std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
    norm_specs = NORMS[cfg.norm][0]

    def ffn():
        if cfg.n_experts:
            return moe_specs(cfg.dim, cfg.ffn_dim, cfg.n_experts, std, out_std)
        if cfg.mlp == "swiglu":
            return swiglu_specs(cfg.dim, cfg.ffn_dim, std, out_std)
        return mlp_specs(cfg.dim, cfg.ffn_dim, bias=False, std=std, out_std=out_std)

    out = {"embed": embedding_specs(cfg.vocab_size, cfg.dim, std),
           "layers": {str(i): {"attn_norm": norm_specs(cfg.dim),
                               "attn": attention_specs(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.hd,
                                                       std=std, out_std=out_std),
                               "mlp_norm": norm_specs(cfg.dim),
                               "mlp": ffn()}
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


def block(p: dict, x: Tensor, ctx: Context, cfg: LLMConfig, dist: Dist, layer: int,
          moe_dispatch: str = "sorted") -> tuple[Tensor, Tensor, Tensor]:
    """One decoder layer: x [B, T(/tp), D] -> (x, aux, z); aux and z are 0 for dense layers."""
    cache = None if ctx.cache is None else ctx.cache[layer]
    x = x + attention(p["attn"], norm(p["attn_norm"], x, cfg), dist, head_dim=cfg.hd, rope=ctx.rope,
                      mask=ctx.mask, cache=cache, cache_pos=ctx.cache_pos)
    h = norm(p["mlp_norm"], x, cfg)
    if cfg.n_experts:
        y, aux, z = moe(p["mlp"], h, dist, top_k=cfg.top_k, dispatch=moe_dispatch, valid_bt=ctx.valid)
        return x + y, aux, z
    y = swiglu(p["mlp"], h, dist) if cfg.mlp == "swiglu" else mlp(p["mlp"], h, dist, cfg.mlp)
    zero = x.new_zeros((), dtype=torch.float32)
    return x + y, zero, zero


Remat = Callable[..., tuple[Tensor, Tensor, Tensor]]


def layers(p: dict, x: Tensor, ctx: Context, cfg: LLMConfig, dist: Dist, ids: Iterable[int],
           moe_dispatch: str = "sorted", remat: Remat | None = None,
           remat_ids: frozenset[int] = frozenset(), remat_chunk: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """Run layers ``ids`` (global indices; a pipeline stage runs its own range).
    -> (x, sum of aux, sum of z) over those layers.

    remat(fn, chunk_params, x) recomputes ``fn`` in the backward instead of storing its activations;
    it wraps runs of up to ``remat_chunk`` consecutive layers of ``remat_ids`` (chunk_params is
    {layer id: that layer's params})."""
    aux = z = x.new_zeros((), dtype=torch.float32)

    def run(lps: dict, xx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a = zz = xx.new_zeros((), dtype=torch.float32)
        for i, lp in lps.items():
            xx, da, dz = block(lp, xx, ctx, cfg, dist, int(i), moe_dispatch)
            a, zz = a + da, zz + dz
        return xx, a, zz

    ids, k = list(ids), 0
    while k < len(ids):
        chunk = [ids[k]]
        if remat and ids[k] in remat_ids:
            while len(chunk) < remat_chunk and k + len(chunk) < len(ids) and ids[k + len(chunk)] in remat_ids:
                chunk.append(ids[k + len(chunk)])
        lps = {str(i): p["layers"][str(i)] for i in chunk}
        x, a, zz = remat(run, lps, x) if (remat and ids[k] in remat_ids) else run(lps, x)
        aux, z, k = aux + a, z + zz, k + len(chunk)
    return x, aux, z


def lm_head_weight(p: dict) -> Tensor:
    return p["lm_head"]["w"] if "lm_head" in p else p["embed"]["w"]
