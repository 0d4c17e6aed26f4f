"""Vision encoders: CLIP ViT (class token, pre-layernorm, quick-GELU) and SigLIP (no class token,
patch bias, GELU-tanh), as HF defines them, up to the selected hidden state: one ViT in two
flavours, registered as ``clip`` and ``siglip`` in ``neva.registry.ENCODERS``.

``select_layer`` counts as HF's ``hidden_states`` do (0 = embeddings, -1 = last layer; LLaVA uses
-2), so only ``layers_used`` layers run. ``select_feature``: ``patch`` drops CLIP's class token,
``cls_patch`` keeps it (SigLIP has none). Layers past the selected one and ``post_norm`` are kept
in the tree (checkpoints round-trip whole) but never run.

Init: patch w normal(0.02), b zeros; cls normal(0.02); pos normal(0.02); norms ones/zeros;
attention and MLP weights normal(0.02), biases zeros.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from neva.comm import Dist
from neva.config import VisionConfig
from neva.layers.attention import attention, attention_specs
from neva.layers.embedding import patch_embed, patch_embedding_specs
from neva.layers.mlp import mlp, mlp_specs
from neva.layers.norm import layer_norm, layer_norm_specs
from neva.params import ParamSpec, normal
from neva.registry import ENCODERS, Encoder


@dataclass(frozen=True)
class Flavour:
    """Where CLIP's and SigLIP's ViTs differ."""

    class_token: bool         # a learned token prepended to the patches (CLIP)
    pre_norm: bool            # LayerNorm on the embeddings before the first block (CLIP)
    patch_bias: bool          # a bias on the patch convolution (SigLIP)


CLIP = Flavour(class_token=True, pre_norm=True, patch_bias=False)
SIGLIP = Flavour(class_token=False, pre_norm=False, patch_bias=True)


def specs(cfg: VisionConfig, fl: Flavour) -> dict:
    d = cfg.dim
    out: dict = {"patch": patch_embedding_specs(3, d, cfg.patch_size, bias=fl.patch_bias)}
    if fl.class_token:
        out["cls"] = ParamSpec((d,), ("embed",), normal(0.02))
    out["pos"] = ParamSpec((cfg.grid**2 + fl.class_token, d), (None, "embed"), normal(0.02))
    if fl.pre_norm:
        out["pre_norm"] = layer_norm_specs(d)
    out["layers"] = {str(i): layer_specs(cfg) for i in range(cfg.n_layers)}
    out["post_norm"] = layer_norm_specs(d)
    return out


def layer_specs(cfg: VisionConfig) -> dict:
    d = cfg.dim
    return {"norm1": layer_norm_specs(d), "attn": attention_specs(d, cfg.n_heads, cfg.n_heads, d // cfg.n_heads, bias=True),
            "norm2": layer_norm_specs(d), "mlp": mlp_specs(d, cfg.mlp_dim, bias=True)}


def block(p: dict, x: Tensor, cfg: VisionConfig, dist: Dist) -> Tensor:
    """A pre-LN ViT block; with ``ls1``/``ls2`` leaves (DINOv2's layer scale) each branch is scaled
    per channel before its residual add."""
    hd = cfg.dim // cfg.n_heads
    a = attention(p["attn"], layer_norm(p["norm1"], x, cfg.eps), dist, head_dim=hd, causal=False)
    x = x + (a * p["ls1"].to(a.dtype) if "ls1" in p else a)
    m = mlp(p["mlp"], layer_norm(p["norm2"], x, cfg.eps), dist, cfg.act)
    return x + (m * p["ls2"].to(m.dtype) if "ls2" in p else m)


def embed(p: dict, images_nchw: Tensor, cfg: VisionConfig, fl: Flavour) -> Tensor:
    """HF hidden_states[0]: patches (+ class token) + positions (+ CLIP's pre-layernorm)."""
    x = patch_embed(p["patch"], images_nchw)
    if fl.class_token:
        x = torch.cat([p["cls"].to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
    x = x + p["pos"].to(x.dtype)
    return layer_norm(p["pre_norm"], x, cfg.eps) if fl.pre_norm else x


def check_size(images_nchw: Tensor, cfg: VisionConfig) -> None:
    if not isinstance(images_nchw, Tensor):
        raise ValueError(f"model.vision.kind={cfg.kind} takes pixel_values as one tensor [N, 3, H, W]; got "
                         f"{type(images_nchw).__name__} (a dict of towers is for kind=fused)")
    if images_nchw.shape[-2:] != (cfg.image_size, cfg.image_size):
        raise ValueError(f"pixel_values are {tuple(images_nchw.shape[-2:])}; the {cfg.kind} encoder expects "
                         f"{cfg.image_size}x{cfg.image_size} (model.vision.image_size)")


def blocks(p: dict, x: Tensor, cfg: VisionConfig, dist: Dist) -> Tensor:
    """The blocks up to ``select_layer``."""
    for i in range(cfg.layers_used):
        x = block(p["layers"][str(i)], x, cfg, dist)
    return x


def apply(p: dict, images_nchw: Tensor, cfg: VisionConfig, dist: Dist, fl: Flavour) -> Tensor:
    """float[N, 3, H, W] -> features [N, tokens(cfg), D_vision] at ``select_layer``."""
    check_size(images_nchw, cfg)
    x = blocks(p, embed(p, images_nchw, cfg, fl), cfg, dist)
    if fl.class_token and cfg.select_feature == "patch":
        x = x[:, 1:]
    return x


def tokens(cfg: VisionConfig, fl: Flavour) -> int:
    """Tokens per image: the patch grid, plus the class token when ``select_feature=cls_patch``."""
    return cfg.grid**2 + (fl.class_token and cfg.select_feature == "cls_patch")


for _name, _fl in (("clip", CLIP), ("siglip", SIGLIP)):
    ENCODERS.register(_name, Encoder(partial(specs, fl=_fl), partial(apply, fl=_fl), partial(tokens, fl=_fl)))
