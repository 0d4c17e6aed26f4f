"""Rows of samples -> the batch dict ``neva.model`` takes (see the contract at the top of model.py).

A *row* is a list of ``Sample``s: one sample (unpacked) or several (packed). The collate returns

  input_ids      int64[B, T]    right-padded with ``pad_id``
  labels         int64[B, T]    IGNORE (-100) on padding and untrained tokens
  attention_mask int64[B, T]    1 token, 0 padding
  position_ids   int64[B, T]    0.. per sample (restarting in packed rows), 0 on padding
  segment_ids    int64[B, T]    packed only: samples 1..k within a row, 0 on padding
  pixel_values   float32[N, 3, H, W]  every row's media, row-major, in order of appearance (a dict
                                      {tower kind: float32[N, 3, H_t, W_t]} for an encoder with towers)
  video_frames   bool[N]        True where a pixel_values row is a video frame (pooled frames have
                                fewer tokens than images: ``model.projector.frame_pool``)
  "_stats"       {"skipped": [messages], "errors": [messages], "ids": [sample ids], "truncated": n,
                 "samples": n}  (the Loader pops it)

T is ``pad_to`` when given (packed rows, or fixed-shape unpacked batches), else the longest row.
Skipped samples (their media failed to decode under ``on_bad_sample=skip``) are left out of their
row and reported in ``_stats``; a row left empty is dropped. A sample that failed under
``on_bad_sample=error`` comes as its message in ``errors``, for the Loader to raise in the main
process (a worker's exception would reach the user wrapped in its traceback). ``ids``: the sample
ids of the batch, row-major.
"""
from __future__ import annotations

import torch

from neva.batch import IGNORE, Media, media_cat, media_count


def collate(rows: list[list], *, packed: bool, pad_to: int | None = None, pad_id: int = 0,
            empty: Media | None = None) -> dict:
    """``empty``: the pixel_values of a batch without media (``neva.data.images.empty(spec)``; default
    float32[0, 3, 1, 1])."""
    skipped = [s.skipped for row in rows for s in row if s.skipped is not None]
    errors = [s.error for row in rows for s in row if s.error is not None]
    rows = [[s for s in row if s.skipped is None and s.error is None] for row in rows]
    rows = [row for row in rows if row]
    stats = {"skipped": skipped, "errors": errors, "ids": [s.id for row in rows for s in row],
             "truncated": sum(s.truncated > 0 for row in rows for s in row), "samples": sum(len(row) for row in rows)}
    if not rows:
        return {"_stats": stats}
    lens = [sum(len(s.input_ids) for s in row) for row in rows]
    T = pad_to if pad_to is not None else max(lens)
    if max(lens) > T:
        raise ValueError(f"a row holds {max(lens)} tokens, more than pad_to={T}")
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.int64)
    labels = torch.full((B, T), IGNORE, dtype=torch.int64)
    mask = torch.zeros(B, T, dtype=torch.int64)
    pos = torch.zeros(B, T, dtype=torch.int64)
    seg = torch.zeros(B, T, dtype=torch.int64)
    pix, frames = [], []
    for b, row in enumerate(rows):
        t = 0
        for k, s in enumerate(row):
            n = len(s.input_ids)
            ids[b, t:t + n] = s.input_ids
            labels[b, t:t + n] = s.labels
            mask[b, t:t + n] = 1
            pos[b, t:t + n] = torch.arange(n)
            seg[b, t:t + n] = k + 1
            t += n
            if s.pixel_values is not None and media_count(s.pixel_values):
                pix.append(s.pixel_values)
                frames.append(s.video_frames if s.video_frames is not None
                              else torch.zeros(media_count(s.pixel_values), dtype=torch.bool))
    if pix:
        towers = [{"": p} if isinstance(p, torch.Tensor) else p for p in pix]
        for k in towers[0]:
            shapes = sorted({tuple(t[k].shape[1:]) for t in towers})
            if len(shapes) > 1:
                raise ValueError(f"the batch's images{' for tower ' + k if k else ''} have different sizes {shapes} "
                                 f"(image_mode=keep keeps aspect ratios): use image_mode=square or pad for a "
                                 f"fixed-grid encoder")
        pixel_values, video_frames = media_cat(pix), torch.cat(frames)
    else:
        pixel_values = empty if empty is not None else torch.zeros(0, 3, 1, 1)
        video_frames = torch.zeros(0, dtype=torch.bool)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": pos,
             "pixel_values": pixel_values, "video_frames": video_frames, "_stats": stats}
    if packed:
        batch["segment_ids"] = seg
    return batch
