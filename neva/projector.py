"""Projectors from vision features to LLM embeddings: linear, mlpNx_gelu (any N), mlp_downsample
(NeMo / VILA: zero-pad an odd grid, concatenate each 2x2 block, LayerNorm, Linear, GELU, Linear) and
identity, registered by those names in ``neva.registry.PROJECTORS``; and the pooling of video frames
after any of them (``pool_frames``, ``model.projector.frame_pool``).

Tensor parallel: linears pair up as column then row (the hidden dim on ``mlp``); an unpaired last
linear is replicated. Each linear's collectives follow from its logical axes (``_axes``), the same
ones the plan shards it by. Init: weights normal(0.02), biases zeros, norm ones/zeros.
"""
from __future__ import annotations

import math
import re

import torch.nn.functional as F
from torch import Tensor

from neva import comm
from neva.comm import Dist
from neva.config import ModelConfig
from neva.layers.linear import linear_specs
from neva.layers.norm import layer_norm, layer_norm_specs
from neva.registry import PROJECTORS, Projector


def _axes(i: int, n: int) -> tuple:
    """Logical axes of linear i of n: column (0, 2, ...), row (1, 3, ...), last unpaired replicated."""
    if i % 2 == 1:
        return ("embed", "mlp")
    return ("mlp", "embed") if i + 1 < n else ("embed", "embed")


def _linears_specs(dims: list[int], bias: bool) -> dict:
    """fc1..fcN mapping dims[0] -> dims[1] -> ... ; a bias shards with a column output, else whole."""
    n = len(dims) - 1
    return {f"fc{i + 1}": linear_specs(dims[i + 1], dims[i], _axes(i, n), bias,
                                       bias_axis="same" if _axes(i, n)[0] == "mlp" else None)
            for i in range(n)}


def _linear(w: dict, x: Tensor, axes: tuple, dist: Dist) -> Tensor:
    if axes[0] == "mlp":                                  # column-parallel: enter the TP region
        return F.linear(comm.copy_to_tp(x, dist), w["w"], w.get("b"))
    if axes[1] == "mlp":                                  # row-parallel: leave it, bias after the reduction
        y = comm.reduce_from_tp(F.linear(x, w["w"]), dist)
        return y + w["b"] if "b" in w else y
    return F.linear(x, w["w"], w.get("b"))                # replicated


def _gelu_mlp(p: dict, x: Tensor, dist: Dist) -> Tensor:
    n = len(p)
    for i in range(n):
        x = _linear(p[f"fc{i + 1}"], x, _axes(i, n), dist)
        if i + 1 < n:
            x = F.gelu(x)
    return x


# ---------------------------------------------------------------------- linear and mlpNx_gelu
def _depth(kind: str) -> int:
    return 1 if kind == "linear" else int(re.fullmatch(r"mlp(\d+)x_gelu", kind).group(1))


def mlp_specs(cfg: ModelConfig) -> dict:
    n = _depth(cfg.projector.kind)
    return _linears_specs([cfg.vision.dim] + [cfg.llm.dim] * n, cfg.projector.bias)


def mlp_apply(p: dict, feats_npd: Tensor, cfg: ModelConfig, dist: Dist) -> Tensor:
    """[N, P, D_vision] -> [N, P, D_llm]."""
    return _gelu_mlp(p, feats_npd, dist)


# ----------------------------------------------------------------------------- mlp_downsample
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


def downsample_specs(cfg: ModelConfig) -> dict:
    dv, dl = cfg.vision.dim, cfg.llm.dim
    return {"norm": layer_norm_specs(4 * dv, axis=None), **_linears_specs([4 * dv, dl, dl], cfg.projector.bias)}


def downsample_apply(p: dict, feats_npd: Tensor, cfg: ModelConfig, dist: Dist) -> Tensor:
    """[N, g*g, D_vision] -> [N, ceil(g/2)^2, D_llm]."""
    x = layer_norm(p["norm"], downsample_2x2(feats_npd), 1e-5)
    return _gelu_mlp({k: v for k, v in p.items() if k != "norm"}, x, dist)


def downsample_tokens(n: int, cfg: ModelConfig) -> int:
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"mlp_downsample needs a square grid of patches, got {n} tokens per image: "
                         "use model.vision.select_feature=patch")
    return math.ceil(g / 2) ** 2


# ------------------------------------------------------------------------------ frame pooling
def pool_frames(x_npd: Tensor, stride: int) -> Tensor:
    """[N, g*g, D] -> [N, ceil(g/stride)^2, D]: each frame's token grid average-pooled by ``stride``
    (LLaVA-NeXT-Video's ``mm_spatial_pool_mode=average``; where the grid does not divide, the last
    window averages the patches it holds, where LLaVA-NeXT-Video's floor drops them)."""
    if stride == 1:
        return x_npd
    n, t, d = x_npd.shape
    g = math.isqrt(t)
    if g * g != t:
        raise ValueError(f"frame pooling needs a square grid of tokens; got {t} per frame")
    x = x_npd.transpose(1, 2).reshape(n, d, g, g)
    return F.avg_pool2d(x, stride, stride, ceil_mode=True).flatten(2).transpose(1, 2)


PROJECTORS.register("identity", Projector(lambda cfg: {}, lambda p, x, cfg, dist: x))
PROJECTORS.register("linear", Projector(mlp_specs, mlp_apply))
PROJECTORS.register(r"mlp[1-9]\d*x_gelu", Projector(mlp_specs, mlp_apply), regex=True)
PROJECTORS.register("mlp_downsample", Projector(downsample_specs, downsample_apply, downsample_tokens))
