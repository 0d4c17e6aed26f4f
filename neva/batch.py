"""The batch: the dict every model function reads (its keys are documented in ``neva/model.py``),
the label that marks untrained tokens, and the one way a batch is cut into smaller ones (micro-batches
of a step, and the shards of data-parallel ranks).
"""
from __future__ import annotations

from torch import Tensor

from neva.config import ModelConfig

IGNORE = -100                            # a label the loss skips (prompts, images, padding)


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
            part["pixel_values"] = batch["pixel_values"][first:first + k]
        first += k
        out.append(part)
    return out
