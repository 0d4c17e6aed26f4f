"""Useful tokens per second of the main job's model with and without sequence packing, in one run.

The main job's model (SigLIP 2L + Mixtral 4L d128, 32k vocabulary) and data (its synthetic images,
captions and 4-frame videos, the Mixtral tokenizer, the `mistral` template), fp32 forward + backward
of the training loss on the loader's own batches: unpacked (each row one sample, padded to the
batch's longest) and packed into rows of each ``--rows`` length (first-fit decreasing). Steps of
the configurations alternate, so load from other processes hits all alike; the first round is a
warmup. "Useful" tokens: label tokens (what the loss trains) and non-padding tokens.

    python bench/packing.py [--steps 8] [--rows 192,208,256] [--threads 1]

It also prints each configuration's model FLOPs per label token (``neva.flops``): packing removes
the padding's share of the LLM's work, while the LM head over the labels (a 32k vocabulary on a
128-wide model: 25 MFLOP per label, forward and backward) and the vision tower per image stay; the
ratio of FLOPs per label bounds what packing can give at equal efficiency.
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

import neva
from neva import flops
from neva.data import build_loader, tokenizers
from neva.loss import label_count
from neva.params import flatten, unflatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import siglip_mixtral as job  # noqa: E402


def batches(exp, tok, packing: bool, rows: int, n: int) -> list[dict]:
    data = replace(exp.data, packing=packing, max_seq_len=rows, num_workers=0)
    return list(itertools.islice(iter(build_loader(data, exp.model, tok=tok)), n))


def counts(cfg, params, b: dict) -> tuple[int, int, int, float]:
    """(label tokens, non-padding tokens, all tokens, model training FLOPs) of one batch."""
    proj = [tuple(v.shape) for k, v in flatten(params).items() if k.startswith("projector/")]
    B, T = b["input_ids"].shape
    n_label = int(label_count(b))
    n_media = int(b["pixel_values"].shape[0]) if "pixel_values" in b else 0      # images and video frames
    nonpad = int(b["attention_mask"].sum()) if "attention_mask" in b else B * T
    return n_label, nonpad, B * T, flops.train_flops(cfg, proj, batch=B, seq=T, n_images=n_media, n_label=n_label)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="steps per configuration (the first is a warmup)")
    ap.add_argument("--rows", default="192,208,256", help="packed row lengths to try")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    exp = job.base()
    job.ensure_data(exp)
    cfg, tok = exp.model, tokenizers.load(exp.data.tokenizer)
    params = unflatten({k: v.requires_grad_(True) for k, v in flatten(neva.init_params(cfg, 0)).items()})
    leaves = list(flatten(params).values())
    configs = {"unpacked": batches(exp, tok, False, exp.data.max_seq_len, args.steps)}
    for r in (int(x) for x in args.rows.split(",")):
        configs[f"packed, rows of {r}"] = batches(exp, tok, True, r, args.steps)
    print(f"main job model, batch {exp.data.batch_size} rows, fp32, threads {torch.get_num_threads()}, "
          f"{args.steps - 1} steps each after a warmup, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    times: dict[str, list[float]] = {k: [] for k in configs}
    for i in range(args.steps):
        for name, bs in configs.items():
            t0 = time.perf_counter()
            torch.autograd.grad(neva.loss(params, cfg, bs[i]), leaves, allow_unused=True)
            times[name].append(time.perf_counter() - t0)
    base = None
    for name, bs in configs.items():
        t = sum(times[name][1:])
        lab, nonpad, tot, fl = (sum(c) for c in zip(*(counts(cfg, params, b) for b in bs[1:])))
        rate = (lab / t, nonpad / t)
        base = base or rate
        print(f"{name:20s} {1e3 * statistics.median(times[name][1:]):6.0f} ms/step  padding {1 - nonpad / tot:5.1%}  "
              f"label tok/s {rate[0]:6.0f} ({rate[0] / base[0]:.2f}x)  non-pad tok/s {rate[1]:6.0f} "
              f"({rate[1] / base[1]:.2f}x)  {fl / lab / 1e6:5.1f} MFLOP per label token")


if __name__ == "__main__":
    main()
