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
(a stage's under ``checkpoints/<tag>``). A run never mixes its files with another run's
(``checkpoint.claim``), and config.json is written only after the resumed checkpoint fits the config.

Nothing trained is lost: on an error in the loop (a bad sample found by a worker, too many non-finite
steps, any exception, Ctrl-C) the last good state is checkpointed before the error propagates; on
SIGTERM or SIGUSR1 (preemption: Slurm, Kubernetes) the run finishes its step, saves and exits with
128 + the signal's number (``Stopped``). Under torchrun every rank learns of a failure or a signal
at the same step boundary, so all save that step together. A skipped non-finite step is printed
with the sample ids of its batch; past ``train.max_bad_fraction`` of the stage's steps the run stops.
"""
from __future__ import annotations

import signal
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
from neva.train.faults import Stopped, StopSignals, agree, gather_ids, world
from neva.train.metrics import Metrics
from neva.train.remat import RematPolicy
from neva.train.step import NonFiniteLoss, StepSetup, TrainState, init_state, train_step
from neva.train.threads import pick_threads

Experiment = Any          # neva.experiment.Experiment (above this floor): model, data, train, eval, checkpoint, run


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


@dataclass
class Result:
    state: TrainState
    setup: StepSetup
    rows: list[dict] = field(default_factory=list)
    resumed_from: Path | None = None
    step: int = 0                     # the stage's steps done (resumed ones included)
    skipped_steps: int = 0            # steps skipped for a non-finite loss (run: over every stage)


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
    res, skipped, todo = None, 0, stages(exp)
    for st in todo:                  # a later stage that would refuse its folder refuses before the first trains
        if st.exp.train.resume != "auto":
            resumed = None if st.exp.train.resume in RESUME_WORDS else Path(st.exp.train.resume)
            ckpt.on_rank0(lambda: ckpt.claim(_ck_dir(st), resumed, auto=False, dry=True))  # noqa: B023
    for st in todo:
        setup = make_setup(st.exp, par, st.steps, st.groups)
        frozen = None if sources is None else ckpt.frozen_info(params, optim.trainable_paths(params, setup.opt), sources)
        res = train(st.exp, local, batches_for(st), par=par, setup=setup, frozen=frozen, stage=st,
                    eval_fn=eval_fn if not st.tag else None)
        skipped += res.skipped_steps
        local = plain_params(st.exp, res.state, merge_lora=False)
    res.skipped_steps = skipped
    return res


def _ck_dir(stage: Stage) -> Path:
    d = Path(stage.exp.run.dir) / "checkpoints"
    return d / stage.tag if stage.tag else d


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
    ck_dir = _ck_dir(stage)
    state = init_state(params, setup)
    start, resumed = _resume(exp, state, batches, ck_dir, setup, frozen)
    if is_main():
        overrides.save(exp, run_dir / "config.json")   # after the checkpoint was checked against it
    metrics = Metrics(run_dir, stage.offset + start, exp.run.tensorboard, is_main())
    r = _Run(exp, stage, state, setup, batches, ck_dir, frozen, metrics, Result(state, setup, resumed_from=resumed),
             last_saved=start if resumed else -1)
    bar = _progress(exp, start, stage.steps, stage.desc, is_main())
    try:
        with StopSignals(world() > 1) as r.signals:
            r.steps(start, bar, eval_fn)
    except Stopped:
        raise
    except BaseException as e:        # noqa: BLE001 - Ctrl-C too: save what is good, then let it propagate
        r.save_after(e)
        raise
    finally:
        if bar is not None:
            bar.close()
        metrics.close()
    r.result.skipped_steps = state.skipped
    return r.result


def _resume(exp: Experiment, state: TrainState, batches, ck_dir: Path, setup: StepSetup,
            frozen: dict | None) -> tuple[int, Path | None]:
    """Load ``train.resume``'s checkpoint into ``state`` (and the sampler position into ``batches``),
    once ``ck_dir`` may be this run's (``checkpoint.claim``: refused before anything is loaded, damaged
    or abandoned checkpoints set aside after the load fits). -> (the step it resumes at, the
    checkpoint) or (0, None). Rank 0 reads and moves; every rank gets the outcome."""
    word = exp.train.resume
    resumed = ckpt.on_rank0(lambda: ckpt.resolve(word, ck_dir))
    ckpt.on_rank0(lambda: ckpt.claim(ck_dir, resumed, auto=word == "auto", dry=True))
    meta = None if resumed is None else ckpt.load(resumed, state, par=setup.par, frozen=frozen)
    if meta is not None and meta.get("sampler") is not None and hasattr(batches, "load_state_dict"):
        batches.load_state_dict(meta["sampler"])
    moved = ckpt.on_rank0(lambda: ckpt.claim(ck_dir, resumed, auto=word == "auto"))
    if is_main():
        for line in moved:
            print(line)
        if moved and resumed is None:
            print(f"no intact checkpoint in {ck_dir}: this run starts at step 0")
        if meta is not None:
            print(f"resumed from {resumed} at step {meta['step']}")
    return (0, None) if meta is None else (int(meta["step"]), resumed)


@dataclass
class _Run:
    """One stage in progress: its steps, its checkpoints (with the sampler position), and what
    happens when something goes wrong (see the module docstring)."""

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
    signals: StopSignals | None = None
    pending: BaseException | None = None     # an error held until every rank knows of it
    position: dict | None = None             # the sampler after the last finished step (not after a batch fetched since)

    def _note_position(self) -> None:
        self.position = self.batches.state_dict() if hasattr(self.batches, "state_dict") else None

    def save(self, step: int) -> bool:
        """Checkpoint ``step`` unless it is saved already."""
        if step == self.last_saved:
            return False
        ckpt.save(self.ck_dir, step, self.state, {"sampler": self.position, "tag": self.stage.tag},
                  keep_last=self.exp.checkpoint.keep_last, par=self.setup.par, frozen=self.frozen)
        self.last_saved = step
        return True

    def _where(self, step: int) -> str:
        return str(self.ck_dir / f"step_{step:08d}")

    def steps(self, step: int, bar, eval_fn) -> None:
        """From ``step`` to the stage's end: one optimizer step per batch, a metrics row each,
        evaluation and checkpoints at their intervals, a checkpoint at the end."""
        exp, st, setup = self.exp, self.stage, self.setup
        n_data = setup.par.dist.data_size if setup.par is not None else 1   # every data rank reads as many
        it = iter(self.batches)
        self.result.step = step
        self._note_position()
        while True:
            t0 = time.perf_counter()
            batch = None
            if step < st.steps and self.pending is None:
                try:
                    batch = next(it)
                except Exception as e:       # noqa: BLE001 - e.g. a bad sample: every rank stops at this step
                    self.pending = e
            t_data = time.perf_counter() - t0
            self._agree(step)
            if step >= st.steps:
                break
            skipped = self.state.skipped
            try:
                row = train_step(self.state, split_batch(batch, setup.cfg, exp.train.grad_accum), setup)
            except NonFiniteLoss as e:       # the step is consumed (and logged) like any skipped one
                self.result.step = step = step + 1
                self._note_position()
                self._say_skipped(e.row, step)
                self.metrics.write(_finish_row(e.row, step + st.offset, n_tokens_in(batch) * n_data, t_data, st.tag))
                raise
            self.result.step = step = step + 1
            self._note_position()
            if eval_fn is not None and exp.eval.every and step % exp.eval.every == 0 and step < st.steps:
                try:
                    row.update(eval_fn(plain_params(exp, self.state), step))
                except Exception as e:       # noqa: BLE001 - held: under a plan the other ranks are past it
                    self.pending = e
            row = _finish_row(row, step + st.offset, n_tokens_in(batch) * n_data, t_data, st.tag)
            if step % exp.train.log_every == 0 or step == st.steps or self.state.skipped > skipped:
                self.metrics.write(row)
            self.result.rows.append(row)
            if self.state.skipped > skipped:
                self._say_skipped(row, step)
                self._check_bad_fraction(row, step)
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

    def _agree(self, step: int) -> None:
        """Every rank learns whether any rank holds an error or got a stop signal (one small
        all-reduce a step); then all save ``step`` together and raise: the error (the failing
        rank's own on the others) or ``Stopped``."""
        err, self.pending = self.pending, None
        sig, err = agree(self.signals.got if self.signals is not None else 0, err)
        if err is None and not sig:
            return
        why = f"stopped by {signal.Signals(sig).name} at step {step}" if err is None else f"error at step {step + 1}"
        saved = self._saved_line(step)
        if is_main():
            print(f"{why}: {saved}")
        if err is not None:
            raise err
        raise Stopped(sig, step)

    def _saved_line(self, step: int) -> str:
        """Save ``step``; -> where it is and how to resume, or why it could not be saved."""
        try:
            self.save(step)
        except Exception as e:  # noqa: BLE001 - the error that brought us here matters more
            return f"the last good state (step {step}) could not be saved ({type(e).__name__}: {e})"
        return (f"the last good state (step {step}) is in {self._where(step)}; run the same command again to "
                "resume (train.resume=auto)")

    def save_after(self, e: BaseException) -> None:
        """After an error that left the loop without ``_agree``: save the last good state where that
        is safe, and say where it is (or why there is none)."""
        step = self.result.step
        if step == self.last_saved:
            return
        last = f"the last checkpoint is {self._where(self.last_saved)}" if self.last_saved >= 0 else "no checkpoint yet"
        if self.state.updating:
            print(f"the error came inside the optimizer update of step {step + 1}, so the state is torn: not saved; {last}")
        elif world() > 1 and not isinstance(e, NonFiniteLoss):
            print(f"rank {tdist.get_rank()}: {type(e).__name__} after step {step}, which the other ranks may not "
                  f"share: not saved (a collective save could hang); {last}")
        else:
            saved = self._saved_line(step)
            if is_main():
                print(saved)

    def _say_skipped(self, row: dict, step: int) -> None:
        """Print a skipped non-finite step with the sample ids of its batch (every data rank's)."""
        ids = gather_ids(getattr(self.batches, "batch_ids", None) or [])
        if is_main():
            samples = f"; its samples: {', '.join(map(str, ids))}" if ids else ""
            print(f"step {step + self.stage.offset} skipped: the loss ({row['loss']}) or gradient norm ({row['grad_norm']}) "
                  f"is not finite{samples}; {self.state.skipped} of {step} steps skipped so far")

    def _check_bad_fraction(self, row: dict, step: int) -> None:
        t = self.exp.train
        limit = max(1, int(t.max_bad_fraction * self.stage.steps))
        if self.state.skipped > limit:
            raise NonFiniteLoss(
                f"{self.state.skipped} of {step} steps had a non-finite loss or gradient and were skipped, more than "
                f"train.max_bad_fraction={t.max_bad_fraction} of the stage's {self.stage.steps} steps allows ({limit}): "
                "check the samples printed above, lower train.lr, or use train.precision=bf16 or fp32", row)


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
