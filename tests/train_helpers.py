"""Shared tiny model and batches for the training tests."""
from __future__ import annotations

import torch

from neva import model
from neva.config import ModelConfig, tiny_llm, tiny_vision


def tiny_cfg(experts: int = 4, layers: int = 2, **llm_kw) -> ModelConfig:
    llm = tiny_llm("mixtral", n_layers=layers, n_experts=experts, **llm_kw) if experts else \
        tiny_llm("llama2", n_layers=layers, **llm_kw)
    return ModelConfig(vision=tiny_vision("siglip", n_layers=2), llm=llm, image_token_id=255)


def batch(cfg: ModelConfig, B: int = 4, T: int = 32, seed: int = 0, images: bool = True) -> dict:
    """Rows with one image after two prompt tokens; labels on the text after the image (a copy task
    on a fixed pattern, so a few steps visibly lower the loss)."""
    g = torch.Generator().manual_seed(seed)
    per = cfg.tokens_per_image
    ids = torch.randint(3, 60, (B, T), generator=g)
    ids[:, 0] = 1
    start = 2 + per if images else 2
    if images:
        ids[:, 2:start] = cfg.image_token_id
    half = (T - start) // 2
    ids[:, start + half:start + 2 * half] = ids[:, start:start + half]    # second half repeats the first
    labels = ids.clone()
    labels[:, :start] = -100
    out = {"input_ids": ids, "labels": labels}
    if images:
        out["pixel_values"] = torch.randn(B, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    return out


def params(cfg: ModelConfig, seed: int = 0) -> dict:
    return model.init_params(cfg, seed)


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
