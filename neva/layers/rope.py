"""Rotary position embeddings (HF's rotate-half convention): default, Llama-3.1 scaling, linear
scaling, and partial rotary (Nemotron rotates the first ``rot_dim`` dims of each head)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from neva.config import RopeScaling


def inv_freq(rot_dim: int, theta: float, scaling: RopeScaling | None = None) -> Tensor:
    """float32[rot_dim // 2] angular frequencies."""
    inv = 1.0 / (theta ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim))
    if scaling is None:
        return inv
    if scaling.kind == "linear":
        return inv / scaling.factor
    if scaling.kind != "llama3":
        raise ValueError(f"rope scaling {scaling.kind!r} is not supported; use llama3 or linear")
    low_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def cos_sin(pos_bt: Tensor, inv: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Positions int[B, T] -> (cos, sin) each [B, T, rot_dim], computed in fp32 then cast."""
    freqs = pos_bt.float()[..., None] * inv.to(pos_bt.device)[None, None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x_bhtd: Tensor, cos_btr: Tensor, sin_btr: Tensor) -> Tensor:
    """Rotate the first ``rot_dim`` dims of each head; the rest pass through."""
    r = cos_btr.shape[-1]
    cos, sin = cos_btr[:, None], sin_btr[:, None]
    if r == x_bhtd.shape[-1]:
        return x_bhtd * cos + _rotate_half(x_bhtd) * sin
    rot, rest = x_bhtd[..., :r], x_bhtd[..., r:]
    return torch.cat([rot * cos + _rotate_half(rot) * sin, rest], dim=-1)
