"""LoRA as extra leaves of the params tree, merged functionally before the forward.

``add(params, LoraConfig(...))`` puts ``<weight>_lora_a [r, in]`` (normal(1/sqrt(in))) and
``<weight>_lora_b [out, r]`` (zeros, so training starts at the base model) beside each chosen weight
``<weight> [out, in]`` (e.g. ``llm/layers/0/attn/wq/w_lora_a``; MoE experts ``mlp/w1_lora_a``
``[E, r, in]`` / ``[E, out, r]``). ``specs`` gives their ParamSpecs, with the weight's logical axes
(a keeps its ``in`` axis, b its ``out`` axis, the rank dim is never sharded), so the parallel plan
places them like any other leaf. ``materialize(params)`` returns the
tree the model reads, ``w + (alpha / r) * b @ a`` with the LoRA leaves removed; it runs inside the
differentiated function (``StepSetup.prepare``), so gradients reach a and b and the model code does
not know LoRA exists. ``merge`` is the same, detached, for export. ``groups`` freezes everything else.

Targets are path regexes over the weight leaves; presets: ``attn`` (q/k/v/o of the LLM), ``mlp``
(dense MLP and expert w1/w2/w3), ``all``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from neva.params import ZEROS, ParamSpec, Tree, flatten, init_leaf, normal, unflatten
from neva.train.optim import Group

PRESETS = {
    "attn": r"^llm/layers/\d+/attn/w[qkvo]/w$",
    "mlp": r"^llm/layers/\d+/mlp/(w[123]|fc\d+/w|w[123]/w)$",
    "all": r"^llm/layers/\d+/(attn/w[qkvo]/w|mlp/(w[123]|fc\d+/w|w[123]/w))$",
}


@dataclass(frozen=True)
class LoraConfig:
    targets: str = "attn"          # a preset name or a regex over weight paths
    rank: int = 8
    alpha: float = 16.0
    seed: int = 0

    @property
    def pattern(self) -> str:
        return PRESETS.get(self.targets, self.targets)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _is_lora(path: str) -> bool:
    return path.endswith("_lora_a") or path.endswith("_lora_b")


def _factors(path: str, shape: tuple, axes: tuple, cfg: LoraConfig) -> dict[str, ParamSpec]:
    *lead, d_out, d_in = shape
    *lead_ax, ax_out, ax_in = axes
    return {f"{path}_lora_a": ParamSpec((*lead, cfg.rank, d_in), (*lead_ax, None, ax_in), normal(1 / math.sqrt(d_in))),
            f"{path}_lora_b": ParamSpec((*lead, d_out, cfg.rank), (*lead_ax, ax_out, None), ZEROS)}


def _targets(flat: dict, cfg: LoraConfig) -> list[str]:
    if cfg.rank < 1:
        raise ValueError(f"lora rank {cfg.rank} must be >= 1")
    rx = re.compile(cfg.pattern)
    hits = [p for p, v in flat.items() if rx.search(p) and len(v.shape) in (2, 3)]
    if not hits:
        raise ValueError(f"LoRA targets {cfg.targets!r} match no 2-D/3-D weight; paths look like "
                         f"{next(iter(flat))!r}: use a preset {sorted(PRESETS)} or another regex")
    return hits


def specs(base: Tree, cfg: LoraConfig) -> Tree:
    """``base`` (a tree of ParamSpec, e.g. ``neva.model.specs``) plus the LoRA factors' specs."""
    flat = flatten(base)
    out = dict(flat)
    for p in _targets(flat, cfg):
        out.update(_factors(p, flat[p].shape, flat[p].axes, cfg))
    return unflatten(out)


def add(params: Tree, cfg: LoraConfig) -> Tree:
    """``params`` plus zero-effect LoRA leaves beside every weight matching ``cfg.pattern``: a drawn
    per path (seed ``cfg.seed``), b zeros."""
    flat = flatten(params)
    out = dict(flat)
    for p in _targets(flat, cfg):
        w = flat[p]
        for fp, spec in _factors(p, tuple(w.shape), (None,) * w.dim(), cfg).items():
            out[fp] = init_leaf(spec, cfg.seed, fp, w.dtype)
    return unflatten(out)


def materialize(params: Tree, scale: float) -> Tree:
    """The tree the model reads: LoRA folded into its weights (differentiable), LoRA leaves gone."""
    flat = flatten(params)
    out = {p: v for p, v in flat.items() if not _is_lora(p)}
    for p in flat:
        if p.endswith("_lora_a"):
            wp = p[: -len("_lora_a")]
            a, b = flat[p], flat[f"{wp}_lora_b"]
            out[wp] = out[wp] + (scale * (b @ a)).to(out[wp].dtype)
    return unflatten(out)


@torch.no_grad()
def merge(params: Tree, scale: float) -> Tree:
    """Merged plain params for export and inference (no LoRA leaves left)."""
    return materialize(params, scale)


def groups(base: tuple[Group, ...] = ()) -> tuple[Group, ...]:
    """Optimizer groups that train only the LoRA leaves (given ``base`` groups first)."""
    return (*base, Group(r"_lora_[ab]$"), Group(r".*", frozen=True))
