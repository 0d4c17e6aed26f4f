"""DINOv2 as HF's ``Dinov2Model`` / ``Dinov2WithRegistersModel`` defines it, up to the selected hidden
state, registered as ``dino`` in ``neva.registry.ENCODERS``. It is the ViT of ``neva/vision.py`` (its
blocks, run the same way) with what DINOv2 adds:

* a class token, then ``n_registers`` register tokens after it (with-registers models; no position);
* layer scale: each block's attention and MLP branch scaled per channel (``ls1``, ``ls2``) before its
  residual add (``vision.block`` does it when the leaves are there);
* a position table trained at ``pos_image_size`` (518 px for the released models) and resampled to
  the grid of ``image_size`` in every forward, exactly as HF does: bicubic in fp32, antialiased in the
  with-registers family (``n_registers > 0``), untouched when the grids agree. So one checkpoint runs
  at any ``image_size`` (Prismatic runs DINOv2 at 224 px).

``select_layer`` counts as HF's ``hidden_states`` do (0 = embeddings). ``select_feature``: ``patch`` ->
the patch tokens, ``cls_patch`` -> the class token, then the patches. Register tokens are dropped
either way: they are the model's scratch space, not features of the image (Prismatic drops them too).
``post_norm`` (HF's final ``layernorm``) is kept in the tree but, as in LLaVA, never runs.

Leaves keep HF's shapes: cls [1, 1, D], registers [1, R, D], pos [1, 1 + G*G, D] (G = the table's grid).
Init: patch w normal(0.02), b zeros; cls, registers, pos normal(0.02) (random registers, not HF's
zeros: identical registers would get identical updates forever when training from scratch); layer
scales ones; norms ones/zeros; attention and MLP weights normal(0.02), biases zeros.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from neva import vision
from neva.comm import Dist
from neva.config import VisionConfig
from neva.layers.embedding import patch_embed, patch_embedding_specs
from neva.layers.norm import layer_norm_specs
from neva.params import ONES, ParamSpec, normal
from neva.registry import ENCODERS, Encoder


def pos_grid(cfg: VisionConfig) -> int:
    """The side of the position table's patch grid."""
    return (cfg.pos_image_size or cfg.image_size) // cfg.patch_size


def specs(cfg: VisionConfig) -> dict:
    d, g = cfg.dim, pos_grid(cfg)
    out: dict = {"patch": patch_embedding_specs(3, d, cfg.patch_size, bias=True),
                 "cls": ParamSpec((1, 1, d), (None, None, "embed"), normal(0.02)),
                 "pos": ParamSpec((1, 1 + g * g, d), (None, None, "embed"), normal(0.02))}
    if cfg.n_registers:
        out["registers"] = ParamSpec((1, cfg.n_registers, d), (None, None, "embed"), normal(0.02))
    scale = ParamSpec((d,), ("embed",), ONES)
    out["layers"] = {str(i): {**vision.layer_specs(cfg), "ls1": scale, "ls2": scale} for i in range(cfg.n_layers)}
    out["post_norm"] = layer_norm_specs(d)
    return out


def positions(pos_1sd: Tensor, grid: int, antialias: bool) -> Tensor:
    """The position table [1, 1 + G*G, D] for a ``grid`` x ``grid`` input: the class position, then
    the patch positions resampled from G x G (HF's ``interpolate_pos_encoding``)."""
    g = round((pos_1sd.shape[1] - 1) ** 0.5)
    if g == grid:
        return pos_1sd
    d = pos_1sd.shape[-1]
    patches = pos_1sd[:, 1:].reshape(1, g, g, d).permute(0, 3, 1, 2)
    patches = F.interpolate(patches.float(), size=(grid, grid), mode="bicubic", align_corners=False,
                            antialias=antialias).to(pos_1sd.dtype)
    return torch.cat([pos_1sd[:, :1], patches.permute(0, 2, 3, 1).reshape(1, grid * grid, d)], dim=1)


def embed(p: dict, images_nchw: Tensor, cfg: VisionConfig) -> Tensor:
    """HF hidden_states[0]: [N, 1 + R + grid*grid, D] = class token, registers, patches."""
    x = patch_embed(p["patch"], images_nchw)
    n = x.shape[0]
    x = torch.cat([p["cls"].to(x.dtype).expand(n, -1, -1), x], dim=1)
    x = x + positions(p["pos"], cfg.grid, antialias=cfg.n_registers > 0).to(x.dtype)
    if cfg.n_registers:
        x = torch.cat([x[:, :1], p["registers"].to(x.dtype).expand(n, -1, -1), x[:, 1:]], dim=1)
    return x


def apply(p: dict, images_nchw: Tensor, cfg: VisionConfig, dist: Dist) -> Tensor:
    """float[N, 3, H, W] -> features [N, tokens(cfg), D] at ``select_layer``."""
    vision.check_size(images_nchw, cfg)
    x = vision.blocks(p, embed(p, images_nchw, cfg), cfg, dist)
    patches = x[:, 1 + cfg.n_registers:]
    return torch.cat([x[:, :1], patches], dim=1) if cfg.select_feature == "cls_patch" else patches


def tokens(cfg: VisionConfig) -> int:
    """Tokens per image: the patch grid, plus the class token when ``select_feature=cls_patch``."""
    return cfg.grid**2 + (cfg.select_feature == "cls_patch")


ENCODERS.register("dino", Encoder(specs, apply, tokens))
