"""Greedy generation of neva vs transformers' ``LlavaForConditionalGeneration.generate``, same weights.

The forward-backward bench's model (``forward_backward.hf_model``: SigLIP 4 layers, 224 px -> 256
image tokens; Mixtral 4 layers, hidden 256, 8 experts top-2, 32k vocabulary), its weights drawn
larger so greedy choices are decisive. Prompts of one image each and 8-23 text tokens (left-padded
in a batch), batch 1 and 8, 64 new tokens, fp32 and bf16 (weights cast, no autocast), no stop at
eos. Per side, from time stamps of each step's tokens (``generate``'s ``on_token``, transformers'
streamer): time to first token (encode, prefill, first token), decode tokens/s (the other 63 tokens
of each row over the time from the first token to the last) and peak memory (the most the process's
resident memory grew during a run, sampled every millisecond). Runs of
the two sides alternate, so load from other processes hits both alike; medians after a warmup. The
greedy tokens of the two are compared row by row.

    python bench/generate.py [--iters 3] [--warmup 1] [--batches 1,8] [--dtypes fp32,bf16] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time

import torch
from forward_backward import DTYPES, hf_model

import neva.hf
from neva.generate import Sampling, generate
from neva.params import flatten, unflatten

NEW = 64


def decisive(model) -> None:
    """Redraw every matrix at std 0.08 (transformers' init is 0.02): with tiny random logits two
    implementations' rounding would flip argmax ties and the token comparison would measure that."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for w in model.parameters():
            if w.dim() >= 2:
                w.copy_(torch.randn(w.shape, generator=g) * 0.08)


def prompts(cfg, B: int) -> tuple[list[list[int]], torch.Tensor]:
    """B prompts: <s>, one image as its image tokens, 8-23 text tokens; their images float[B, 3, H, W]."""
    g = torch.Generator().manual_seed(B)
    img = [cfg.image_token_id] * cfg.tokens_per_image
    ps = [[1] + img + torch.randint(3, 31000, (8 + (5 * b) % 16,), generator=g).tolist() for b in range(B)]
    return ps, torch.randn(B, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)


class PeakRSS:
    """The most resident memory grew above its level at entry, sampled every millisecond."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._watch, daemon=True)
        self.t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.t.join()
        self.peak = max(self.peak, self._rss())

    @property
    def grown(self) -> int:
        return self.peak - self.base

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self) -> None:
        while not self.stop.wait(0.001):
            self.peak = max(self.peak, self._rss())


class Clock:
    """Time stamps of each step's tokens: ``generate``'s ``on_token`` and transformers' streamer
    (whose first ``put`` is the prompt)."""

    def __init__(self, skip: int = 0):
        self.t0, self.stamps, self.skip = time.perf_counter(), [], skip

    def __call__(self, tokens, done=None) -> None:
        self.stamps.append(time.perf_counter())

    def put(self, value) -> None:
        if self.skip:
            self.skip -= 1
            return
        self(value)

    def end(self) -> None:
        pass

    @property
    def first(self) -> float:
        """Seconds from the call to the first token: encode, prefill, one token."""
        return self.stamps[0] - self.t0

    @property
    def rest(self) -> float:
        """Seconds from the first token to the last."""
        return self.stamps[-1] - self.stamps[0]


def ours(params, cfg, ps, pix, n: int) -> tuple[list[list[int]], Clock]:
    clock = Clock()
    out = generate(params, cfg, ps, pix, Sampling(max_new_tokens=n, stop_at_eos=False), on_token=clock)
    return out["tokens"], clock


def theirs(model, ps, pix, n: int) -> tuple[list[list[int]], Clock]:
    T = max(len(p) for p in ps)
    ids = torch.tensor([[0] * (T - len(p)) + p for p in ps])
    am = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in ps])
    clock = Clock(skip=1)
    out = model.generate(input_ids=ids, attention_mask=am, pixel_values=pix, max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, eos_token_id=None, pad_token_id=0, streamer=clock)
    return out[:, T:].tolist(), clock


def run(dtype_name: str, model, folder: str, B: int, iters: int, warmup: int) -> dict:
    dtype = DTYPES[dtype_name]
    cfg, params = neva.hf.load(folder)
    params = unflatten({k: v.to(dtype) for k, v in flatten(params).items()})
    model = model.to(dtype)
    ps, pix = prompts(cfg, B)
    pix = pix.to(dtype)
    sides = {"ours": lambda n: ours(params, cfg, ps, pix, n), "hf": lambda n: theirs(model, ps, pix, n)}
    res = {s: {"ttft": [], "decode": [], "mem": 0, "tokens": None} for s in sides}
    with torch.no_grad():
        for i in range(warmup + iters):
            for s, fn in sides.items():
                with PeakRSS() as m:
                    toks, clock = fn(NEW)
                assert len(clock.stamps) == NEW, (s, len(clock.stamps))
                res[s]["tokens"] = toks
                if i >= warmup:       # the first run of a process also pays one-time allocations
                    res[s]["ttft"].append(clock.first)
                    res[s]["decode"].append(B * (NEW - 1) / clock.rest)
                    res[s]["mem"] = max(res[s]["mem"], m.grown)
    for r in res.values():
        r["ttft"], r["decode"] = statistics.median(r["ttft"]), statistics.median(r["decode"])
    a, b = res["ours"]["tokens"], res["hf"]["tokens"]
    res["same_rows"] = sum(x == y for x, y in zip(a, b))
    res["same_tokens"] = sum(u == v for x, y in zip(a, b) for u, v in zip(x, y))
    res["first_diff"] = min((next(j for j, (u, v) in enumerate(zip(x, y)) if u != v) for x, y in zip(a, b) if x != y),
                            default=None)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = hf_model().eval()
    decisive(model)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        cfg, _ = neva.hf.load(folder)
        print(f"SigLIP+Mixtral LLaVA: vision {cfg.vision.n_layers}L d{cfg.vision.dim} {cfg.vision.image_size}px, "
              f"llm {cfg.llm.n_layers}L d{cfg.llm.dim} {cfg.llm.n_experts}x top-{cfg.llm.top_k} vocab "
              f"{cfg.llm.vocab_size}; prompts of one image ({cfg.tokens_per_image} tokens) + 8-23 text tokens, "
              f"{NEW} new tokens greedy; threads {torch.get_num_threads()}, median of {args.iters} after "
              f"{args.warmup} warmup")
        for name in args.dtypes.split(","):
            for B in map(int, args.batches.split(",")):
                load = os.getloadavg()[0]
                r = run(name, model, folder, B, args.iters, args.warmup)
                o, h = r["ours"], r["hf"]
                print(f"{name} batch {B} (load {load:.1f}->{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs): "
                      f"first token ours {o['ttft'] * 1e3:.0f} ms / HF {h['ttft'] * 1e3:.0f} ms = "
                      f"{h['ttft'] / o['ttft']:.2f}x | decode ours {o['decode']:.0f} / HF {h['decode']:.0f} tok/s = "
                      f"{o['decode'] / h['decode']:.2f}x | peak memory ours {o['mem'] / 2**20:.0f} / HF "
                      f"{h['mem'] / 2**20:.0f} MiB | same greedy tokens: {r['same_rows']}/{B} rows, "
                      f"{r['same_tokens']}/{B * NEW} tokens" + (f" (first difference at token {r['first_diff']})"
                                                      if r["first_diff"] is not None else ""), flush=True)


if __name__ == "__main__":
    main()
