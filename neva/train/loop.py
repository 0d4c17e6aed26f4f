"""The training loop every experiment shares: stages, resume, steps, metrics, checkpoints, evaluation.

    res = loop.run(exp, params, batches_for, par=par, eval_fn=...)     # every stage the config asks for
    res = loop.train(exp, params, batches)                              # one stage

A run is a list of ``Stage``s (``stages``): LLaVA's projector pretraining (``train.pretrain_*``: its own
data, template, lr and frozen leaves) when asked for, then the main stage. ``train.resume=auto`` resumes
each stage from its own newest checkpoint; a checkpoint folder resumes the stage it belongs to, so a
recipe never repeats this logic. ``batches_for(stage)`` gives each stage's batches (``neva.model`` batch
dicts, ``data.batch_size`` rows each); if they have ``state_dict()`` / ``load_state_dict()`` (a sampler
position) that goes into checkpoints, so a resumed run sees the same data.

Writes under ``run.dir``: ``config.json`` (the resolved config), ``metrics.jsonl`` (one row per step:
``step``, ``loss``, ``ce``, ``aux``, ``z``, ``lr``, ``grad_norm``, ``tokens_per_s`` ... plus evaluation
results on the steps that evaluate), TensorBoard events in ``tb/``, checkpoints in ``checkpoints/``
(a stage's under ``checkpoints/<tag>``). On an error (a run of non-finite losses, Ctrl-C) the last good
state is checkpointed before the error propagates, so nothing trained is lost.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as tdist

from neva import overrides
from neva.batch import split as split_batch
from neva.params import Tree, flatten, unflatten
from neva.progress import Progress
from neva.train import checkpoint as ckpt
from neva.train import lora as lora_mod
from neva.train import optim
from neva.train.config import RESUME_WORDS
from neva.train.remat import RematPolicy
from neva.train.step import NonFiniteLoss, StepSetup, TrainState, init_state, train_step

Experiment = Any          # neva.experiment.Experiment (above this floor): model, data, train, eval, checkpoint, run


def pick_threads(requested: int = 0) -> tuple[int, str]:
    """Set torch's intra-op threads. -> (threads, why, for the log). 0 = time a small matmul with 1
    thread and with every core and keep the faster: on a CPU shared with other work, threads that
    wait on each other at every op barrier can make a step ten times slower than one thread."""
    if requested > 0:
        torch.set_num_threads(requested)
        return requested, f"run.threads={requested}: {requested} thread{'s' * (requested > 1)}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cores <= 1:
        torch.set_num_threads(1)
        return 1, "1 core available: 1 thread"
    a, b = torch.randn(512, 256), torch.randn(256, 256)
    seconds = {}
    for n in (1, cores):
        torch.set_num_threads(n)
        for _ in range(3):
            a @ b
        t0 = time.perf_counter()
        for _ in range(20):
            a @ b
        seconds[n] = time.perf_counter() - t0
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    n, why = thread_choice(cores, seconds[1], seconds[cores], load)
    torch.set_num_threads(n)
    return n, why + "; set run.threads=N to choose"


def thread_choice(cores: int, t_one: float, t_all: float, load: float) -> tuple[int, str]:
    """Every core only if it clearly beats one thread (times of the same work); -> (threads, why)."""
    if t_all < 0.8 * t_one:
        return cores, f"{cores} cores, {t_one / t_all:.1f}x faster than 1: {cores} threads"
    if load >= 0.75 * cores:
        return 1, f"the CPU is busy (load {load:.1f} on {cores} cores): 1 thread"
    return 1, f"{cores} threads were not faster than 1 here ({t_one / t_all:.2f}x): 1 thread"


def is_main() -> bool:
    return not (tdist.is_available() and tdist.is_initialized()) or tdist.get_rank() == 0


@dataclass(frozen=True)
class Stage:
    """One stage of a run: its own config (data, template, lr, resume), steps and optimizer groups;
    ``tag`` names its checkpoint folder and prefixes its metrics ("" = the main stage); ``offset`` is
    the metrics step its first step follows."""

    exp: Experiment
    steps: int
    groups: tuple
    tag: str = ""
    offset: int = 0
    desc: str = "train"


def stages(exp: Experiment) -> list[Stage]:
    """The stages ``exp.train`` asks for: projector pretraining first when ``train.pretrain_steps``,
    then the main stage. ``train.resume=PATH`` resumes the stage that wrote PATH: an earlier stage is
    then skipped (the checkpoint holds all that the later one trains) and a later one starts from where
    PATH's stage ends."""
    t = exp.train
    main_resume, run_pre = t.resume, bool(t.pretrain_steps)
    if t.pretrain_steps and t.resume not in RESUME_WORDS:
        if ckpt.tag_of(t.resume) == "pretrain":
            main_resume = "none"
        else:
            run_pre = False
    out = []
    if run_pre:
        data = exp.data if exp.data is None else replace(exp.data, data_path=t.pretrain_data or exp.data.data_path,
                                                         template=t.pretrain_template)
        pt = replace(t, lr=t.pretrain_lr or t.lr, warmup=min(t.warmup, t.pretrain_steps // 4))
        out.append(Stage(replace(exp, data=data, train=pt), t.pretrain_steps,
                         replace(pt, freeze=t.pretrain_freeze).optimizer_groups(), "pretrain", 0, "stage 1 (captions)"))
    main = replace(exp, train=replace(t, resume=main_resume))
    out.append(Stage(main, t.steps, t.optimizer_groups(), "", t.pretrain_steps,
                     "stage 2 (questions)" if t.pretrain_steps else "train"))
    return out


def make_setup(exp: Experiment, par=None, steps: int | None = None, groups: tuple | None = None) -> StepSetup:
    """The StepSetup an experiment's ``train`` section describes (LoRA freezes all but its leaves);
    ``par`` (neva.parallel.runtime.Parallel) runs it under a parallel plan."""
    t = exp.train
    gs = t.optimizer_groups() if groups is None else groups
    prepare = None
    if t.lora:
        gs = lora_mod.groups(gs)
        scale = t.lora_alpha / t.lora_rank
        prepare = lambda p: lora_mod.materialize(p, scale)  # noqa: E731
    opt = optim.AdamW(lr=t.lr, betas=t.betas, weight_decay=t.weight_decay, clip=t.clip, warmup=t.warmup,
                      total=steps or t.steps, min_lr_ratio=t.min_lr_ratio, groups=gs)
    remat = RematPolicy(t.remat, t.remat_layers) if t.remat != "none" else None
    return StepSetup(exp.model, opt.validate(), precision=t.precision, mode=t.mode, remat=remat,
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
        self._tb_args = (str(run_dir / "tb"), keep_upto + 1 if keep_upto else None) if tensorboard else None

    def _writer(self):
        """The TensorBoard writer, made at the first row: a stage that trains no step (a finished
        run started again) adds no empty events file."""
        if self.tb is None and self._tb_args is not None:
            logdir, purge = self._tb_args
            self._tb_args = None
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(logdir, purge_step=purge)
            except ImportError:                                  # tensorboard is optional at run time
                pass
        return self.tb

    def write(self, row: dict) -> None:
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._writer() is not None:
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
    step: int = 0                     # the stage's steps done (resumed ones included)


def plain_params(exp: Experiment, state: TrainState, merge_lora: bool = True) -> dict:
    """fp32 params (this rank's leaves) for evaluation and export: masters where there are any,
    LoRA merged unless ``merge_lora=False`` (between stages, where LoRA keeps training)."""
    flat = {p: v.float() for p, v in flatten(state.params).items()}
    flat.update(state.opt_state.get("master", {}))
    params = unflatten(flat)
    if exp.train.lora and merge_lora:
        return lora_mod.merge(params, exp.train.lora_alpha / exp.train.lora_rank)
    return params


def run(exp: Experiment, params: Tree, batches_for: Callable[[Stage], Iterator[dict]], *, par=None,
        eval_fn: Callable[[Tree, int], dict] | None = None, sources: dict | None = None) -> Result:
    """Every stage of ``exp`` (``stages``) on ``params`` (full fp32 tree; LoRA leaves added if
    ``train.lora``), each continuing from the last. Under a plan (``par``) each rank trains its
    shard. ``eval_fn`` runs in the main stage. ``sources`` ({"vision": HF folder, ...}): the base came
    from there, so checkpoints leave out the leaves a stage does not train (and check them at resume).
    -> the main stage's Result."""
    local = params if par is None else par.shard(params)
    res = None
    for st in stages(exp):
        setup = make_setup(st.exp, par, st.steps, st.groups)
        frozen = None if sources is None else ckpt.frozen_info(params, optim.trainable_paths(params, setup.opt), sources)
        res = train(st.exp, local, batches_for(st), par=par, setup=setup, frozen=frozen, stage=st,
                    eval_fn=eval_fn if not st.tag else None)
        local = plain_params(st.exp, res.state, merge_lora=False)
    return res


def train(exp: Experiment, params: Tree, batches: Iterator[dict], *, par=None, setup: StepSetup | None = None,
          frozen: dict | None = None, eval_fn: Callable[[Tree, int], dict] | None = None,
          stage: Stage | None = None) -> Result:
    """Train ``params`` (fp32 tree; LoRA leaves already added if ``train.lora``) for one ``stage``
    (default: all of ``exp``'s ``train.steps`` as the main stage) on ``batches``. ``eval_fn(params,
    step) -> {name: number}`` runs every ``eval.every`` steps on ``plain_params`` (fp32, masters,
    LoRA merged); its results join that step's metrics row.

    Under a parallel plan (``par``), ``params`` are this rank's local leaves (``par.shard``) and
    ``batches`` this data rank's rows; checkpoints are sharded (any layout resumes them). ``frozen``
    (``checkpoint.frozen_info``) leaves the frozen leaves out of checkpoints."""
    stage = stage or Stage(exp, exp.train.steps, exp.train.optimizer_groups())
    setup = setup or make_setup(exp, par, stage.steps, stage.groups)
    run_dir = Path(exp.run.dir)
    ck_dir = run_dir / "checkpoints" / stage.tag if stage.tag else run_dir / "checkpoints"
    state = init_state(params, setup)
    start, resumed = _resume(exp, state, batches, ck_dir, setup, frozen)
    if is_main():
        overrides.save(exp, run_dir / "config.json")   # after the checkpoint was checked against it
    metrics = Metrics(run_dir, stage.offset + start, exp.run.tensorboard, is_main())
    r = _Run(exp, stage, state, setup, batches, ck_dir, frozen, metrics, Result(state, setup, resumed_from=resumed),
             last_saved=start if resumed else -1)
    bar = _progress(exp, start, stage.steps, stage.desc, is_main())
    try:
        r.steps(start, bar, eval_fn)
    except (NonFiniteLoss, KeyboardInterrupt):
        if r.save(r.result.step) and is_main():
            print(f"saved the last good state at step {r.result.step} to {ck_dir}; resume with train.resume=auto")
        raise
    finally:
        if bar is not None:
            bar.close()
        metrics.close()
    return r.result


def _resume(exp: Experiment, state: TrainState, batches, ck_dir: Path, setup: StepSetup,
            frozen: dict | None) -> tuple[int, Path | None]:
    """Load ``train.resume``'s checkpoint into ``state`` (and the sampler position into ``batches``).
    -> (the step it resumes at, the checkpoint) or (0, None)."""
    resumed = ckpt.resolve(exp.train.resume, ck_dir)
    if resumed is None:
        return 0, None
    meta = ckpt.load(resumed, state, par=setup.par, frozen=frozen)
    if meta.get("sampler") is not None and hasattr(batches, "load_state_dict"):
        batches.load_state_dict(meta["sampler"])
    if is_main():
        print(f"resumed from {resumed} at step {meta['step']}")
    return int(meta["step"]), resumed


@dataclass
class _Run:
    """One stage in progress: its steps, and its checkpoints (with the sampler position)."""

    exp: Experiment
    stage: Stage
    state: TrainState
    setup: StepSetup
    batches: Any
    ck_dir: Path
    frozen: dict | None
    metrics: "Metrics"
    result: Result
    last_saved: int = -1

    def save(self, step: int) -> bool:
        """Checkpoint ``step`` unless it is saved already."""
        if step == self.last_saved:
            return False
        sampler = self.batches.state_dict() if hasattr(self.batches, "state_dict") else None
        ckpt.save(self.ck_dir, step, self.state, {"sampler": sampler, "tag": self.stage.tag},
                  keep_last=self.exp.checkpoint.keep_last, par=self.setup.par, frozen=self.frozen)
        self.last_saved = step
        return True

    def steps(self, step: int, bar, eval_fn) -> None:
        """From ``step`` to the stage's end: one optimizer step per batch, a metrics row each,
        evaluation and checkpoints at their intervals, a checkpoint at the end."""
        exp, st, setup = self.exp, self.stage, self.setup
        n_data = setup.par.dist.data_size if setup.par is not None else 1   # every data rank reads as many
        it = iter(self.batches)
        self.result.step = step
        while step < st.steps:
            t0 = time.perf_counter()
            batch = next(it)
            t_data = time.perf_counter() - t0
            try:
                row = train_step(self.state, split_batch(batch, setup.cfg, exp.train.grad_accum), setup)
            except NonFiniteLoss as e:       # the step is consumed (and logged) like any skipped one
                self.result.step = step = step + 1
                self.metrics.write(_finish_row(e.row, step + st.offset, n_tokens_in(batch) * n_data, t_data, st.tag))
                raise
            self.result.step = step = step + 1
            if eval_fn is not None and exp.eval.every and step % exp.eval.every == 0 and step < st.steps:
                row.update(eval_fn(plain_params(exp, self.state), step))
            row = _finish_row(row, step + st.offset, n_tokens_in(batch) * n_data, t_data, st.tag)
            if step % exp.train.log_every == 0 or step == st.steps:
                self.metrics.write(row)
            self.result.rows.append(row)
            if bar is not None:
                bar.update(1, loss=row["loss"], **{"tokens/s": row[f"{st.tag}/tokens_per_s" if st.tag else "tokens_per_s"]})
                evals = {k[5:]: v for k, v in row.items() if k.startswith("eval/") and k.count("_") == 1}
                if evals:
                    bar.write(f"step {step}: held-out " + ", ".join(f"{k} {v:.3f}" for k, v in evals.items()))
            if exp.run.threads == 0 and step % 50 == 0:
                before = torch.get_num_threads()     # other work on the CPU comes and goes: re-check
                n, why = pick_threads(0)
                if n != before and bar is not None:
                    bar.write(f"step {step}: {why}")
            if exp.checkpoint.every and step % exp.checkpoint.every == 0 and step < st.steps:
                self.save(step)
        self.save(step)


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


def _progress(exp: Experiment, start: int, total: int, desc: str, main: bool) -> Progress:
    """A bar on a terminal; elsewhere a line every ``run.print_every`` steps (the main rank only)."""
    return Progress(total, desc, unit="step", on=exp.run.progress and main, initial=start,
                    every=exp.run.print_every, seconds=0)
