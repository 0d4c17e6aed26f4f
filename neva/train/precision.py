"""Mixed precision policies.

  fp32     params, activations, optimizer state in fp32
  bf16     fp32 params and optimizer state; matmuls under bf16 autocast
  bf16_o2  (Apex/NeMo "O2") bf16 params and activations; fp32 master weights and moments live in the
           optimizer state, and the bf16 params are refreshed from them after every update
  fp16     fp32 params and optimizer state; matmuls under fp16 autocast; the loss is multiplied by a
           dynamic scale (halved on overflow with the step skipped, doubled after ``growth_interval``
           clean steps) so small gradients do not underflow

The loss (cross-entropy, MoE statistics) is always reduced in fp32 by the model.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

NAMES = ("fp32", "bf16", "bf16_o2", "fp16")
CPU_MATH_ATTENTION = True   # under CPU autocast, attention through the math kernel (see ``autocast``)


@dataclass(frozen=True)
class Policy:
    name: str
    param_dtype: torch.dtype          # dtype of the params tree the model computes with
    autocast: torch.dtype | None      # autocast dtype for the forward (None: off)
    master: bool                      # fp32 master weights in the optimizer state
    loss_scale: bool                  # dynamic loss scaling


def policy(name: str) -> Policy:
    if name == "fp32":
        return Policy(name, torch.float32, None, False, False)
    if name == "bf16":
        return Policy(name, torch.float32, torch.bfloat16, False, False)
    if name == "bf16_o2":
        return Policy(name, torch.bfloat16, None, True, False)
    if name == "fp16":
        return Policy(name, torch.float32, torch.float16, False, True)
    raise ValueError(f"train.precision={name!r}: use one of {NAMES}")


@contextlib.contextmanager
def autocast(pol: Policy, device: str = "cpu", math_attention: bool = True):
    """The context the forward runs in. On CPU under bf16/fp16 autocast, attention uses the math
    kernel (``math_attention``): PyTorch's CPU flash kernel is ~3x slower than it in bf16 for short
    sequences. Not with activation checkpointing: a math-kernel recomputation under
    ``torch.func.vjp`` loses autocast's casts."""
    if pol.autocast is None:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel
    use_math = CPU_MATH_ATTENTION and math_attention and device == "cpu"
    kernel = sdpa_kernel([SDPBackend.MATH]) if use_math else contextlib.nullcontext()
    with torch.autocast(device, dtype=pol.autocast), kernel:
        yield


@dataclass
class LossScaler:
    """Dynamic loss scale (fp16). ``state_dict`` goes into checkpoints so resume is exact."""

    scale: float = 2.0**16
    growth_interval: int = 2000
    factor: float = 2.0
    min_scale: float = 1.0
    good_steps: int = 0

    def update(self, finite: bool) -> None:
        """After a step: halve on overflow (the caller skipped it), grow after a run of clean steps."""
        if not finite:
            self.scale = max(self.min_scale, self.scale / self.factor)
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= self.factor
            self.good_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, sd: dict) -> None:
        self.scale, self.good_steps = float(sd["scale"]), int(sd["good_steps"])
