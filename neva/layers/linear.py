"""Linear layers: ``y = x @ w.T + b`` with ``w [out, in]`` (the ``F.linear`` and HF layout).

Column- and row-parallel use is decided by the caller's collectives (``comm.enter_tp`` before a
column-parallel weight sharded on ``out``, ``comm.exit_tp`` after a row-parallel one sharded on
``in``); a row-parallel bias is added once, after the reduction.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from neva.params import NORMAL, ZEROS, Init, ParamSpec


def linear_specs(d_out: int, d_in: int, axes: tuple, bias: bool = False, init: Init = NORMAL,
                 bias_axis: str | None = "same") -> dict:
    """w: [out, in] ``init``; b: [out] zeros (axis of ``out`` unless ``bias_axis`` is given)."""
    out = {"w": ParamSpec((d_out, d_in), axes, init)}
    if bias:
        out["b"] = ParamSpec((d_out,), (axes[0] if bias_axis == "same" else bias_axis,), ZEROS)
    return out


def linear(p: dict, x: Tensor) -> Tensor:
    return F.linear(x, p["w"], p.get("b"))
