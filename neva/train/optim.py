"""AdamW over a params tree: decoupled weight decay, warmup + cosine schedule, clipping by global norm,
and per-group learning rate / weight decay / freezing chosen by path regex (first match wins, as in
big_vision).

State is flat (``path -> tensor``) so a checkpoint is one flat state dict:
  m, v     float32 moments per trainable leaf
  master   float32 master weights, only when the model runs in a lower precision (bf16_o2, fp16 params)
  step     number of updates applied (the schedule and bias correction read it)

Example groups (projector-only pretraining, LLaVA's lower projector rate in fine-tuning)::

    (Group(r"^projector/"), Group(r".*", frozen=True))
    (Group(r"^projector/", lr_mult=0.1), Group(r"(norm|/b$|embed)", wd=0.0), Group(r".*"))
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from neva.params import Tree, flatten

FUSED = hasattr(torch, "_fused_adamw_")   # PyTorch's fused AdamW kernel (CPU and CUDA)


@dataclass(frozen=True)
class Group:
    """Leaves whose path matches ``pattern`` (``re.search``): lr = base lr * ``lr_mult``; weight decay
    ``wd`` (None = the optimizer's); ``frozen`` leaves get no gradient and are never updated."""

    pattern: str
    lr_mult: float = 1.0
    wd: float | None = None
    frozen: bool = False


@dataclass(frozen=True)
class AdamW:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip: float = 1.0                  # max global grad norm; 0 = no clipping
    warmup: int = 0                    # linear warmup steps
    total: int = 1000                  # steps of the cosine; after it lr stays at min_lr
    min_lr_ratio: float = 0.1          # cosine floor as a fraction of lr
    groups: tuple[Group, ...] = ()     # first match wins; unmatched leaves train with defaults

    def validate(self) -> "AdamW":
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if not (0 <= self.betas[0] < 1 and 0 <= self.betas[1] < 1):
            raise ValueError(f"betas={self.betas} must lie in [0, 1)")
        if self.weight_decay < 0 or self.clip < 0 or self.warmup < 0:
            raise ValueError("weight_decay, clip and warmup must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")
        for g in self.groups:
            try:
                re.compile(g.pattern)
            except re.error as e:
                raise ValueError(f"optimizer group pattern {g.pattern!r} is not a regex: {e}") from None
            if g.lr_mult < 0 or (g.wd is not None and g.wd < 0):
                raise ValueError(f"optimizer group {g.pattern!r}: lr_mult and wd must be >= 0")
        return self


def group_of(path: str, groups: tuple[Group, ...]) -> Group:
    """The first group whose pattern matches ``path`` (a default group if none does)."""
    for g in groups:
        if re.search(g.pattern, path):
            return g
    return Group(".*")


def trainable_paths(params: Tree, opt: AdamW) -> list[str]:
    """Paths of the leaves that train (floating and not frozen), in tree order."""
    out = [p for p, v in flatten(params).items()
           if v.is_floating_point() and not group_of(p, opt.groups).frozen]
    if not out:
        raise ValueError("every parameter is frozen by the optimizer groups; nothing would train")
    return out


def lr_at(step: int, opt: AdamW) -> float:
    """Linear warmup from lr/warmup to lr over ``warmup`` steps, then cosine down to lr*min_lr_ratio
    at ``total``. ``step`` counts from 0 (the first update uses lr_at(0))."""
    if opt.warmup and step < opt.warmup:
        return opt.lr * (step + 1) / opt.warmup
    span = max(1, opt.total - opt.warmup)
    t = min(1.0, (step - opt.warmup) / span)
    floor = opt.lr * opt.min_lr_ratio
    return floor + (opt.lr - floor) * 0.5 * (1 + math.cos(math.pi * t))


def init_state(params: Tree, opt: AdamW, master: bool = False, only: set[str] | None = None) -> dict:
    """Zero moments (fp32) for each trainable leaf; fp32 master copies if ``master``. ``only``: keep
    state for these leaves alone (ZeRO-1: the leaves this data rank updates); ``update`` then
    updates just those."""
    flat = flatten(params)
    paths = [p for p in trainable_paths(params, opt) if only is None or p in only]
    st = {"m": {p: torch.zeros_like(flat[p], dtype=torch.float32) for p in paths},
          "v": {p: torch.zeros_like(flat[p], dtype=torch.float32) for p in paths},
          "step": 0}
    if master:
        st["master"] = {p: flat[p].detach().to(torch.float32).clone() for p in paths}
    return st


def global_norm(grads: dict[str, Tensor]) -> Tensor:
    """L2 norm over every gradient, in fp32 (inf/nan if any gradient is)."""
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads.values()]))


@torch.no_grad()
def update(params: Tree, grads: dict[str, Tensor], state: dict, opt: AdamW,
           norm: Tensor | None = None) -> float:
    """One AdamW step, in place on ``params`` (and ``state``). ``grads``: path -> gradient for every
    trainable path (already unscaled and reduced over data-parallel ranks). Clips by the global norm
    (``norm`` if already computed). Returns the lr used."""
    flat = flatten(params)
    step = state["step"]
    lr = lr_at(step, opt)
    if norm is None:
        norm = global_norm(grads)
    scale = min(1.0, opt.clip / (float(norm) + 1e-6)) if opt.clip else 1.0
    masters = state.get("master")
    by_group: dict[tuple[float, float], list[str]] = {}
    for p in state["m"]:
        grp = group_of(p, opt.groups)
        by_group.setdefault((lr * grp.lr_mult, opt.weight_decay if grp.wd is None else grp.wd), []).append(p)
    for (glr, wd), paths in by_group.items():
        ws = [masters[p] if masters is not None else flat[p] for p in paths]
        gs = [grads[p].float() * scale if scale != 1.0 else grads[p].float() for p in paths]
        _adamw(ws, gs, [state["m"][p] for p in paths], [state["v"][p] for p in paths], step, glr, wd, opt)
        if masters is not None:
            for p, w in zip(paths, ws):
                flat[p].copy_(w)                              # low-precision copy for compute
    state["step"] = step + 1
    return lr


def _adamw(ws: list[Tensor], gs: list[Tensor], ms: list[Tensor], vs: list[Tensor], step: int, lr: float, wd: float,
           opt: AdamW) -> None:
    """AdamW on lists of fp32 tensors, in place. PyTorch's fused kernel when it has one (several
    times faster on CPU than per-op updates), else the same math op by op."""
    b1, b2 = opt.betas
    if FUSED and all(w.dtype == torch.float32 for w in ws):
        steps = [torch.tensor(float(step + 1)) for _ in ws]   # the kernel reads the step count after it
        torch._fused_adamw_(ws, gs, ms, vs, [], steps, lr=lr, beta1=b1, beta2=b2, weight_decay=wd,
                            eps=opt.eps, amsgrad=False, maximize=False)
        return
    c1, c2 = 1 - b1 ** (step + 1), 1 - b2 ** (step + 1)
    for w, g, m, v in zip(ws, gs, ms, vs):
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        if wd:
            w.mul_(1 - lr * wd)                               # decoupled: not through the moments
        w.addcdiv_(m / c1, (v / c2).sqrt_().add_(opt.eps), value=-lr)
