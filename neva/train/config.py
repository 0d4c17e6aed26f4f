"""The training sections of an experiment: ``train``, ``eval``, ``checkpoint`` and ``run``. Each
validates itself (all of its problems at once, each naming its key); cross-section checks live in
``neva.experiment``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from neva.train.optim import Group
from neva.train.precision import NAMES as PRECISIONS
from neva.train.remat import METHODS as REMAT_METHODS
from neva.train.step import MODES

RESUME_WORDS = ("", "auto", "none")   # train.resume values that are not a checkpoint folder


def _raise(errs: list[str]) -> None:
    if errs:
        raise ValueError("\n  ".join(errs))


@dataclass(frozen=True)
class TrainConfig:
    """How the model trains: steps, AdamW and its schedule, precision, what trains, the stages."""

    steps: int = 1000               # optimizer steps of the main stage
    seed: int = 0                   # initial weights (and LoRA factors); the sample order is data.seed
    grad_accum: int = 1             # micro-batches per step; must divide data.batch_size (rows per rank)
    lr: float = 1e-3                # peak learning rate (AdamW), reached after warmup, then cosine decay
    warmup: int = 50                # linear warmup steps
    min_lr_ratio: float = 0.1       # cosine floor as a fraction of lr
    weight_decay: float = 0.0       # AdamW decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas, as b1,b2 in [0, 1)
    clip: float = 1.0               # max global gradient norm (0 = off)
    precision: str = "fp32"         # fp32 | bf16 | bf16_o2 | fp16 | auto (bf16 where the hardware has it natively, else fp32)
    mode: str = "autograd"          # autograd | func (torch.func.grad); same gradients
    remat: str = "none"             # none | uniform | block (activation checkpointing)
    remat_layers: int = 1           # uniform: layers per chunk; block: how many layers
    resume: str = "auto"            # auto (newest complete checkpoint in run.dir) | none | a folder
    max_bad_steps: int = 5          # non-finite losses in a row before the run stops
    max_bad_fraction: float = 0.01  # non-finite steps skipped in all, as a fraction of a stage's steps (>= 1 allowed)
    freeze: str = ""                # regex: leaves that never train (e.g. "^(vision|llm)/")
    lr_mults: str = ""              # "regex=mult,regex=mult": per-group lr multipliers, first match wins
    groups: tuple[Group, ...] = ()  # full optim.Group rules (Python only); come before freeze/lr_mults
    pretrain_steps: int = 0         # stage 1 steps before the main stage (0 = no stage 1)
    pretrain_data: str = ""         # stage 1 LLaVA file(s), e.g. captions (default: data.data_path)
    pretrain_template: str = "plain"  # stage 1 template (LLaVA's projector pretraining uses plain)
    pretrain_lr: float = 0.0        # stage 1 lr (0 = train.lr)
    pretrain_freeze: str = ""       # stage 1 frozen leaves (LLaVA: "^(vision|llm)/", the projector trains)
    lora: str = ""                  # "" = off; a preset (attn, mlp, all) or a regex over weight paths
    lora_rank: int = 8              # LoRA factor rank r
    lora_alpha: float = 16.0        # LoRA scale alpha (updates are scaled by alpha / r)
    log_every: int = 1              # a metrics.jsonl / TensorBoard row every N steps

    def optimizer_groups(self) -> tuple[Group, ...]:
        """``groups``, then ``freeze`` and ``lr_mults`` as groups (first match wins)."""
        gs = list(self.groups)
        for item in filter(None, (s.strip() for s in self.lr_mults.split(","))):
            if "=" not in item:
                raise ValueError(f"train.lr_mults item {item!r}: use regex=multiplier")
            rx, m = item.rsplit("=", 1)
            gs.append(Group(rx, lr_mult=float(m)))
        if self.freeze:
            gs.insert(len(self.groups), Group(self.freeze, frozen=True))
        return tuple(gs)

    def validate(self) -> "TrainConfig":
        errs = []
        if self.steps < 1:
            errs.append(f"train.steps={self.steps} must be >= 1")
        if not self.lr > 0:
            errs.append(f"train.lr={self.lr} must be > 0")
        if self.warmup < 0 or self.weight_decay < 0 or self.clip < 0:
            errs.append("train.warmup, train.weight_decay and train.clip must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            errs.append(f"train.min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")
        if not all(0 <= b < 1 for b in self.betas):
            errs.append(f"train.betas={self.betas} must lie in [0, 1)")
        if self.precision not in PRECISIONS:
            errs.append(f"train.precision={self.precision!r}: use one of {PRECISIONS}")
        if self.mode not in MODES:
            errs.append(f"train.mode={self.mode!r}: use autograd or func")
        if self.remat not in REMAT_METHODS:
            errs.append(f"train.remat={self.remat!r}: use one of {REMAT_METHODS}")
        if self.remat_layers < 1 or self.max_bad_steps < 1 or self.log_every < 1:
            errs.append("train.remat_layers, train.max_bad_steps and train.log_every must be >= 1")
        if not 0 <= self.max_bad_fraction <= 1:
            errs.append(f"train.max_bad_fraction={self.max_bad_fraction} must lie in [0, 1]")
        if self.grad_accum < 1:
            errs.append(f"train.grad_accum={self.grad_accum} must be >= 1")
        if self.pretrain_steps < 0 or self.pretrain_lr < 0:
            errs.append("train.pretrain_steps and train.pretrain_lr must be >= 0")
        for key in ("freeze", "pretrain_freeze"):
            try:
                re.compile(getattr(self, key))
            except re.error as ex:
                errs.append(f"train.{key}={getattr(self, key)!r} is not a regex: {ex}")
        try:
            for g in self.optimizer_groups():
                re.compile(g.pattern)
        except (ValueError, re.error) as ex:
            errs.append(f"train.groups / lr_mults: {ex}")
        if self.lora and self.lora_rank < 1:
            errs.append(f"train.lora_rank={self.lora_rank} must be >= 1")
        if self.resume not in RESUME_WORDS and not Path(self.resume).is_dir():
            errs.append(f"train.resume={self.resume!r}: no such checkpoint folder (use auto, none, or a "
                        "checkpoints/step_N folder of a run)")
        _raise(errs)
        return self


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation: greedy answers to data.eval_path's questions, scored by exact match."""

    every: int = 0                  # evaluate every N steps during training (0 = only at the end)
    max_samples: int = 0            # questions per held-out file (0 = all of them)
    batch_size: int = 32            # questions answered together (one KV-cache generation)
    max_new_tokens: int = 12        # the longest answer generated
    show: int = 6                   # held-out questions printed with the model's answers

    def validate(self) -> "EvalConfig":
        errs = []
        if self.every < 0 or self.max_samples < 0 or self.batch_size < 1:
            errs.append("eval.every and eval.max_samples must be >= 0, eval.batch_size >= 1")
        if self.max_new_tokens < 1 or self.show < 0:
            errs.append(f"eval.max_new_tokens={self.max_new_tokens} must be >= 1 and eval.show={self.show} >= 0")
        _raise(errs)
        return self


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints in run.dir/checkpoints (DCP; any layout resumes any other) and the HF export."""

    every: int = 0                  # save every N steps (0 = only at the end)
    keep_last: int = 2              # complete checkpoints kept per stage (0 = all)
    export_hf: bool = True          # write an HF LLaVA folder (run.dir/hf) at the end

    def validate(self) -> "CheckpointConfig":
        if self.every < 0 or self.keep_last < 0:
            raise ValueError("checkpoint.every and checkpoint.keep_last must be >= 0")
        return self


@dataclass(frozen=True)
class RunConfig:
    """Where a run writes and what it shows while it runs."""

    dir: str = "runs/default"       # the run folder: config, metrics, checkpoints, exports (rerun it to resume)
    tensorboard: bool = True        # TensorBoard events in run.dir/tb
    progress: bool = True           # show progress: a bar on a terminal, else a line every print_every steps
    print_every: int = 10           # without a terminal (CI, Slurm, nohup): a progress line every N steps
    threads: int = 0                # torch intra-op threads; 0 = auto (1 or all cores, whichever is faster now)

    def validate(self) -> "RunConfig":
        errs = []
        if self.threads < 0:
            errs.append(f"run.threads={self.threads} must be >= 0 (0 = pick automatically)")
        if self.print_every < 1:
            errs.append(f"run.print_every={self.print_every} must be >= 1")
        _raise(errs)
        return self
