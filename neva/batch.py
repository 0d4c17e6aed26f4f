"""The batch: the dict every model function reads (its keys are documented in ``neva/model.py``),
the label that marks untrained tokens, the one way a batch is cut into smaller ones (micro-batches
of a step, and the shards of data-parallel ranks), and what can be done to its media.

Media (``pixel_values``) are one tensor float[N, 3, H, W], or, for an encoder with several towers
(``neva/fused.py``), a dict {tower kind: float[N, 3, H_t, W_t]} holding the same N images, each
preprocessed for its tower. ``media_map`` / ``media_count`` / ``media_cat`` work on either.
"""
from __future__ import annotations

from typing import Callable, Union

import torch
from torch import Tensor

from neva.config import ModelConfig

IGNORE = -100                            # a label the loss skips (prompts, images, padding)
Media = Union[Tensor, dict[str, Tensor]]


def media_map(fn: Callable[[Tensor], Tensor], pix: Media) -> Media:
    """``fn`` on the one tensor, or on each tower's."""
    return {k: fn(v) for k, v in pix.items()} if isinstance(pix, dict) else fn(pix)


def media_count(pix: Media | None) -> int:
    """How many images (and video frames) ``pix`` holds; every tower must hold the same number."""
    if pix is None:
        return 0
    if not isinstance(pix, dict):
        return pix.shape[0]
    counts = {k: v.shape[0] for k, v in pix.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(f"pixel_values towers hold different numbers of images {counts}: each tower needs every "
                         "image, in the same order")
    return next(iter(counts.values()), 0)


def media_cat(parts: list[Media]) -> Media:
    """Concatenate media along the image dim (per tower for dicts)."""
    if isinstance(parts[0], dict):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


def split(batch: dict, cfg: ModelConfig, n: int) -> list[dict]:
    """``n`` batches of B/n consecutive rows each; ``pixel_values`` follow the images each row holds
    (counted from its image tokens), so the pieces run the same samples as the whole."""
    B = batch["input_ids"].shape[0]
    if n < 1 or B % n:
        raise ValueError(f"{n} parts (micro-batches x data ranks) does not divide the batch size {B}: make "
                         "data.batch_size a multiple of train.grad_accum")
    imgs = ((batch["input_ids"] == cfg.image_token_id).sum(1) // cfg.tokens_per_image).tolist()
    out, first = [], 0
    for i in range(n):
        rows = slice(i * B // n, (i + 1) * B // n)
        part = {k: v[rows] for k, v in batch.items()
                if isinstance(v, Tensor) and k != "pixel_values" and v.dim() and v.shape[0] == B}
        k = sum(imgs[rows])
        if batch.get("pixel_values") is not None:
            part["pixel_values"] = media_map(lambda t: t[first:first + k], batch["pixel_values"])
        first += k
        out.append(part)
    return out
