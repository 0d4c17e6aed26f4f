"""Norms: RMSNorm (Llama), LayerNorm (ViTs, projector), LayerNorm1p (Nemotron: zero-centred gamma).

Statistics are taken in fp32 and the result cast back to the input dtype, as HF does, so bf16 runs
match HF's bf16 numerics.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from neva.params import ONES, ZEROS, ParamSpec


def rms_norm_specs(d: int) -> dict:
    """w: [d] ones."""
    return {"w": ParamSpec((d,), ("embed",), ONES)}


def rms_norm(p: dict, x: Tensor, eps: float) -> Tensor:
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return p["w"] * x32.to(dtype)


def layer_norm_specs(d: int, axis: str | None = "embed", one_p: bool = False) -> dict:
    """w: [d] ones (zeros for LayerNorm1p, whose scale is 1 + w); b: [d] zeros."""
    return {"w": ParamSpec((d,), (axis,), ZEROS if one_p else ONES), "b": ParamSpec((d,), (axis,), ZEROS)}


def layer_norm(p: dict, x: Tensor, eps: float) -> Tensor:
    dtype = x.dtype
    y = F.layer_norm(x.float(), (x.shape[-1],), p["w"].float(), p["b"].float(), eps)
    return y.to(dtype)


def layer_norm_1p(p: dict, x: Tensor, eps: float) -> Tensor:
    dtype = x.dtype
    y = F.layer_norm(x.float(), (x.shape[-1],), p["w"].float() + 1.0, p["b"].float(), eps)
    return y.to(dtype)


NORMS = {"rms": (rms_norm_specs, rms_norm),
         "layernorm": (layer_norm_specs, layer_norm),
         "layernorm1p": (lambda d: layer_norm_specs(d, one_p=True), layer_norm_1p)}
