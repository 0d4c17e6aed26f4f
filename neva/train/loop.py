"""The training loop every experiment shares: resume, steps, metrics, checkpoints, evaluation hooks.

    state = loop.train(exp, params, batches, eval_fn=...)

``batches`` is an iterator of batches (``neva.model`` batch dicts, ``data.batch_size`` rows each);
if it has ``state_dict()`` / ``load_state_dict()`` (a sampler position) that goes into checkpoints,
so a resumed run sees the same data. Writes under ``run.dir``: ``config.json`` (the resolved config),
``metrics.jsonl`` (one row per step: ``step``, ``loss``, ``ce``, ``aux``, ``z``, ``lr``, ``grad_norm``,
``tokens_per_s`` ... plus evaluation results on the steps that evaluate), TensorBoard events in
``tb/``, checkpoints in ``checkpoints/``. On an error (a run of non-finite losses, Ctrl-C) the last
good state is checkpointed before the error propagates, so nothing trained is lost.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as tdist

from neva.experiment import Experiment, optimizer_groups, save as save_config
from neva.params import Tree, flatten, unflatten
from neva.parallel.comm import LOCAL, Dist
from neva.train import checkpoint as ckpt
from neva.train import lora as lora_mod
from neva.train import optim
from neva.train.remat import RematPolicy
from neva.train.step import NonFiniteLoss, StepSetup, TrainState, init_state, split_batch, train_step


def pick_threads(requested: int = 0) -> int:
    """Set torch's intra-op threads. 0 = time a small matmul with 1 thread and with every core and
    keep the faster: on a CPU shared with other work, threads that wait on each other at every op
    barrier can make a step ten times slower than one thread."""
    import os
    if requested > 0:
        torch.set_num_threads(requested)
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cores <= 1:
        torch.set_num_threads(1)
        return 1
    a, b = torch.randn(512, 256), torch.randn(256, 256)
    best = None
    for n in (1, cores):
        torch.set_num_threads(n)
        for _ in range(3):
            a @ b
        t0 = time.perf_counter()
        for _ in range(20):
            a @ b
        dt = time.perf_counter() - t0
        if best is None or dt < best[0] * 0.8:              # more threads must win clearly
            best = (dt, n)
    torch.set_num_threads(best[1])
    return best[1]


def is_main() -> bool:
    return not (tdist.is_available() and tdist.is_initialized()) or tdist.get_rank() == 0


def make_setup(exp: Experiment, dist: Dist = LOCAL, steps: int | None = None, groups: tuple | None = None,
               par=None) -> StepSetup:
    """The StepSetup an experiment's ``train`` section describes (LoRA freezes all but its leaves);
    ``par`` (neva.parallel.runtime.Parallel) runs it under a parallel plan."""
    t = exp.train
    gs = optimizer_groups(exp) if groups is None else groups
    prepare = None
    if t.lora:
        gs = lora_mod.groups(gs)
        scale = t.lora_alpha / t.lora_rank
        prepare = lambda p: lora_mod.materialize(p, scale)  # noqa: E731
    opt = optim.AdamW(lr=t.lr, betas=t.betas, weight_decay=t.weight_decay, clip=t.clip, warmup=t.warmup,
                      total=steps or t.steps, min_lr_ratio=t.min_lr_ratio, groups=gs)
    remat = RematPolicy(t.remat, t.remat_layers) if t.remat != "none" else None
    if par is not None and not par.single:
        dist = par.dist
    return StepSetup(exp.model, opt.validate(), precision=t.precision, dist=dist, mode=t.mode, remat=remat,
                     max_bad_steps=t.max_bad_steps, prepare=prepare, par=None if par is None or par.single else par)


class Metrics:
    """metrics.jsonl + TensorBoard, written by the main rank only. On resume, rows past the resumed
    step (written by the run that died) are dropped so the file reads as one clean run."""

    def __init__(self, run_dir: Path, keep_upto: int, tensorboard: bool, main: bool):
        self.main = main
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not main:
            return
        rows = []
        if keep_upto and self.path.exists():
            rows = [r for r in map(json.loads, self.path.read_text().splitlines()) if r["step"] <= keep_upto]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=keep_upto + 1 if keep_upto else None)
            except ImportError:                                  # tensorboard is optional at run time
                self.tb = None

    def write(self, row: dict) -> None:
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self.tb.add_scalar(k if "/" in k else f"train/{k}", v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


@dataclass
class Result:
    state: TrainState
    setup: StepSetup
    rows: list[dict] = field(default_factory=list)
    resumed_from: Path | None = None


def plain_params(exp: Experiment, state: TrainState, merge_lora: bool = True) -> dict:
    """fp32 params (this rank's leaves) for evaluation and export: masters where there are any,
    LoRA merged unless ``merge_lora=False`` (between stages, where LoRA keeps training)."""
    flat = {p: v.float() for p, v in flatten(state.params).items()}
    flat.update(state.opt_state.get("master", {}))
    params = unflatten(flat)
    if exp.train.lora and merge_lora:
        return lora_mod.merge(params, exp.train.lora_alpha / exp.train.lora_rank)
    return params


def train(exp: Experiment, params: Tree, batches: Iterator[dict], *, dist: Dist = LOCAL, par=None,
          frozen: dict | None = None,
          eval_fn: Callable[[Tree, int], dict] | None = None, setup: StepSetup | None = None,
          steps: int | None = None, run_dir: str | Path | None = None, desc: str = "train",
          tag: str = "", step_offset: int = 0) -> Result:
    """Train ``params`` (fp32 tree; LoRA leaves already added if ``train.lora``) for ``steps``
    (default ``train.steps``) on ``batches``. ``eval_fn(params, step) -> {name: number}`` runs every
    ``eval.every`` steps on ``plain_params`` (fp32, masters, LoRA merged); its results join that
    step's metrics row. ``tag`` prefixes metric names and names its checkpoint folder (a stage of a
    multi-stage recipe); ``step_offset`` shifts the ``step`` of its metrics rows so stages read as
    one curve.

    Under a parallel plan (``par``), ``params`` are this rank's local leaves (``par.shard``) and
    ``batches`` this data rank's rows; checkpoints are sharded (any layout resumes them). ``frozen``
    (``checkpoint.frozen_info``) leaves the frozen leaves out of checkpoints."""
    run_dir = Path(run_dir or exp.run.dir)
    steps = steps or exp.train.steps
    setup = setup or make_setup(exp, dist, steps, par=par)
    main = is_main()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(exp, run_dir)
    state = init_state(params, setup)
    ck_dir = run_dir / "checkpoints" / tag if tag else run_dir / "checkpoints"
    start, resumed = 0, ckpt.resolve(exp.train.resume, ck_dir)
    if resumed is not None:
        meta = ckpt.load(resumed, state, par=setup.par, frozen=frozen)
        start = int(meta["step"])
        if meta.get("sampler") is not None and hasattr(batches, "load_state_dict"):
            batches.load_state_dict(meta["sampler"])
        if main:
            print(f"resumed from {resumed} at step {start}")
    metrics = Metrics(run_dir, step_offset + start, exp.run.tensorboard, main)
    result = Result(state, setup, resumed_from=resumed)

    def save(step: int) -> None:
        sampler = batches.state_dict() if hasattr(batches, "state_dict") else None
        ckpt.save(ck_dir, step, state, {"sampler": sampler, "tag": tag}, keep_last=exp.checkpoint.keep_last,
                  par=setup.par, frozen=frozen)

    bar = _progress(exp, start, steps, desc, main)
    n_data = setup.dist.data_size        # tokens/s of the whole step: every data rank reads as many
    step = start
    last_saved = start if resumed is not None else -1
    try:
        it = iter(batches)
        while step < steps:
            t0 = time.perf_counter()
            batch = next(it)
            t_data = time.perf_counter() - t0
            try:
                row = train_step(state, split_batch(batch, exp.train.grad_accum, setup.cfg), setup)
            except NonFiniteLoss as e:       # the step is consumed (and logged) like any skipped one
                step += 1
                metrics.write(_finish_row(e.row, step + step_offset, n_tokens_in(batch) * n_data, t_data, tag))
                raise
            step += 1
            if eval_fn is not None and exp.eval.every and step % exp.eval.every == 0 and step < steps:
                row.update(eval_fn(plain_params(exp, state), step))
            row = _finish_row(row, step + step_offset, n_tokens_in(batch) * n_data, t_data, tag)
            if step % exp.train.log_every == 0 or step == steps:
                metrics.write(row)
            result.rows.append(row)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.3f}", refresh=False)
            if exp.run.threads == 0 and step % 50 == 0:
                pick_threads(0)              # other work on the CPU comes and goes: re-check
            if exp.checkpoint.every and step % exp.checkpoint.every == 0 and step < steps:
                save(step)
                last_saved = step
        if step != last_saved:
            save(step)
            last_saved = step
    except (NonFiniteLoss, KeyboardInterrupt):
        if step != last_saved:
            save(step)
            if main:
                print(f"saved the last good state at step {step} to {ck_dir}; resume with train.resume=auto")
        raise
    finally:
        if bar is not None:
            bar.close()
        metrics.close()
    return result


def n_tokens_in(batch: dict) -> int:
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()


def _finish_row(row: dict, step: int, n_in: int, t_data: float, tag: str) -> dict:
    """The metrics row as written: loop ``step``, the optimizer's count as ``opt_step``, throughput;
    under a ``tag`` every name but ``step`` and ``loss`` is prefixed."""
    row = dict(row)
    row.update(step=step, opt_step=row.pop("step"), tokens_per_s=n_in / max(row["time"], 1e-9), data_time=t_data)
    if tag:
        row = {k if k in ("step", "loss") else f"{tag}/{k}": v for k, v in row.items()}
    return row


def _progress(exp: Experiment, start: int, total: int, desc: str, main: bool):
    if not (exp.run.progress and main):
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True, mininterval=1.0)
