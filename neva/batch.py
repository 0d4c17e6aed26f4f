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


MEDIA_KEYS = ("pixel_values", "video_frames")   # one entry per media image, row-major over the batch


def media_per_row(batch: dict, cfg: ModelConfig) -> list[int]:
    """Media images (images and video frames) each row holds, read off its image tokens: an image
    is ``tokens_per_image`` tokens, a video frame (``video_frames`` True) ``tokens_per_frame`` (fewer
    when the projector pools frames). Raise where a row's tokens are not whole media."""
    counts = (batch["input_ids"] == cfg.image_token_id).sum(1).tolist()
    per, per_frame = cfg.tokens_per_image, cfg.tokens_per_frame
    flags = batch.get("video_frames")
    if flags is None or per == per_frame:
        for b, c in enumerate(counts):
            if c % per:
                raise ValueError(f"sample {b} of the batch has {c} image tokens (id {cfg.image_token_id}), not a "
                                 f"multiple of tokens_per_image={per}: expand each <image> to {per} tokens")
        return [c // per for c in counts]
    flags, out, i = flags.tolist(), [], 0
    for b, c in enumerate(counts):
        k = 0
        while c > 0 and i < len(flags):
            c -= per_frame if flags[i] else per
            i, k = i + 1, k + 1
        if c:
            raise ValueError(f"sample {b} of the batch: its image tokens (id {cfg.image_token_id}) do not add up to "
                             f"whole media (an image is {per} tokens, a pooled video frame {per_frame}; "
                             f"video_frames marks which media are frames)")
        out.append(k)
    return out


def split(batch: dict, cfg: ModelConfig, n: int) -> list[dict]:
    """``n`` batches of B/n consecutive rows each; ``pixel_values`` (and ``video_frames``) follow the
    media each row holds (``media_per_row``), so the pieces run the same samples as the whole."""
    B = batch["input_ids"].shape[0]
    if n < 1 or B % n:
        raise ValueError(f"{n} parts (micro-batches x data ranks) does not divide the batch size {B}: make "
                         "data.batch_size a multiple of train.grad_accum")
    imgs = media_per_row(batch, cfg)
    out, first = [], 0
    for i in range(n):
        rows = slice(i * B // n, (i + 1) * B // n)
        part = {k: v[rows] for k, v in batch.items()
                if isinstance(v, Tensor) and k not in MEDIA_KEYS and v.dim() and v.shape[0] == B}
        k = sum(imgs[rows])
        for key in MEDIA_KEYS:
            if batch.get(key) is not None:
                part[key] = media_map(lambda t: t[first:first + k], batch[key])
        first += k
        out.append(part)
    return out
