"""Feed-forward blocks, tensor-parallel as column (up) then row (down):
SwiGLU (Llama, Mistral), squared ReLU (Nemotron), GELU / GELU-tanh / quick-GELU with biases (ViTs)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from neva import comm
from neva.comm import Dist
from neva.layers.linear import linear_specs
from neva.params import normal

ACTS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu2": lambda x: torch.square(F.relu(x)),
    "silu": F.silu,
}


def swiglu_specs(d: int, f: int, std: float = 0.02, out_std: float | None = None) -> dict:
    """w1 (gate), w3 (up): [f, d] normal(std); w2 (down): [d, f] normal(out_std)."""
    out_init = normal(out_std if out_std is not None else std)
    return {"w1": linear_specs(f, d, ("mlp", "embed"), init=normal(std)),
            "w3": linear_specs(f, d, ("mlp", "embed"), init=normal(std)),
            "w2": linear_specs(d, f, ("embed", "mlp"), init=out_init)}


def swiglu(p: dict, x_btd: Tensor, dist: Dist) -> Tensor:
    x = comm.enter_tp(x_btd, dist)                                        # identity fwd, all-reduce bwd
    h = F.silu(F.linear(x, p["w1"]["w"])) * F.linear(x, p["w3"]["w"])     # this rank's slice of f
    return comm.exit_tp(F.linear(h, p["w2"]["w"]), dist)                  # all-reduce fwd


def mlp_specs(d: int, f: int, bias: bool, std: float = 0.02, out_std: float | None = None) -> dict:
    """Two-matrix MLP. fc1: [f, d], fc2: [d, f] (+ biases, zeros)."""
    out_init = normal(out_std if out_std is not None else std)
    return {"fc1": linear_specs(f, d, ("mlp", "embed"), bias, normal(std)),
            "fc2": linear_specs(d, f, ("embed", "mlp"), bias, out_init, bias_axis=None)}


def mlp(p: dict, x_btd: Tensor, dist: Dist, act: str) -> Tensor:
    x = comm.enter_tp(x_btd, dist)
    h = ACTS[act](F.linear(x, p["fc1"]["w"], p["fc1"].get("b")))
    y = comm.exit_tp(F.linear(h, p["fc2"]["w"]), dist)
    return y + p["fc2"]["b"] if "b" in p["fc2"] else y
