"""A fused encoder: two or more encoders (towers) look at the same image, each through its own
preprocessing, and their patch features are concatenated per patch, registered as ``fused`` in
``neva.registry.ENCODERS``. Prismatic-VLMs found DINOv2 + SigLIP its best vision backbone; here it is
composition of registered parts, so any towers fuse (``neva.config.fuse(dino_cfg, siglip_cfg)``):

    params["vision"]  = {tower kind: that tower's params}            e.g. vision/dino/..., vision/siglip/...
    pixel_values      = {tower kind: float[N, 3, H_t, W_t]}          the same N images, each tower's own
                                                                     resize / mean / std (neva.data.images)
    features          = cat([tower(pixels[kind]) for each tower], -1)   [N, P, sum of the towers' D]

Grids must agree: every tower must emit the same tokens per image (the same patch grid, and the class
token in all or none), because patch i of one tower must be patch i of the other. A config whose
towers disagree is an error when it is validated, before anything runs, naming each tower's tokens
and the image sizes that would make them agree; features are never resampled to fit.

Each tower runs with the same ``Dist``: under a plan both are sharded over tp by their own logical
axes (both head counts must divide tp) or replicated together.
"""
from __future__ import annotations

import torch
from torch import Tensor

from neva.comm import Dist
from neva.config import VisionConfig
from neva.registry import ENCODERS, Encoder


def specs(cfg: VisionConfig) -> dict:
    return {t.kind: ENCODERS[t.kind].specs(t) for t in cfg.towers}


def apply(p: dict, pixels: dict[str, Tensor], cfg: VisionConfig, dist: Dist) -> Tensor:
    """{tower kind: float[N, 3, H_t, W_t]} -> [N, tokens(cfg), sum of the towers' D]."""
    kinds = [t.kind for t in cfg.towers]
    if not isinstance(pixels, dict) or set(pixels) != set(kinds):
        got = sorted(pixels) if isinstance(pixels, dict) else f"one {type(pixels).__name__}"
        raise ValueError(f"the fused encoder takes pixel_values as a dict with one entry per tower {kinds} (each "
                         f"preprocessed for its tower: neva.data.images.spec_for); got {got}")
    return torch.cat([ENCODERS[t.kind].apply(p[t.kind], pixels[t.kind], t, dist) for t in cfg.towers], dim=-1)


def tokens(cfg: VisionConfig) -> int:
    """Tokens per image, the same for every tower (else a ValueError naming each tower's)."""
    per = {t.kind: ENCODERS[t.kind].tokens(t) for t in cfg.towers}
    if len(set(per.values())) > 1:
        grids = ", ".join(f"{t.kind} {per[t.kind]} (image_size {t.image_size} / patch_size {t.patch_size}"
                          f"{', with the class token' if t.select_feature == 'cls_patch' else ''})" for t in cfg.towers)
        raise ValueError(f"the fused encoder's towers give different tokens per image: {grids}. Their patches "
                         f"are concatenated one to one, so their grids must agree: make image_size / patch_size "
                         f"equal for every tower (e.g. 224/14 and 256/16 both give 16x16) and select_feature the same")
    return next(iter(per.values()))


ENCODERS.register("fused", Encoder(specs, apply, tokens))
