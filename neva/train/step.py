"""The training step: gradients over micro-batches, then one optimizer update.

  grads, stats = compute_grads(params, cfg, micro_batches, par, ...)   # forward + backward only
  row = train_step(state, micro_batches, setup)                         # compute_grads + update

Normalisation (what makes accumulation and data parallelism exact): every forward returns its
``LossTerms`` (sums), weighed by the label count and micro-batch count of the *whole step*, summed
over its micro-batches and the data-parallel ranks, so one step over 4 micro-batches equals one step
over their concatenation, and data ranks with uneven label counts average correctly. Gradients are
then summed over the ranks that share each leaf (``Parallel.sync``: the plan says which); pipelines
(pp > 1) run ``neva.parallel.pipeline``'s schedule instead of the loop over micro-batches. One process
is ``par=None``. The sharding-equivalence tests (``neva.testing``) drive exactly these functions.

A step whose loss or gradient norm is not finite is skipped (params and optimizer state untouched)
and counted; ``max_bad_steps`` in a row stop the run with ``NonFiniteLoss``. Under fp16 an overflow
halves the loss scale and skips the step without counting as bad (that is the scaler's job).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from neva import comm, model
from neva.comm import LOCAL
from neva.config import ModelConfig
from neva.loss import LossTerms, label_count
from neva.params import Tree, flatten, unflatten
from neva.parallel import pipeline
from neva.train import optim
from neva.train import remat as remat_mod
from neva.train.precision import LossScaler, Policy, autocast, policy as get_policy
from neva.train.remat import RematPolicy

MODES = ("autograd", "func")


class NonFiniteLoss(RuntimeError):
    """Too many non-finite steps in a row; ``row`` is the metrics row of the last one (skipped)."""

    def __init__(self, msg: str, row: dict | None = None):
        super().__init__(msg)
        self.row = row


def compute_grads(params: Tree, cfg: ModelConfig, micro_batches: list[dict], par=None, *,
                  trainable: list[str], pol: Policy | None = None, mode: str = "autograd",
                  remat: RematPolicy | None = None, loss_scale: float = 1.0,
                  prepare: Callable[[Tree], Tree] | None = None) -> tuple[dict[str, Tensor], dict]:
    """Gradients (fp32, path -> tensor, summed over the ranks sharing each leaf, multiplied by
    ``loss_scale``) of the step loss over ``micro_batches`` with respect to the ``trainable``
    leaves, and step statistics {"loss", "ce", "aux", "z", "n_tokens"} (identical on every rank).

    ``par``: a ``neva.parallel.runtime.Parallel`` (params are then this rank's local leaves and
    ``micro_batches`` this data rank's); None for one process. ``prepare(params) -> params`` runs
    inside the differentiated function (e.g. LoRA merging). ``mode``: "autograd"
    (torch.autograd.grad) or "func" (torch.func.grad); they agree."""
    if mode not in MODES:
        raise ValueError(f"train.mode={mode!r}: use one of {MODES}")
    pol = pol or get_policy("fp32")
    dist = LOCAL if par is None else par.dist
    flat = flatten(params)
    tr_set = set(trainable)
    frozen = {p: v for p, v in flat.items() if p not in tr_set}
    n_local = torch.stack([label_count(mb) for mb in micro_batches]).sum().float()
    n_total = comm.all_reduce_nograd(n_local, dist.data, "sum")
    if float(n_total) == 0:
        raise ValueError("this step's batches hold no label tokens (all labels are -100): check the "
                         "template's label mask")
    n_micro = len(micro_batches) * dist.data_size
    layers = remat_mod.layers(remat)
    math_attention = remat is None or remat.method == "none"   # see precision.autocast

    if par is not None and par.layout.pp > 1:
        grads, terms = pipeline.compute_grads(
            params, cfg, micro_batches, par, trainable=trainable, n_total=float(n_total), n_micro=n_micro,
            autocast=lambda: autocast(pol), layers=layers, loss_scale=loss_scale, prepare=prepare)
        return _finish(grads, terms, cfg, par, n_micro)

    def micro_loss(tr: dict[str, Tensor], mb: dict) -> tuple[Tensor, LossTerms]:
        p = unflatten({**frozen, **tr})
        if prepare is not None:
            p = prepare(p)
        with autocast(pol, math_attention=math_attention):
            t = model.loss_terms(p, cfg, mb, dist, layers=layers)
        return t.total(cfg.llm, n_total, n_micro) * loss_scale, t.detach()

    grads: dict[str, Tensor] = {}
    terms = LossTerms.zeros()
    for mb in micro_batches:
        if mode == "func":
            g, t = torch.func.grad(micro_loss, has_aux=True)({p: flat[p] for p in trainable}, mb)
        else:
            tr = {p: flat[p].detach().requires_grad_() for p in trainable}
            with torch.enable_grad():
                loss, t = micro_loss(tr, mb)
            gl = torch.autograd.grad(loss, list(tr.values()), allow_unused=True)
            g = dict(zip(tr, gl))
        for p, gp in g.items():
            if gp is None:
                continue
            if p in grads:
                grads[p].add_(gp.float())
            else:                        # the first micro-batch's gradient is the accumulator (no zero-fill)
                grads[p] = gp.float() if gp.dtype != torch.float32 else gp
        terms = terms + t
    for p in trainable:                  # leaves the loss does not reach (e.g. unused layers) get zeros
        if p not in grads:
            grads[p] = torch.zeros_like(flat[p], dtype=torch.float32)
    return _finish({p: grads[p] for p in trainable}, terms, cfg, par, n_micro)


def _finish(grads: dict[str, Tensor], terms: LossTerms, cfg: ModelConfig, par, n_micro: int) -> tuple[dict, dict]:
    """Sum gradients over the ranks that share each leaf, and the LossTerms over the ranks that hold
    parts of the step."""
    if par is not None:
        par.sync(grads)
    terms = terms.reduce(LOCAL if par is None else par.dist.part("llm"))   # the MoE terms are the LLM's
    return grads, {**terms.means(cfg.llm, n_micro), "n_tokens": int(terms.n_tokens)}


# ------------------------------------------------------------------------------ the whole step
@dataclass(frozen=True)
class StepSetup:
    """Everything a step needs besides the state and the data."""

    cfg: ModelConfig
    opt: optim.AdamW
    precision: str = "fp32"
    mode: str = "autograd"
    remat: RematPolicy | None = None
    max_bad_steps: int = 5
    prepare: Callable[[Tree], Tree] | None = None
    par: object = None                # neva.parallel.runtime.Parallel under a plan; None: one process

    @property
    def pol(self) -> Policy:
        return get_policy(self.precision)


@dataclass
class TrainState:
    params: Tree                      # in the policy's param dtype (bf16 under bf16_o2)
    opt_state: dict                   # optim.init_state (+ fp32 masters under bf16_o2)
    scaler: LossScaler | None = None  # fp16 only
    skipped: int = 0                  # steps skipped for a non-finite loss, in total
    bad_in_row: int = 0
    trainable: list[str] = field(default_factory=list)
    updating: bool = False            # inside the in-place update: an error now leaves the state torn (not saved)

    @property
    def step(self) -> int:
        """Optimizer updates applied so far."""
        return self.opt_state["step"]


def init_state(params: Tree, setup: StepSetup) -> TrainState:
    """Cast ``params`` to the precision policy and create the optimizer state (masters in fp32).
    The state takes ownership of ``params``: fp32 leaves are updated in place, not copied."""
    pol = setup.pol
    setup.opt.validate()
    trainable = optim.trainable_paths(params, setup.opt)
    only = setup.par.owned(flatten(params), trainable) if setup.par is not None else None   # ZeRO-1
    opt_state = optim.init_state(params, setup.opt, master=pol.master, only=only)   # masters from fp32 values
    if pol.param_dtype != torch.float32:
        params = unflatten({p: v.to(pol.param_dtype) if v.is_floating_point() else v
                            for p, v in flatten(params).items()})
    return TrainState(params, opt_state, LossScaler() if pol.loss_scale else None, trainable=trainable)


def train_step(state: TrainState, micro_batches: list[dict], setup: StepSetup) -> dict:
    """One optimizer step over ``micro_batches``, in place on ``state``. -> a metrics row
    {"step", "loss", "ce", "aux", "z", "lr", "grad_norm", "n_tokens", "skipped", "time"} where
    ``step`` counts updates applied including this one."""
    t0 = time.perf_counter()
    scale = state.scaler.scale if state.scaler else 1.0
    grads, st = compute_grads(state.params, setup.cfg, micro_batches, setup.par, trainable=state.trainable,
                              pol=setup.pol, mode=setup.mode, remat=setup.remat, loss_scale=scale,
                              prepare=setup.prepare)
    if scale != 1.0:
        for g in grads.values():
            g.div_(scale)
    norm = optim.global_norm(grads) if setup.par is None else setup.par.sq_norm(grads).sqrt()
    finite = math.isfinite(float(norm))
    lr = optim.lr_at(state.step, setup.opt)
    if state.scaler is not None and math.isfinite(st["loss"]):
        state.scaler.update(finite)
        if not finite:                                   # fp16 overflow: skip, scale already halved
            return _row(state, st, lr, float(norm), t0, skipped_now=True)
    if not (finite and math.isfinite(st["loss"])):
        state.skipped += 1
        state.bad_in_row += 1
        row = _row(state, st, lr, float(norm), t0, skipped_now=True)
        if state.bad_in_row >= setup.max_bad_steps:
            raise NonFiniteLoss(
                f"{state.bad_in_row} steps in a row had a non-finite loss or gradient (last loss {st['loss']}, "
                f"grad norm {float(norm)}) after {state.step} updates: lower train.lr, use train.precision=bf16 "
                f"or fp32, or check the data; train.max_bad_steps sets how many to tolerate", row)
        return row
    state.bad_in_row = 0
    state.updating = True
    optim.update(state.params, grads, state.opt_state, setup.opt, norm=norm)
    if setup.par is not None:
        setup.par.share_updates(state.params, state.trainable)
    state.updating = False
    return _row(state, st, lr, float(norm), t0, skipped_now=False)


def _row(state: TrainState, st: dict, lr: float, norm: float, t0: float, skipped_now: bool) -> dict:
    row = {"step": state.step, "loss": st["loss"], "ce": st["ce"], "aux": st["aux"], "z": st["z"], "lr": lr,
           "grad_norm": norm, "n_tokens": st["n_tokens"], "skipped": state.skipped, "skipped_now": skipped_now,
           "time": time.perf_counter() - t0}
    if state.scaler is not None:
        row["loss_scale"] = state.scaler.scale
    return row
