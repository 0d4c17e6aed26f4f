"""Mixed precision policies.

  fp32     params, activations, optimizer state in fp32
  bf16     fp32 params and optimizer state; matmuls under bf16 autocast
  bf16_o2  (Apex/NeMo "O2") bf16 params and activations; fp32 master weights and moments live in the
           optimizer state, and the bf16 params are refreshed from them after every update
  fp16     fp32 params and optimizer state; matmuls under fp16 autocast; the loss is multiplied by a
           dynamic scale (halved on overflow with the step skipped, doubled after ``growth_interval``
           clean steps) so small gradients do not underflow
  auto     bf16 where the hardware computes bf16 matmuls natively (a GPU that supports it; a CPU whose
           bf16 matmul is at least as fast as its fp32 one: AVX512-BF16 or AMX), else fp32. A CPU with
           only AVX2 runs bf16 matmuls through a slow reference path (measured 0.2 vs 15 GFLOP/s for
           fp32 on one such EPYC), where a bf16 run takes hours instead of minutes

The loss (cross-entropy, MoE statistics) is always reduced in fp32 by the model.
"""
from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass

import torch

NAMES = ("fp32", "bf16", "bf16_o2", "fp16", "auto")
CPU_MATH_ATTENTION = True   # under CPU autocast, attention through the math kernel (see ``autocast``)


@dataclass(frozen=True)
class Policy:
    name: str
    param_dtype: torch.dtype          # dtype of the params tree the model computes with
    autocast: torch.dtype | None      # autocast dtype for the forward (None: off)
    master: bool                      # fp32 master weights in the optimizer state
    loss_scale: bool                  # dynamic loss scaling


def matmul_seconds(dtype: torch.dtype, n: int = 256, reps: int = 4) -> float:
    """The best time of an n x n matmul in ``dtype`` on the CPU (one warm-up)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return best


def choose(device: str, t_fp32: float | None = None, t_bf16: float | None = None) -> tuple[str, str]:
    """-> (precision, why) for ``auto``: see the module docstring. CPU times of the same matmul in
    fp32 and bf16 decide there (bf16 must not be slower than fp32 by more than 10%)."""
    if device.startswith("cuda"):
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: bf16 (the GPU supports it)"
        return "fp32", "auto: fp32 (this GPU has no bf16)"
    if t_bf16 <= 1.1 * t_fp32:
        return "bf16", f"auto: bf16 (this CPU computes bf16 matmuls natively, {t_fp32 / t_bf16:.1f}x fp32's speed)"
    return "fp32", (f"auto: fp32 (this CPU computes bf16 matmuls {t_bf16 / t_fp32:.0f}x slower than fp32: no "
                    f"AVX512-BF16 or AMX; train.precision=bf16 forces bf16)")


@functools.lru_cache(maxsize=None)
def resolve(name: str, device: str = "cpu") -> tuple[str, str]:
    """The precision a run uses for ``train.precision=name`` -> (precision, why, for the log). Only
    ``auto`` is decided here (timed once per process); ``bf16`` on a CPU that is slow at it is kept,
    with a warning in ``why``."""
    if name not in ("auto", "bf16") or device.startswith("cuda"):
        return (choose(device) if name == "auto" else (name, f"{name}"))
    t_fp32, t_bf16 = matmul_seconds(torch.float32), matmul_seconds(torch.bfloat16)
    if name == "auto":
        return choose(device, t_fp32, t_bf16)
    if t_bf16 > 2 * t_fp32:
        return "bf16", (f"bf16 (warning: this CPU computes bf16 matmuls {t_bf16 / t_fp32:.0f}x slower than fp32; "
                        f"train.precision=auto or fp32 is faster here)")
    return "bf16", "bf16"


def policy(name: str) -> Policy:
    if name == "auto":
        name = resolve(name)[0]
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
