"""What a layout costs each rank, for real sizes, from meta tensors (nothing is allocated): the bytes
of parameters, gradients and optimizer state (with and without ZeRO-1), of the activations one
micro-batch keeps for its backward (with and without activation checkpointing), and of the
collectives a training step issues, per mesh axis. ``python -m neva.plan`` prints them
(``neva/plan/__main__.py``); ``tests/test_planner.py`` checks them against what a run allocates and
sends.

Parameters come from the plan itself: each leaf's ``ParamSpec`` sliced by ``Plan.shard_leaf`` on the
meta device for the rank's coordinates, ZeRO-1 shares from ``Parallel.owners``. Gradients are fp32
(``compute_grads`` returns fp32), AdamW keeps fp32 ``m`` and ``v`` and, under ``bf16_o2``, fp32 masters.

Activations are counted tensor by tensor as this code keeps them for autograd (``activations``):
RMSNorm keeps an fp32 copy of its input and its normalised output (LayerNorm the fp32 copy); a
column-parallel GEMM keeps its input (under SP the gathered sequence); the attention kernel
(``flash``, as on GPUs: q, k, v after rotary, output and log-sum-exp; ``math``: also the
probabilities) keeps under CP the gathered keys and values; SwiGLU keeps both projections, the SiLU
and their product. ``ideal=True`` counts instead what Megatron-LM with fused kernels keeps (a norm
keeps its input, under SP the GEMM inputs sharded and gathered again in the backward, SwiGLU's SiLU
recomputed): the accounting of Korthikanti et al. 2022, against whose formulas the tests check it.

Collectives are counted as ``neva.comm.counting`` records them: the payload a rank hands to each
call (the tensor all-reduced, the result of an all-gather, the input of a reduce-scatter, the rows an
all-to-all sends, a pipeline send, a ZeRO-1 broadcast), per (axis, kind). The MoE all-to-all sends
as many rows as a balanced router would (the one data-dependent size); the vocab-parallel loss
reduces its label rows (``label_rows``, default every position).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch

from neva import model
from neva.comm import Dist
from neva.config import ModelConfig
from neva.params import flatten
from neva.parallel.plan import Plan
from neva.parallel.runtime import Parallel
from neva.train.precision import policy

GiB = 2**30


@dataclass(frozen=True)
class Workload:
    """One training step's shape: ``micro_batches`` of ``micro_batch`` rows of ``seq`` tokens, each
    row with ``media`` images or frames; ``precision`` and ``remat`` as ``train.*`` names them."""

    seq: int = 4096
    micro_batch: int = 1
    micro_batches: int = 1          # per data rank and step (gradient accumulation)
    media: int = 1                  # images or video frames per row
    precision: str = "bf16_o2"
    zero1: bool = False
    remat: str = "none"             # none | uniform (every LLM layer checkpointed, one a chunk)
    attention: str = "flash"        # flash (GPU kernels) | math (keeps the probabilities)
    schedule: str = "1f1b"          # pipeline schedule: how many micro-batches a stage keeps in flight

    @property
    def act_bytes(self) -> int:
        """Bytes per activation element: fp32, or 16-bit under the mixed-precision policies."""
        return 4 if self.precision == "fp32" else 2


def _local(spec, place: tuple, plan: Plan, coords: dict) -> int:
    return math.prod(plan.shard_leaf(torch.empty(spec.shape, device="meta"), place, coords).shape)


def state_bytes(cfg: ModelConfig, plan: Plan, rank: int, w: Workload, specs: dict | None = None) -> dict:
    """This rank's {"params", "grads", "optimizer", "optimizer_zero1"} bytes (every leaf trained)."""
    specs = specs if specs is not None else model.specs(cfg)
    lay, pol = plan.layout, policy(w.precision)
    coords = lay.coords(rank)
    flat, pl = flatten(specs), plan.placements(specs)
    local = {p: _local(s, pl[p], plan, coords) for p, s in flat.items() if plan.stage_of(p, cfg) == coords["pp"]}
    n = sum(local.values())
    per_param = 8 + (4 if pol.master else 0)                       # AdamW m, v (+ fp32 master) per scalar
    par = Parallel(cfg, plan, Dist(), specs, rank, zero1=True)
    owners = par.owners({p: torch.empty(k, device="meta") for p, k in local.items()}, list(local))
    mine = sum(k for p, k in local.items() if owners[p] == coords["dp"])
    return {"params": n * pol.param_dtype.itemsize, "grads": 4 * n, "optimizer": per_param * n,
            "optimizer_zero1": per_param * mine if lay.dp > 1 else per_param * n}


# --------------------------------------------------------------------------------- activations
def _padded(seq: int, lay) -> int:
    """The sequence as ``model.normalize_batch`` pads it."""
    m = model.sequence_multiple(lay.cp, lay.tp, lay.sp and lay.tp > 1)
    return -(-seq // m) * m


def _llm_layer(cfg: ModelConfig, plan: Plan, w: Workload, ideal: bool, mask: bool = False) -> dict:
    """Bytes one LLM layer keeps for its backward, by tensor (this rank's share)."""
    l, lay, a = cfg.llm, plan.layout, w.act_bytes
    t, sp, cp = lay.tp, lay.sp and lay.tp > 1, lay.cp
    b, T = w.micro_batch, _padded(w.seq, lay)
    s = T // cp                                       # this rank's tokens
    q = s // t if sp else s                           # between the TP regions
    H, KV, d, h = l.n_heads // t, l.n_kv_heads // t, l.hd, l.dim
    tok, rot = b * s, l.rot_dim / d
    gemm_in = (b * q if ideal and sp else tok) * h * a
    qb, kb = tok * H * d * a, tok * KV * d * a
    # ours: RMSNorm an fp32 copy of its input and its output; LayerNorm an fp32 copy (+ mean, rstd)
    norm = a if ideal else (4 + a if l.norm == "rms" else 4)
    out = {"norms": 2 * b * q * h * norm + (0 if l.norm == "rms" else 2 * b * q * 8),
           "attn_in": gemm_in,
           "q": qb, "k": kb if cp == 1 else 0, "v": kb if cp == 1 else 0,    # the kernel's inputs, after rotary
           "kv_gathered": 2 * b * KV * T * d * a if cp > 1 else 0,
           # the kernel's output and log-sum-exp; wo's input is a copy of it under CP (two chunks) or
           # partial rotary (q head-major), else a view
           "attn_out": qb * (1 if ideal or (l.rot_dim == d and cp == 1) else 2) + 4 * tok * H,
           "mlp_in": gemm_in}
    c = s // 2                                        # under CP each query chunk sees its causal prefix
    area = c * c * (2 * cp + 1) if cp > 1 else s * T
    if mask or cp > 1:                                # the kernel keeps the mask as an additive float bias
        out["mask"] = b * area * a
    if w.attention == "math":
        out["probs"] = b * H * area * a
    f = l.ffn_dim // t
    if l.n_experts:
        rows = tok * l.top_k                          # routed rows this rank's experts run (balanced)
        out["router"] = b * q * (l.n_experts * 4 * 3 + l.top_k * 12) + rows * 16
        out["mlp_in"] = rows * h * a * (2 if ideal else 3)   # the grouped rows in; the outputs, weighted
        out["mlp"] = rows * f * a * (3 if ideal else 4)
    else:                                             # SwiGLU: both projections, SiLU, product; else act + out
        out["mlp"] = tok * f * a * ((3 if ideal else 4) if l.mlp == "swiglu" else 2)
    return out


def _vision(cfg: ModelConfig, plan: Plan, w: Workload) -> int:
    """Bytes the encoder and projector keep for one micro-batch's media (stage 0)."""
    v, lay, a = cfg.vision, plan.layout, w.act_bytes
    tower = plan.tower("vision/")
    t = lay.tp if tower == "tp" else 1
    n = w.micro_batch * w.media
    if tower == "frames":
        n = -(-n // (lay.cp * lay.tp))
    P, D = v.tokens_out, v.dim
    # LayerNorms: fp32 copies of the inputs, the outputs (+ mean, rstd); q, k, v, output (wo's input),
    # log-sum-exp; GELU in, out
    per_token = 2 * D * (4 + a) + 16 + 4 * D // t * a + 4 * v.n_heads // t + 2 * v.mlp_dim // t * a
    proj = n * P * (D + 2 * cfg.llm.dim) * a
    return n * 3 * v.image_size**2 * a + v.layers_used * n * P * per_token + proj


def activations(cfg: ModelConfig, plan: Plan, rank: int, w: Workload, ideal: bool = False,
                label_rows: int | None = None, mask: bool = False) -> dict:
    """This rank's activation bytes: {"layer": one LLM layer's by tensor, "per_micro_batch" (every
    tensor one micro-batch keeps on this rank's stage), "per_micro_batch_remat" (``remat=uniform``:
    each layer's input, and one layer's tensors while it is recomputed), "in_flight" (micro-batches
    the stage holds at once under the schedule), "peak", "peak_remat"}. ``mask``: the batch carries
    padding or packing (a dense mask is built; under cp always)."""
    lay, l, a = plan.layout, cfg.llm, w.act_bytes
    stage = lay.coords(rank)["pp"]
    layers = len(plan.stages(cfg)[stage])
    b, T = w.micro_batch, _padded(w.seq, lay)
    s = T // lay.cp
    q = s // lay.tp if lay.sp and lay.tp > 1 else s
    layer = _llm_layer(cfg, plan, w, ideal, mask)
    per_layer = sum(layer.values())
    shared = 2 * b * s * l.rot_dim * a + (b * s * T if lay.cp > 1 or mask else 0)   # rotary tables, the mask
    ends = 0
    if stage == 0:
        ends += _vision(cfg, plan, w) + b * T * 8                  # + the token ids the embedding keeps
    if stage == lay.pp - 1:
        m = b * s if label_rows is None else label_rows
        ends += m * l.dim * a + 4 * m * l.vocab_size // lay.tp + b * q * l.dim * (4 + a)
    full = layers * per_layer + shared + ends
    kept = layers * b * q * l.dim * a + shared + ends
    flight = min(lay.pp - stage, w.micro_batches) if w.schedule == "1f1b" else w.micro_batches
    return {"layer": layer, "per_micro_batch": full, "per_micro_batch_remat": kept + per_layer, "in_flight": flight,
            "peak": full * flight, "peak_remat": kept * flight + per_layer}


def korthikanti(cfg: ModelConfig, plan: Plan, w: Workload, selective: bool = True) -> float:
    """Korthikanti et al. 2022 (Table 2), activation bytes of one transformer layer in 16 bits:
    sbh(34 + 5as/h) without parallelism, sbh(10 + 24/t + 5as/(ht)) with tensor parallelism,
    sbh(34/t + 5as/(ht)) with tensor and sequence parallelism; selective recomputation drops the
    5as terms (the attention core). Their MLP is 4h wide and they keep dropout masks."""
    lay, l = plan.layout, cfg.llm
    s, b, h, t = _padded(w.seq, lay) // lay.cp, w.micro_batch, l.dim, lay.tp
    core = 0 if selective else 5 * l.n_heads * s / (h * t)
    if t == 1:
        return s * b * h * (34 + core)
    return s * b * h * ((34 / t if lay.sp else 10 + 24 / t) + core)


# --------------------------------------------------------------------------------- collectives
def _axis(plan: Plan, group: str) -> str | None:
    """The name ``comm.counting`` records a Dist group under (the data group: dp, ep or both)."""
    lay = plan.layout
    if group == "data":
        return "data" if lay.dp > 1 and lay.ep > 1 else ("dp" if lay.dp > 1 else ("ep" if lay.ep > 1 else None))
    return group if lay.size(group) > 1 else None


def collectives(cfg: ModelConfig, plan: Plan, rank: int, w: Workload, label_rows: list[int] | None = None,
                specs: dict | None = None) -> Counter:
    """Payload bytes per (axis, kind) this rank hands to collectives in one training step (see the
    module docstring). ``label_rows``: this rank's label positions in each micro-batch."""
    specs = specs if specs is not None else model.specs(cfg)
    lay, l, v = plan.layout, cfg.llm, cfg.vision
    pol, a = policy(w.precision), w.act_bytes
    pb = pol.param_dtype.itemsize
    c = Counter()

    def add(group: str, kind: str, n: float, times: int = 1) -> None:
        ax = _axis(plan, group)
        if ax is not None and n and times:
            c[(ax, kind)] += int(n) * times

    coords = lay.coords(rank)
    stage, t, sp = coords["pp"], lay.tp, lay.sp and lay.tp > 1
    layers = plan.stages(cfg)[stage]
    b, T = w.micro_batch, _padded(w.seq, lay)
    s = T // lay.cp
    x = b * s * l.dim * a                                          # one sequence of hidden states, this rank's tokens
    tower = plan.tower("vision/")
    frame_parts = plan.frame_parts(specs)
    for mb in range(w.micro_batches):
        if stage == 0:
            add("tp", "all_reduce", b * T * l.dim * pb)          # the vocab-parallel embedding
            n = b * w.media
            if n and tower == "tp" and t > 1:
                add("tp", "all_reduce", n * v.tokens_out * v.dim * a, 4 * v.layers_used)
                add("tp", "all_reduce", _projector_traffic(cfg, n) * a)
            if n and frame_parts and lay.cp * t > 1:
                per = -(-n // (lay.cp * t))
                rows = per * cfg.tokens_per_image * l.dim * a
                add("tp", "all_gather", rows * t)
                add("cp", "all_gather", rows * t * lay.cp)
                add("cp", "reduce_scatter", rows * t * lay.cp)
            if sp:
                add("tp", "all_gather", b * s * l.dim * pb)       # scatter_seq's backward
        hop = b * (s // t if sp else s) * l.dim * pb            # what a stage hands the next one, and back
        add("pp", "send", hop, (stage > 0) + (stage < lay.pp - 1))
        for i in layers:
            moe = bool(l.n_experts)
            if sp:
                add("tp", "all_gather", x, 4)
                add("tp", "reduce_scatter", x, 4)
            else:
                add("tp", "all_reduce", x, 4)
            if lay.cp > 1:
                kv = b * (l.n_kv_heads // t) * T * l.hd * a
                add("cp", "all_gather", kv, 2)
                add("cp", "reduce_scatter", kv, 2)
            if moe:
                k = l.top_k
                if sp:
                    add("tp", "all_gather", b * s * k * 4 + b * s * k * 8)   # routing weights, expert ids
                    add("tp", "reduce_scatter", b * s * k * 4)
                    add("tp", "all_reduce", 4 * l.n_experts + 4)
                else:
                    add("tp", "all_reduce", b * s * k * 4)
                add("cp", "all_reduce", 4 * l.n_experts + 4)
                add("ep", "all_to_all", 8 * l.n_experts)
                add("ep", "all_to_all", b * s * k * l.dim * a, 4)
        if stage == lay.pp - 1:
            rows = b * s if label_rows is None else label_rows[mb]
            if sp:
                add("tp", "all_gather", x)
                add("tp", "reduce_scatter", x)
            else:
                add("tp", "all_reduce", x)
            add("tp", "all_reduce", 12 * rows)                    # the vocab-parallel loss: max, sum, target
    add("data", "all_reduce", 4)                                  # the step's label count
    sums = plan.grad_sums(specs)
    pl = plan.placements(specs)
    flat = flatten(specs)
    mine = {p: _local(flat[p], pl[p], plan, coords) for p in flat if plan.stage_of(p, cfg) == stage}
    for p, k in mine.items():
        for g in sums[p]:
            add(g, "all_reduce", 4 * k)
    keys = {tuple(sorted({ax for ax in pl[p] if ax})) for p in mine}
    for key in keys:
        for ax in key:
            add(ax, "all_reduce", 4)                              # the global gradient norm's parts
    add("pp", "all_reduce", 4)
    add("pp", "all_reduce", 16)                                   # the step's loss terms
    if sp:
        add("tp", "all_reduce", 8)
    add("cp", "all_reduce", 16)
    add("data", "all_reduce", 16)
    if w.zero1 and lay.dp > 1:
        add("dp", "broadcast", sum(mine.values()) * pb)
    return c


def _projector_traffic(cfg: ModelConfig, n: int) -> int:
    """Elements a tp-sharded projector all-reduces for ``n`` media (a column linear's input
    gradient in the backward, a row linear's output in the forward: read off its logical axes)."""
    flat = flatten(model.specs(cfg)["projector"])
    tokens = cfg.tokens_per_image if cfg.projector.kind == "mlp_downsample" else cfg.vision.tokens_out
    out = 0
    for k, spec in flat.items():
        if k.endswith("/w") and len(spec.shape) == 2:
            o, inp = spec.shape
            out += n * tokens * (inp if spec.axes[0] == "mlp" else (o if spec.axes[1] == "mlp" else 0))
    return out
