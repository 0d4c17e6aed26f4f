"""Projectors from vision features to LLM embeddings: linear, mlpNx_gelu (any N), mlp_downsample
(NeMo / VILA: zero-pad an odd grid, concatenate each 2x2 block, LayerNorm, Linear, GELU, Linear) and
identity.

Tensor parallel: linears pair up as column then row (the hidden dim on ``mlp``); an unpaired last
linear is replicated. Init: weights normal(0.02), biases zeros, norm ones/zeros.
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from neva.config import ModelConfig
from neva.layers.linear import linear_specs
from neva.layers.norm import layer_norm, layer_norm_specs
from neva.parallel import comm
from neva.parallel.comm import Dist


def _axes(i: int, n: int) -> tuple:
    """Logical axes of linear i of n: column (0, 2, ...), row (1, 3, ...), last unpaired replicated."""
    if i % 2 == 1:
        return ("embed", "mlp")
    return ("mlp", "embed") if i + 1 < n else ("embed", "embed")


def specs(cfg: ModelConfig) -> dict:
    p, dv, dl = cfg.projector, cfg.vision.dim, cfg.llm.dim
    if p.kind == "identity":
        return {}
    if p.kind == "mlp_downsample":
        return {"norm": layer_norm_specs(4 * dv, axis=None),
                "fc1": linear_specs(dl, 4 * dv, _axes(0, 2), p.bias),
                "fc2": linear_specs(dl, dl, _axes(1, 2), p.bias, bias_axis=None)}
    n = p.depth
    return {f"fc{i + 1}": linear_specs(dl, dv if i == 0 else dl, _axes(i, n), p.bias,
                                       bias_axis="same" if _axes(i, n)[0] == "mlp" else None)
            for i in range(n)}


def downsample_2x2(x_npd: Tensor) -> Tensor:
    """[N, g*g, D] -> [N, ceil(g/2)^2, 4D]: each 2x2 block of the patch grid concatenated (VILA order)."""
    n, t, d = x_npd.shape
    g = math.isqrt(t)
    if g * g != t:
        raise ValueError(f"mlp_downsample needs a square patch grid; got {t} tokens per image")
    x = x_npd.view(n, g, g, d)
    if g % 2:
        x = F.pad(x, (0, 0, 0, 1, 0, 1))
        g += 1
    # pairs along a row, then pairs of rows; the last permute puts the blocks back in row-major order
    x = x.reshape(n, g, g // 2, 2 * d).permute(0, 2, 1, 3).reshape(n, g // 2, g // 2, 4 * d).permute(0, 2, 1, 3)
    return x.reshape(n, -1, 4 * d)


def apply(p: dict, feats_npd: Tensor, cfg: ModelConfig, dist: Dist) -> Tensor:
    """[N, P, D_vision] -> [N, tokens_per_image, D_llm]."""
    if cfg.projector.kind == "identity":
        return feats_npd
    x = feats_npd
    if cfg.projector.kind == "mlp_downsample":
        x = layer_norm(p["norm"], downsample_2x2(x), 1e-5)
    n = len([k for k in p if k.startswith("fc")])
    for i in range(n):
        w = p[f"fc{i + 1}"]
        if i % 2 == 0 and i + 1 < n:                      # column-parallel
            x = F.linear(comm.copy_to_tp(x, dist), w["w"], w.get("b"))
        elif i % 2 == 1:                                  # row-parallel, bias after the reduction
            x = comm.reduce_from_tp(F.linear(x, w["w"]), dist)
            x = x + w["b"] if "b" in w else x
        else:                                             # unpaired last linear, replicated
            x = F.linear(x, w["w"], w.get("b"))
        if i + 1 < n:
            x = F.gelu(x)
    return x
