"""Experiments as code: an ``Experiment`` is the sections their owners define (``model``, ``data``,
``train``, ``eval``, ``checkpoint``, ``parallel``, ``run``), changed from the command line with dotted
overrides (``neva.overrides``) and checked all at once before anything runs::

    python experiments/siglip_mixtral.py train.steps=200 train.lr=1e-3 model.vision.select_layer=-1 \\
        data.template=mistral run.dir=runs/x

Each section validates itself; this file adds only the checks that span sections. The resolved config
is saved with the run (``save``) and read back by ``load``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from neva import overrides
from neva.config import ModelConfig
from neva.overrides import ConfigError, override  # noqa: F401 - the experiment API
from neva.parallel.config import ParallelConfig
from neva.train.config import RESUME_WORDS, CheckpointConfig, EvalConfig, RunConfig, TrainConfig  # noqa: F401


@dataclass(frozen=True)
class Experiment:
    """A run: every section, each a frozen dataclass its owner defines."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: Any = None                # the data pipeline: neva.data.config.DataConfig (or any frozen dataclass)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    run: RunConfig = field(default_factory=RunConfig)


def validate(exp: Experiment, world_size: int = 1) -> Experiment:
    """Raise ConfigError listing everything that would fail later (all at start, not after an hour)."""
    errs = []
    checks = [exp.model.validate, exp.train.validate, exp.eval.validate, exp.checkpoint.validate,
              lambda: exp.parallel.validate(world_size, exp.model), exp.run.validate]
    if exp.data is not None and hasattr(exp.data, "validate"):
        checks.append(exp.data.validate)
    for check in checks:
        try:
            check()
        except ValueError as ex:
            errs.append(str(ex))
    rows = getattr(exp.data, "batch_size", None)
    if rows is not None and exp.train.grad_accum >= 1 and rows % exp.train.grad_accum:
        errs.append(f"train.grad_accum={exp.train.grad_accum} must divide data.batch_size={rows} (rows per step "
                    "on each data-parallel rank)")
    if exp.train.pretrain_steps and exp.data is not None and hasattr(exp.data, "template"):
        from neva.data.templates import TEMPLATES
        if exp.train.pretrain_template not in TEMPLATES:         # stage 1 puts it in data.template
            errs.append(f"train.pretrain_template={exp.train.pretrain_template!r} is not a known template: use one of "
                        f"{sorted(TEMPLATES)}")
    if exp.train.mode == "func" and exp.parallel.pp > 1:
        errs.append("train.mode=func with parallel.pp > 1: the pipeline schedule runs each stage's backward "
                    "with autograd (it must hand gradients between stages); use train.mode=autograd")
    if errs:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errs))
    return exp


def save(exp: Experiment, run_dir: str | Path) -> Path:
    return overrides.save(exp, Path(run_dir) / "config.json")


def load(path: str | Path) -> Experiment:
    """The resolved config a run saved (``config.json`` or its folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    d = json.loads(path.read_text())
    if "_data_class" in d and isinstance(d.get("data"), dict):   # written before the sections split
        d["data"][overrides.CLASS_KEY] = d.pop("_data_class")
    return overrides.from_dict(Experiment, d)


def parse(argv: list[str], base: Experiment, world_size: int = 1, usage: str = "") -> Experiment:
    """Apply the ``key=value`` items of ``argv`` to ``base`` and validate. ``--help [SECTION]`` prints
    every key (or one section's) with its value, the values it takes and what it does, after ``usage``
    (the script's own flags), and exits."""
    for i, a in enumerate(argv):
        if a in ("-h", "--help") or a.startswith("--help="):
            section = a.partition("=")[2] or (argv[i + 1] if i + 1 < len(argv) and "=" not in argv[i + 1] else None)
            print(help_page(base, section, usage))
            raise SystemExit(0)
    return validate(override(base, argv), world_size)


def help_page(base: Experiment, section: str | None = None, usage: str = "") -> str:
    """What ``--help [SECTION]`` prints."""
    head = (usage.rstrip() + "\n\n" if usage else "") + (
        "Override any key with key=value (e.g. train.steps=200 model.llm.n_layers=8); unknown keys and values\n"
        "out of range fail at start. --help SECTION shows one section (" +
        ", ".join(f.name for f in fields(base)) + ") or key.\n\n")
    return head + overrides.help_text(base, section)
