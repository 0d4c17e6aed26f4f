"""Same losses in every layout: the main job's model (SigLIP + Mixtral, 8 experts, 32k vocabulary) on
its synthetic data, trained for a few fp32 steps on 4 gloo processes under tp2 x pp2, tp2 + sp with
ep2, and dp2 x tp2, gives the single-process run's per-step losses (within 1e-4 relative).

    python experiments/parallel_equivalence.py              # 20 steps, batch 16
    python experiments/parallel_equivalence.py --steps 5 --batch 8
    python experiments/parallel_equivalence.py --cp --steps 12   # cp2 on 2 processes, cp2 x tp2 on 4

Every run sees the same global batches, split into 2 micro-batches per step (over data ranks where
there are 2, else by accumulation), so the MoE load-balancing statistics are grouped alike.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import siglip_mixtral as main_job  # noqa: E402

from neva import model  # noqa: E402
from neva.data import build_loader, tokenizers  # noqa: E402
from neva.parallel.plan import Layout  # noqa: E402
from neva.testing import GlooPool  # noqa: E402
from neva.testing.runs import train_losses  # noqa: E402

LAYOUTS = {"tp2xpp2": (Layout(tp=2, pp=2), 2), "tp2+sp,ep2": (Layout(tp=2, ep=2, sp=True), 1),
           "dp2xtp2": (Layout(tp=2, dp=2), 1)}
CP_LAYOUTS = {"cp2": (Layout(cp=2), 2), "cp2xtp2": (Layout(cp=2, tp=2), 2)}   # 2 micro-batches by accumulation


def batches(n: int, batch_size: int) -> list[dict]:
    exp = main_job.base()
    main_job.ensure_data(exp)
    cfg = main_job.model_config()
    data = replace(exp.data, batch_size=batch_size, num_workers=0)
    it = iter(build_loader(data, cfg, tok=tokenizers.load(data.tokenizer)))
    return [{k: v for k, v in next(it).items() if isinstance(v, torch.Tensor)} for _ in range(n)]


def run(steps: int = 20, batch_size: int = 16, lr: float = 1e-3, pool: GlooPool | None = None,
        layouts: dict | None = None) -> dict:
    """-> {"reference": [losses], name: {"losses": [...], "max_rel", "max_abs", "seconds"}}. Each
    layout runs on a pool of its own world size (``pool`` is used where it fits)."""
    torch.set_num_threads(1)          # as each pool process: threads that wait on each other cost more here
    layouts = layouts or LAYOUTS
    cfg = main_job.model_config()
    params = model.init_params(cfg, seed=0)
    data = batches(steps, batch_size)
    t0 = time.time()
    ref = train_losses(None, Layout(dp=2), cfg, params, data, 1, lr=lr)["losses"]
    out: dict = {"reference": ref, "reference_seconds": time.time() - t0}
    pools = {pool.world: pool} if pool is not None else {}
    try:
        for name, (lay, accum) in layouts.items():
            if lay.world not in pools:
                pools[lay.world] = GlooPool(lay.world)
            t0 = time.time()
            got = pools[lay.world].run(train_losses, lay, cfg, params, data, accum, lr, timeout=1800)[0]["losses"]
            rel = max(abs(a - b) / abs(b) for a, b in zip(got, ref))
            out[name] = {"losses": got, "max_rel": rel, "max_abs": max(abs(a - b) for a, b in zip(got, ref)),
                         "seconds": time.time() - t0}
    finally:
        for p in pools.values():
            if p is not pool:
                p.close()
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--cp", action="store_true", help="the context-parallel layouts: cp2 (2 processes), cp2 x tp2 (4)")
    a = ap.parse_args(argv)
    layouts = CP_LAYOUTS if a.cp else LAYOUTS
    res = run(a.steps, a.batch, layouts=layouts)
    names = list(layouts)
    print(f"{'step':>4}  {'single':>10}  " + "  ".join(f"{n:>12}" for n in names))
    for i, r in enumerate(res["reference"]):
        print(f"{i + 1:>4}  {r:10.6f}  " + "  ".join(f"{res[n]['losses'][i]:12.6f}" for n in names))
    worst = max(res[n]["max_rel"] for n in names)
    for n in names:
        print(f"{n}: largest relative difference {res[n]['max_rel']:.2e}, absolute {res[n]['max_abs']:.2e} "
              f"({res[n]['seconds']:.0f} s)")
    ok = worst < 1e-4
    print(("OK" if ok else "MISMATCH") + f": worst {worst:.2e} (tolerance 1e-4)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
