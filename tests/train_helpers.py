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


class Source:
    """A resumable stream of ``batch`` es for loop.train in subprocess tests: batch i is fixed by
    ``first_seed + i``; ``noise`` adds global-RNG noise to the images (so RNG state must resume too);
    after ``slow_after`` batches each takes 2 s (time for a test to kill the run)."""

    def __init__(self, cfg: ModelConfig, first_seed: int = 0, noise: float = 0.0, slow_after: int | None = None):
        self.cfg, self.i, self.first_seed, self.noise, self.slow_after = cfg, 0, first_seed, noise, slow_after

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, d: dict) -> None:
        self.i = d["i"]

    def __iter__(self):
        import time
        while True:
            b = batch(self.cfg, B=4, T=32, seed=self.first_seed + self.i)
            if self.noise:
                b["pixel_values"] = b["pixel_values"] + self.noise * torch.randn_like(b["pixel_values"])
            self.i += 1
            if self.slow_after is not None and self.i > self.slow_after:
                time.sleep(2.0)
            yield b
