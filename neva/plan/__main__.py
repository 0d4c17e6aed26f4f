"""``python -m neva.plan``: per-rank memory and communication of a layout, for a preset or a run's
config, from meta tensors (``neva.planner``: nothing is allocated).

    python -m neva.plan --preset mixtral-8x7b+so400m --gpus 64 --tp 8 --ep 8 --seq 32768 --media 44
    python -m neva.plan --config runs/siglip_mixtral/config.json --gpus 8 --tp 2 --cp 2 --seq 4096
    python -m neva.plan --preset mixtral-8x7b+so400m --gpus 64 --seq 32768 --media 44 --search

``--search`` tries every layout of the GPUs (tp, cp, pp, ep in 1, 2, 4, 8; SP with tp; with and
without ZeRO-1 where dp > 1, with and without activation checkpointing) and lists those whose busiest rank fits ``--memory``.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import replace

from neva import cli, model, planner
from neva.config import (ModelConfig, ProjectorConfig, clip_vit_l14_336, llama3_70b, mixtral_8x7b, nemotron4_15b,
                         siglip_so400m_384)
from neva.parallel.plan import Layout, Plan

PRESETS = {
    "mixtral-8x7b+so400m": lambda: ModelConfig(vision=siglip_so400m_384(), llm=replace(mixtral_8x7b(), vocab_size=32064)),
    "llama3-70b+clip-l336": lambda: ModelConfig(vision=clip_vit_l14_336(), llm=replace(llama3_70b(), vocab_size=128384),
                                                image_token_id=128256),
    "nemotron4-15b+siglip": lambda: ModelConfig(vision=siglip_so400m_384(), projector=ProjectorConfig("mlp_downsample"),
                                                llm=nemotron4_15b(), image_token_id=255999),
}
GiB = planner.GiB


def config_of(a) -> ModelConfig:
    if a.config:
        from pathlib import Path

        from neva.experiment import load
        if not Path(a.config).exists():
            raise FileNotFoundError(f"--config {a.config} does not exist: pass a run's config.json (or its folder)")
        return load(a.config).model
    if a.preset not in PRESETS:
        raise ValueError(f"--preset {a.preset!r}: use one of {sorted(PRESETS)} or --config RUN/config.json")
    return PRESETS[a.preset]()


def rank_costs(cfg: ModelConfig, plan: Plan, w: planner.Workload, specs: dict) -> list[dict]:
    """Per pipeline stage, its first rank's bytes (every rank of a stage holds the same shapes), with
    the total for each choice of ZeRO-1 and remat: ``total[(zero1, remat)]``, and ``total`` for ``w``'s."""
    out = []
    for s in range(plan.layout.pp):
        r = plan.layout.rank({"pp": s})
        st, act = planner.state_bytes(cfg, plan, r, w, specs), planner.activations(cfg, plan, r, w)
        totals = {(z, m): st["params"] + st["grads"] + st["optimizer_zero1" if z else "optimizer"]
                  + act["peak_remat" if m == "uniform" else "peak"]
                  for z, m in itertools.product((False, True), ("none", "uniform"))}
        out.append({"stage": s, "rank": r, **st, **act, "totals": totals, "total": totals[(w.zero1, w.remat)]})
    return out


def describe(cfg: ModelConfig, plan: Plan, w: planner.Workload, limit: float) -> str:
    specs = model.specs(cfg)
    lay = plan.layout
    lines = [f"layout {lay} ({lay.world} GPUs; vision tower {plan.tower('vision/')}), {w.micro_batches} micro-batches "
             f"of {w.micro_batch} x {w.seq} tokens ({w.media} media each), {w.precision}, remat {w.remat}, "
             f"zero1 {w.zero1}, attention {w.attention}"]
    for c in rank_costs(cfg, plan, w, specs):
        st = plan.stages(cfg)[c["stage"]]
        lines.append(f"stage {c['stage']} (LLM layers {st.start}-{st.stop - 1}), rank {c['rank']}:")
        lines.append(f"  parameters    {c['params'] / GiB:8.2f} GiB")
        lines.append(f"  gradients     {c['grads'] / GiB:8.2f} GiB (fp32)")
        lines.append(f"  optimizer     {c['optimizer'] / GiB:8.2f} GiB, with ZeRO-1 {c['optimizer_zero1'] / GiB:.2f} GiB")
        lines.append(f"  activations   {c['per_micro_batch'] / GiB:8.2f} GiB a micro-batch, "
                     f"{c['per_micro_batch_remat'] / GiB:.2f} GiB with remat; {c['in_flight']} in flight "
                     f"-> {(c['peak_remat'] if w.remat == 'uniform' else c['peak']) / GiB:.2f} GiB")
        top = sorted(c["layer"].items(), key=lambda kv: -kv[1])[:4]
        lines.append("    one LLM layer: " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in top) + " GiB")
        lines.append(f"  total         {c['total'] / GiB:8.2f} GiB ({'fits' if c['total'] <= limit else 'does NOT fit'} "
                     f"{limit / GiB:.0f} GiB)")
        sent = planner.collectives(cfg, plan, c["rank"], w, specs=specs)
        by_axis: dict = {}
        for (ax, kind), n in sent.items():
            by_axis.setdefault(ax, []).append(f"{kind} {n / GiB:.2f}")
        lines.append("  collectives a step: " + ("; ".join(f"{ax}: " + ", ".join(v) for ax, v in sorted(by_axis.items()))
                                                 + " GiB" if by_axis else "none"))
    return "\n".join(lines)


def search(cfg: ModelConfig, gpus: int, w: planner.Workload, limit: float, vision: str) -> list[tuple]:
    """Every layout of ``gpus`` that validates, with its busiest rank's bytes; sorted by that."""
    specs = model.specs(cfg)
    rows = []
    for tp, cp, pp, ep in itertools.product((1, 2, 4, 8), repeat=4):
        if gpus % (tp * cp * pp * ep):
            continue
        plan = Plan(Layout.fit(gpus, tp, pp, ep, tp > 1, cp), towers=Plan.vision_rows(vision))
        try:
            plan.validate(cfg, specs, suggest=False)
        except ValueError:
            continue
        costs = rank_costs(cfg, plan, w, specs)
        for key in costs[0]["totals"]:
            if key[0] and plan.layout.dp == 1:     # ZeRO-1 splits over dp: nothing to split
                continue
            worst = max(costs, key=lambda c: c["totals"][key])
            rows.append((worst["totals"][key], str(plan.layout), *key, worst))
    return sorted(rows, key=lambda r: r[0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m neva.plan", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--preset", default="mixtral-8x7b+so400m", help=f"one of {sorted(PRESETS)}")
    ap.add_argument("--config", help="a run's config.json (its model section) instead of a preset")
    ap.add_argument("--gpus", type=int, default=8)
    for ax in ("tp", "cp", "pp", "ep"):
        ap.add_argument(f"--{ax}", type=int, default=1)
    ap.add_argument("--no-sp", action="store_true", help="no sequence parallelism with tp > 1")
    ap.add_argument("--vision", default="tp", help="the vision tower's layout: tp | replicate | frames")
    ap.add_argument("--seq", type=int, default=4096, help="tokens per sample")
    ap.add_argument("--media", type=int, default=1, help="images or frames per sample")
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--micro-batches", type=int, default=8, help="per data rank and step")
    ap.add_argument("--precision", default="bf16_o2")
    ap.add_argument("--zero1", action="store_true")
    ap.add_argument("--remat", default="none", choices=("none", "uniform"),
                    help="activation checkpointing of every LLM layer (train.remat)")
    ap.add_argument("--attention", default="flash", choices=("flash", "math"),
                    help="flash: the kernel keeps no probabilities; math: it keeps them")
    ap.add_argument("--memory", type=float, default=80.0, help="GiB a GPU has for this (default 80)")
    ap.add_argument("--search", action="store_true", help="list the layouts of --gpus that fit --memory")
    a = ap.parse_args(argv)
    cfg = config_of(a)
    w = planner.Workload(seq=a.seq, micro_batch=a.micro_batch, micro_batches=a.micro_batches, media=a.media,
                         precision=a.precision, zero1=a.zero1, remat=a.remat, attention=a.attention)
    limit = a.memory * GiB
    if a.search:
        rows = search(cfg, a.gpus, w, limit, a.vision)
        fit = [r for r in rows if r[0] <= limit]
        print(f"{len(fit)} of {len(rows)} layouts of {a.gpus} GPUs fit {a.memory:g} GiB "
              f"({a.seq} tokens x {a.micro_batch}, {a.micro_batches} micro-batches, {a.precision}); busiest rank:")
        for total, lay, zero1, remat, c in (fit or rows[:10]):
            print(f"  {lay:24s} zero1={str(zero1):5s} remat={remat:7s} {total / GiB:7.1f} GiB  (params "
                  f"{c['params'] / GiB:.1f}, grads {c['grads'] / GiB:.1f}, optimizer "
                  f"{(c['optimizer_zero1'] if zero1 else c['optimizer']) / GiB:.1f}, activations "
                  f"{(c['peak_remat'] if remat == 'uniform' else c['peak']) / GiB:.1f})")
        return 0
    plan = Plan(Layout.fit(a.gpus, a.tp, a.pp, a.ep, a.tp > 1 and not a.no_sp, a.cp), towers=Plan.vision_rows(a.vision))
    plan.validate(cfg, model.specs(cfg), a.gpus)
    print(describe(cfg, plan, w, limit))
    return 0


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])      # a bad preset, config or layout: one line (--debug: the traceback)
