"""The training step: gradients over micro-batches, then one optimizer update.

Two functions, kept apart so the pipeline schedule (pp > 1) can replace the first:

  grads, stats = compute_grads(params, cfg, micro_batches, dist, ...)   # forward + backward only
  stats = train_step(state, micro_batches, setup)                         # compute_grads + update

Normalisation (what makes accumulation and data parallelism exact): the cross-entropy of every
micro-batch is divided by the label-token count of the *whole step*, summed over the micro-batches
and over the data-parallel group (``Dist.data``), so one step over 4 micro-batches equals one step
over their concatenation, and dp ranks with uneven label counts average correctly. The MoE aux and
z losses are per-token means already; they are averaged over micro-batches and dp ranks. Gradients
are then summed over ``Dist.data`` in ``reduce_grads`` (the one all-reduce of the step); under a
parallel plan (``StepSetup.par``) ``Parallel.sync`` does it per leaf (expert leaves over dp only,
norms under SP over tp too) and pipelines (pp > 1) run ``neva.parallel.pipeline`` instead.

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

from neva import model
from neva.config import ModelConfig
from neva.loss import IGNORE, shift_labels
from neva.params import Tree, flatten, unflatten
from neva.parallel import comm
from neva.parallel.comm import LOCAL, Dist
from neva.train import optim
from neva.train.precision import LossScaler, Policy, autocast, policy as get_policy
from neva.train.remat import RematPolicy, remat_kwargs

MODES = ("autograd", "func")


class NonFiniteLoss(RuntimeError):
    """Too many non-finite steps in a row; ``row`` is the metrics row of the last one (skipped)."""

    def __init__(self, msg: str, row: dict | None = None):
        super().__init__(msg)
        self.row = row


def label_count(batch: dict) -> int:
    """Tokens that the loss trains on: labels that some position predicts (after the shift)."""
    return int((shift_labels(batch["labels"], batch.get("segment_ids")) != IGNORE).sum())


def split_batch(batch: dict, n: int, cfg: ModelConfig) -> list[dict]:
    """Split a batch of B rows into ``n`` micro-batches of B/n rows; ``pixel_values`` follow the
    images each row holds (counted from its image tokens)."""
    B = batch["input_ids"].shape[0]
    if n < 1 or B % n:
        raise ValueError(f"grad accumulation {n} does not divide the batch size {B}")
    per = cfg.tokens_per_image
    imgs = ((batch["input_ids"] == cfg.image_token_id).sum(1) // per).tolist()
    out, start_img = [], 0
    for i in range(n):
        rows = slice(i * B // n, (i + 1) * B // n)
        mb = {k: v[rows] for k, v in batch.items()
              if isinstance(v, Tensor) and k != "pixel_values" and v.dim() and v.shape[0] == B}
        k = sum(imgs[rows])
        if batch.get("pixel_values") is not None:
            mb["pixel_values"] = batch["pixel_values"][start_img:start_img + k]
        start_img += k
        out.append(mb)
    return out


def reduce_grads(grads: dict[str, Tensor], dist: Dist) -> dict[str, Tensor]:
    """Sum gradients over the ranks that see different data (the step's only gradient collective).
    Each rank's loss is already divided by the global label count, so a sum is the exact mean."""
    if dist.data is None:
        return grads
    for g in grads.values():
        comm.all_reduce_(g, dist.data, "sum")
    return grads


def compute_grads(params: Tree, cfg: ModelConfig, micro_batches: list[dict], dist: Dist = LOCAL, *,
                  trainable: list[str], pol: Policy | None = None, mode: str = "autograd",
                  remat: RematPolicy | None = None, loss_scale: float = 1.0,
                  prepare: Callable[[Tree], Tree] | None = None, par=None) -> tuple[dict[str, Tensor], dict]:
    """Gradients (fp32, path -> tensor, summed over dp, multiplied by ``loss_scale``) of the step
    loss over ``micro_batches`` with respect to the ``trainable`` leaves, and step statistics
    {"loss", "ce", "aux", "z", "n_tokens"} (floats, identical on every rank).

    ``prepare(params) -> params`` runs inside the differentiated function (e.g. LoRA merging).
    ``mode``: "autograd" (torch.autograd.grad) or "func" (torch.func.grad); they agree.
    ``par``: a ``neva.parallel.runtime.Parallel`` (params are then this rank's local leaves)."""
    if mode not in MODES:
        raise ValueError(f"train.mode={mode!r}: use one of {MODES}")
    pol = pol or get_policy("fp32")
    flat = flatten(params)
    tr_set = set(trainable)
    frozen = {p: v for p, v in flat.items() if p not in tr_set}
    n_local = sum(label_count(mb) for mb in micro_batches)
    n_total = comm.all_reduce_nograd(torch.tensor(float(n_local)), dist.data, "sum")
    if float(n_total) == 0:
        raise ValueError("this step's batches hold no label tokens (all labels are -100): check the "
                         "template's label mask")
    share = 1.0 / (len(micro_batches) * dist.data_size)     # weight of one micro-batch's MoE losses
    layer_kw = remat_kwargs(remat, range(cfg.llm.n_layers))

    def micro_loss(tr: dict[str, Tensor], mb: dict) -> tuple[Tensor, Tensor]:
        p = unflatten({**frozen, **tr})
        if prepare is not None:
            p = prepare(p)
        with autocast(pol, math_attention=not layer_kw):
            t = model.loss_terms(p, cfg, mb, dist, **layer_kw)
        ce = t["ce_sum"].float() / n_total
        moe = model.combine({"ce_sum": ce.new_zeros(()), "n_tokens": 1, "aux": t["aux"], "z": t["z"]}, cfg)
        loss = ce + moe * share
        stats = torch.stack([ce.detach(), t["aux"].detach().float() * share, t["z"].detach().float() * share,
                             loss.detach()])
        return loss * loss_scale, stats

    if par is not None and par.layout.pp > 1:
        from neva.parallel import pipeline
        grads, acc = pipeline.compute_grads(
            params, cfg, micro_batches, dist, par.stage, trainable=trainable, n_total=float(n_total),
            n_micro_total=len(micro_batches) * dist.data_size, schedule=par.schedule, autocast=lambda: autocast(pol),
            layer_kw=layer_kw, loss_scale=loss_scale, prepare=prepare)
        return _finish(grads, acc, cfg, dist, par, n_total)
    grads: dict[str, Tensor] = {}
    acc = torch.zeros(4)
    for mb in micro_batches:
        if mode == "func":
            g, st = torch.func.grad(micro_loss, has_aux=True)({p: flat[p] for p in trainable}, mb)
        else:
            tr = {p: flat[p].detach().requires_grad_() for p in trainable}
            with torch.enable_grad():
                loss, st = micro_loss(tr, mb)
            gl = torch.autograd.grad(loss, list(tr.values()), allow_unused=True)
            g = dict(zip(tr, gl))
        for p, gp in g.items():
            if gp is None:
                continue
            if p in grads:
                grads[p].add_(gp.float())
            else:                        # the first micro-batch's gradient is the accumulator (no zero-fill)
                grads[p] = gp.float() if gp.dtype != torch.float32 else gp
        acc += st.float()
    for p in trainable:                  # leaves the loss does not reach (e.g. unused layers) get zeros
        if p not in grads:
            grads[p] = torch.zeros_like(flat[p], dtype=torch.float32)
    grads = {p: grads[p] for p in trainable}
    return _finish(grads, acc, cfg, dist, par, n_total)


def _finish(grads: dict[str, Tensor], acc: Tensor, cfg: ModelConfig, dist: Dist, par, n_total) -> tuple[dict, dict]:
    """Synchronise gradients and sum the statistics [ce, aux, z, loss] over the ranks holding parts."""
    if par is not None:
        par.sync(grads)
    else:
        reduce_grads(grads, dist)
    acc = comm.all_reduce_nograd(acc, dist.pp, "sum")        # each stage holds its layers' share
    if dist.sp:                                              # MoE statistics: each rank its tokens' share
        acc = torch.cat([acc[:1], comm.all_reduce_nograd(acc[1:3], dist.tp, "sum"), acc[3:]])
    acc = comm.all_reduce_nograd(acc, dist.data, "sum")
    ce, aux, z, loss = acc.tolist()
    if cfg.llm.n_experts:
        L = model.n_moe_layers(cfg)
        # the step's loss from its parts (under SP no rank holds the whole MoE share); per-layer means
        loss = ce + (cfg.llm.aux_loss_coef * aux + cfg.llm.z_loss_coef * z) / L
        aux, z = aux / L, z / L
    return grads, {"loss": loss, "ce": ce, "aux": aux, "z": z, "n_tokens": int(n_total)}


# ------------------------------------------------------------------------------ the whole step
@dataclass(frozen=True)
class StepSetup:
    """Everything a step needs besides the state and the data."""

    cfg: ModelConfig
    opt: optim.AdamW
    precision: str = "fp32"
    dist: Dist = LOCAL
    mode: str = "autograd"
    remat: RematPolicy | None = None
    max_bad_steps: int = 5
    prepare: Callable[[Tree], Tree] | None = None
    par: object = None                # neva.parallel.runtime.Parallel when running under a plan

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
    grads, st = compute_grads(state.params, setup.cfg, micro_batches, setup.dist, trainable=state.trainable,
                              pol=setup.pol, mode=setup.mode, remat=setup.remat, loss_scale=scale,
                              prepare=setup.prepare, par=setup.par)
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
    optim.update(state.params, grads, state.opt_state, setup.opt, norm=norm)
    if setup.par is not None:
        setup.par.share_updates(state.params, state.trainable)
    return _row(state, st, lr, float(norm), t0, skipped_now=False)


def _row(state: TrainState, st: dict, lr: float, norm: float, t0: float, skipped_now: bool) -> dict:
    row = {"step": state.step, "loss": st["loss"], "ce": st["ce"], "aux": st["aux"], "z": st["z"], "lr": lr,
           "grad_norm": norm, "n_tokens": st["n_tokens"], "skipped": state.skipped, "skipped_now": skipped_now,
           "time": time.perf_counter() - t0}
    if state.scaler is not None:
        row["loss_scale"] = state.scaler.scale
    return row
