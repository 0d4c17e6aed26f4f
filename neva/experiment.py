"""Experiments as code: a frozen-dataclass config with sections, dotted command-line overrides, checks.

An experiment file builds an ``Experiment`` (``model``, ``data``, ``train``, ``eval``, ``checkpoint``,
``parallel``, ``run``) and calls ``parse(sys.argv[1:], base)``; any field can then be overridden::

    python experiments/siglip_mixtral.py train.steps=200 train.lr=1e-3 model.vision.select_layer=-1 \\
        data.template=mistral run.dir=runs/x

Values are parsed by the field's type (int, float, bool, str, None, tuples as ``a,b``); an unknown key
is an error that names the closest one; out-of-range values are errors before anything runs; the
resolved config is saved with the run (``save``) and read back by ``load``.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import json
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from neva.config import ModelConfig
from neva.train.optim import Group
from neva.train.precision import NAMES as PRECISIONS
from neva.train.remat import METHODS as REMAT_METHODS


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    seed: int = 0
    grad_accum: int = 1             # micro-batches per step; must divide data.batch_size (rows per rank)
    lr: float = 1e-3
    warmup: int = 50
    min_lr_ratio: float = 0.1       # cosine floor as a fraction of lr
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = 1.0               # max global gradient norm (0 = off)
    precision: str = "fp32"         # fp32 | bf16 | bf16_o2 | fp16
    mode: str = "autograd"          # autograd | func (torch.func.grad); same gradients
    remat: str = "none"             # none | uniform | block (activation checkpointing)
    remat_layers: int = 1           # uniform: layers per chunk; block: how many layers
    resume: str = "auto"            # auto (newest complete checkpoint in run.dir) | none | a folder
    max_bad_steps: int = 5          # non-finite losses in a row before the run stops
    freeze: str = ""                # regex: leaves that never train (e.g. "^(vision|llm)/")
    lr_mults: str = ""              # "regex=mult,regex=mult": per-group lr multipliers, first match wins
    groups: tuple = ()              # full optim.Group rules (Python only); come before freeze/lr_mults
    pretrain_steps: int = 0         # stage 1 steps before the main stage (0 = no stage 1)
    pretrain_data: str = ""         # stage 1 LLaVA file(s), e.g. captions (default: data.data_path)
    pretrain_template: str = "plain"  # stage 1 template (LLaVA's projector pretraining uses plain)
    pretrain_lr: float = 0.0        # stage 1 lr (0 = train.lr)
    pretrain_freeze: str = ""       # stage 1 frozen leaves (LLaVA: "^(vision|llm)/", the projector trains)
    lora: str = ""                  # "" = off; a preset (attn, mlp, all) or a regex over weight paths
    lora_rank: int = 8
    lora_alpha: float = 16.0
    log_every: int = 1


@dataclass(frozen=True)
class EvalConfig:
    every: int = 0                  # evaluate every N steps during training (0 = only at the end)
    max_samples: int = 0            # 0 = the whole held-out split
    batch_size: int = 32
    max_new_tokens: int = 12
    show: int = 6                   # held-out questions printed with the model's answers


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 0                  # save every N steps (0 = only at the end)
    keep_last: int = 2
    export_hf: bool = True          # write an HF LLaVA folder at the end


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    sp: bool = False
    pp_schedule: str = "1f1b"       # gpipe | 1f1b
    zero1: bool = False             # optimizer state (moments, fp32 masters) split over dp ranks (ZeRO-1)


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/default"
    tensorboard: bool = True
    progress: bool = True           # tqdm progress bars
    threads: int = 0                # torch intra-op threads; 0 = auto (1 or all cores, whichever is faster now)


@dataclass(frozen=True)
class Experiment:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: Any = None                # neva.data.config.DataConfig (or any frozen dataclass)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    run: RunConfig = field(default_factory=RunConfig)


class ConfigError(ValueError):
    pass


# ------------------------------------------------------------------------------ overrides
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a config (nested dataclasses expanded)."""
    out = []
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        k = f"{prefix}{f.name}"
        out.append(k)
        if is_dataclass(v):
            out += keys(v, k + ".")
    return out


def _parse_value(text: str, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        errs = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _parse_value(text, a, key)
            except ConfigError as e:
                errs.append(str(e))
        raise ConfigError(errs[0] if errs else f"{key}={text!r}: cannot parse")
    if tp is Any:
        return text
    if tp is bool:
        low = text.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}={text!r}: expected a bool (true/false)")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r}: expected an integer") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r}: expected a number") from None
    if tp is str:
        return text
    if origin is tuple:
        parts = [p for p in text.split(",") if p != ""]
        if args and args[-1] is not Ellipsis:
            if len(parts) != len(args):
                raise ConfigError(f"{key}={text!r}: expected {len(args)} comma-separated values")
            return tuple(_parse_value(p, a, key) for p, a in zip(parts, args))
        if not args or args[0] is Group or is_dataclass(args[0]):
            raise ConfigError(f"{key} holds structured rules: set it in the experiment file "
                              "(or use train.freeze / train.lr_mults on the command line)")
        return tuple(_parse_value(p, args[0], key) for p in parts)
    if is_dataclass(tp):
        raise ConfigError(f"{key} is a section: set its fields, e.g. {key}.{fields(tp)[0].name}=...")
    raise ConfigError(f"{key}: cannot parse values of type {tp}")


def _set(cfg: Any, path: list[str], text: str, full: str, root: Any) -> Any:
    name = path[0]
    names = {f.name for f in fields(cfg)}
    if name not in names:
        cands = keys(root)
        near = difflib.get_close_matches(full, cands, n=1, cutoff=0.5)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"unknown config key {full!r}{hint} (run with --help to list every key)")
    tp = _hints(type(cfg))[name]
    cur = getattr(cfg, name)
    if len(path) == 1:
        return replace(cfg, **{name: _parse_value(text, tp, full)})
    if cur is None:                       # Optional section: start from its defaults
        sub = [a for a in typing.get_args(tp) if is_dataclass(a)]
        if not sub:
            raise ConfigError(f"{'.'.join(full.split('.')[:-len(path) + 1])} is not a section")
        cur = sub[0]()
    if not is_dataclass(cur):
        raise ConfigError(f"{full}: {name} is a value, not a section")
    return replace(cfg, **{name: _set(cur, path[1:], text, full, root)})


def override(cfg: Any, args: list[str]) -> Any:
    """Apply ``key=value`` overrides (dotted keys) to a frozen dataclass config."""
    for a in args:
        if "=" not in a:
            raise ConfigError(f"override {a!r} is not key=value (e.g. train.steps=200)")
        k, v = a.split("=", 1)
        cfg = _set(cfg, k.strip().split("."), v.strip(), k.strip(), cfg)
    return cfg


# ------------------------------------------------------------------------------ checks
def _groups(t: TrainConfig) -> tuple[Group, ...]:
    gs = list(t.groups)
    for item in filter(None, (s.strip() for s in t.lr_mults.split(","))):
        if "=" not in item:
            raise ConfigError(f"train.lr_mults item {item!r}: use regex=multiplier")
        rx, m = item.rsplit("=", 1)
        gs.append(Group(rx, lr_mult=float(m)))
    if t.freeze:
        gs.insert(len(t.groups), Group(t.freeze, frozen=True))
    return tuple(gs)


def optimizer_groups(exp: Experiment) -> tuple[Group, ...]:
    return _groups(exp.train)


RESUME_WORDS = ("", "auto", "none")   # train.resume values that are not a checkpoint folder


def validate(exp: Experiment, world_size: int = 1) -> Experiment:
    """Raise ConfigError on anything that would fail later (all at start, not after an hour)."""
    t, e, c, p = exp.train, exp.eval, exp.checkpoint, exp.parallel
    errs = []
    if t.steps < 1:
        errs.append(f"train.steps={t.steps} must be >= 1")
    if not t.lr > 0:
        errs.append(f"train.lr={t.lr} must be > 0")
    if t.warmup < 0 or t.weight_decay < 0 or t.clip < 0:
        errs.append("train.warmup, train.weight_decay and train.clip must be >= 0")
    if not 0 <= t.min_lr_ratio <= 1:
        errs.append(f"train.min_lr_ratio={t.min_lr_ratio} must lie in [0, 1]")
    if not all(0 <= b < 1 for b in t.betas):
        errs.append(f"train.betas={t.betas} must lie in [0, 1)")
    if t.precision not in PRECISIONS:
        errs.append(f"train.precision={t.precision!r}: use one of {PRECISIONS}")
    if t.mode not in ("autograd", "func"):
        errs.append(f"train.mode={t.mode!r}: use autograd or func")
    if t.remat not in REMAT_METHODS:
        errs.append(f"train.remat={t.remat!r}: use one of {REMAT_METHODS}")
    if t.remat_layers < 1 or t.max_bad_steps < 1 or t.log_every < 1:
        errs.append("train.remat_layers, train.max_bad_steps and train.log_every must be >= 1")
    rows = getattr(exp.data, "batch_size", None)
    if t.grad_accum < 1:
        errs.append(f"train.grad_accum={t.grad_accum} must be >= 1")
    elif rows is not None and rows % t.grad_accum:
        errs.append(f"train.grad_accum={t.grad_accum} must divide data.batch_size={rows} (rows per step "
                    "on each data-parallel rank)")
    if t.pretrain_steps < 0 or t.pretrain_lr < 0:
        errs.append("train.pretrain_steps and train.pretrain_lr must be >= 0")
    if t.pretrain_freeze:
        try:
            re.compile(t.pretrain_freeze)
        except re.error as ex:
            errs.append(f"train.pretrain_freeze={t.pretrain_freeze!r} is not a regex: {ex}")
    if t.lora and t.lora_rank < 1:
        errs.append(f"train.lora_rank={t.lora_rank} must be >= 1")
    if e.every < 0 or c.every < 0 or c.keep_last < 0 or e.max_samples < 0 or e.batch_size < 1:
        errs.append("eval.every, eval.max_samples, checkpoint.every and checkpoint.keep_last must be >= 0")
    if e.max_new_tokens < 1 or e.show < 0:
        errs.append(f"eval.max_new_tokens={e.max_new_tokens} must be >= 1 and eval.show={e.show} >= 0")
    if t.resume not in RESUME_WORDS and not Path(t.resume).is_dir():
        errs.append(f"train.resume={t.resume!r}: no such checkpoint folder (use auto, none, or a "
                    "checkpoints/step_N folder of a run)")
    from neva.parallel.pipeline import SCHEDULES
    if p.pp_schedule not in SCHEDULES:
        errs.append(f"parallel.pp_schedule={p.pp_schedule!r}: use gpipe or 1f1b")
    if t.mode == "func" and p.pp > 1:
        errs.append("train.mode=func with parallel.pp > 1: the pipeline schedule runs each stage's backward "
                    "with autograd (it must hand gradients between stages); use train.mode=autograd")
    if min(p.tp, p.pp, p.ep) < 1:
        errs.append("parallel.tp, parallel.pp and parallel.ep must be >= 1")
    elif world_size % (p.tp * p.pp * p.ep):
        errs.append(f"parallel.tp*pp*ep = {p.tp * p.pp * p.ep} does not divide the world size {world_size}")
    if p.sp and p.tp == 1:
        errs.append("parallel.sp=true needs parallel.tp > 1 (the sequence is split over tp)")
    try:
        for g in _groups(t):
            re.compile(g.pattern)
    except (ConfigError, ValueError, re.error) as ex:
        errs.append(f"train.groups / freeze / lr_mults: {ex}")
    try:
        exp.model.validate()
    except ValueError as ex:
        errs.append(str(ex))
    if exp.data is not None and hasattr(exp.data, "validate"):
        try:
            exp.data.validate()
        except ValueError as ex:
            errs.append(str(ex))
    if errs:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errs))
    return exp


# ------------------------------------------------------------------------------ save / load
def to_dict(cfg: Any) -> dict:
    d = dataclasses.asdict(cfg)
    if isinstance(cfg, Experiment) and cfg.data is not None:
        d["_data_class"] = f"{type(cfg.data).__module__}.{type(cfg.data).__qualname__}"
    return d


def save(exp: Experiment, run_dir: str | Path) -> Path:
    path = Path(run_dir) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_dict(exp), indent=1, default=str))
    return path


def from_dict(cls: type, d: dict) -> Any:
    """Rebuild a dataclass from ``to_dict`` output (nested dataclasses and tuples restored)."""
    hints = _hints(cls)
    kw = {}
    for f in fields(cls):
        if f.name not in d:
            continue
        kw[f.name] = _restore(hints[f.name], d[f.name])
    return cls(**kw)


def _restore(tp: Any, v: Any) -> Any:
    if v is None:
        return None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for a in args:
            if a is not type(None):
                try:
                    return _restore(a, v)
                except (TypeError, ValueError):
                    continue
        return v
    if is_dataclass(tp) and isinstance(v, dict):
        return from_dict(tp, v)
    if origin is tuple or tp is tuple:
        a0 = args[0] if args else None
        if a0 is not None and is_dataclass(a0):
            return tuple(from_dict(a0, x) for x in v)
        if isinstance(v, list) and v and isinstance(v[0], dict) and "pattern" in v[0]:
            return tuple(Group(**x) for x in v)
        return tuple(v)
    return v


def load(path: str | Path) -> Experiment:
    """The resolved config a run saved (``config.json`` or its folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    d = json.loads(path.read_text())
    data_cls = d.pop("_data_class", None)
    exp = from_dict(Experiment, {k: v for k, v in d.items() if k != "data"})
    if data_cls and d.get("data") is not None:
        mod, _, name = data_cls.rpartition(".")
        exp = replace(exp, data=from_dict(getattr(importlib.import_module(mod), name), d["data"]))
    return exp


def describe(cfg: Any, prefix: str = "") -> str:
    """Every key with its current value, one per line (``--help``)."""
    lines = []
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if is_dataclass(v):
            lines.append(describe(v, f"{prefix}{f.name}."))
        else:
            lines.append(f"  {prefix}{f.name}={v!r}")
    return "\n".join(lines)


def parse(argv: list[str], base: Experiment, world_size: int = 1) -> Experiment:
    """Apply the ``key=value`` items of ``argv`` to ``base`` and validate. ``--help`` lists the keys."""
    if any(a in ("-h", "--help") for a in argv):
        print("override any of these with key=value:\n" + describe(base))
        raise SystemExit(0)
    return validate(override(base, argv), world_size)
