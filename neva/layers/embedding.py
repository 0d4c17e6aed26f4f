"""Token embedding (vocab-parallel under TP) and ViT patch embedding."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from neva import comm
from neva.comm import Dist
from neva.params import ZEROS, ParamSpec, normal


def embedding_specs(vocab: int, d: int, std: float = 0.02) -> dict:
    """w: [V, d] normal(std), sharded over vocab under TP."""
    return {"w": ParamSpec((vocab, d), ("vocab", "embed"), normal(std))}


def embed(p: dict, ids_bt: Tensor, dist: Dist) -> Tensor:
    """int[B, T] -> [B, T, d], replicated on every tp rank (the all-reduce of Megatron's
    VocabParallelEmbedding; media are spliced into the full sequence before any SP split)."""
    w = p["w"]
    if dist.tp is None:
        return F.embedding(ids_bt, w)
    start = dist.tp_rank * w.shape[0]
    local = ids_bt - start
    outside = (local < 0) | (local >= w.shape[0])
    x = F.embedding(local.masked_fill(outside, 0), w) * (~outside)[..., None].to(w.dtype)
    return comm.reduce_from_tp(x, dist)


def patch_embedding_specs(channels: int, d: int, patch: int, bias: bool, std: float = 0.02) -> dict:
    """w: [d, C, p, p] normal(std) (HF's Conv2d layout); b: [d] zeros."""
    out = {"w": ParamSpec((d, channels, patch, patch), ("embed", None, None, None), normal(std))}
    if bias:
        out["b"] = ParamSpec((d,), ("embed",), ZEROS)
    return out


def patch_embed(p: dict, images_nchw: Tensor) -> Tensor:
    """float[N, C, H, W] -> [N, (H/p)*(W/p), d], patches in row-major order."""
    patch = p["w"].shape[-1]
    y = F.conv2d(images_nchw.to(p["w"].dtype), p["w"], p.get("b"), stride=patch)
    return y.flatten(2).transpose(1, 2)
