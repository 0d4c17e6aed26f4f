"""Vocabulary surgery for real-weight recipes: an ``<image>`` placeholder appended to a pretrained
vocabulary, so no text token is taken over."""
from __future__ import annotations

from dataclasses import replace

import torch

from neva.config import ModelConfig


@torch.no_grad()
def add_image_token(cfg: ModelConfig, params: dict, multiple: int = 64) -> tuple[ModelConfig, dict]:
    """Append an ``<image>`` placeholder id to a pretrained vocabulary (rounded up to ``multiple`` rows;
    new rows start at the mean embedding, as HF's resize does) so no text token is taken over."""
    V = cfg.llm.vocab_size
    newV = -(-(V + 1) // multiple) * multiple
    llm = dict(params["llm"])

    def grow(w: torch.Tensor) -> torch.Tensor:
        return torch.cat([w, w.mean(0, keepdim=True).expand(newV - V, -1)], 0)

    llm["embed"] = {"w": grow(llm["embed"]["w"])}
    if "lm_head" in llm:
        llm["lm_head"] = {"w": grow(llm["lm_head"]["w"])}
    cfg = replace(cfg, llm=replace(cfg.llm, vocab_size=newV), image_token_id=V)
    return cfg, dict(params, llm=llm)
