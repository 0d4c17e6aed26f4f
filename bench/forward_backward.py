"""Forward + backward tokens/s of neva vs transformers' LlavaForConditionalGeneration, same weights.

SigLIP (4 layers, 224 px, patch 14 -> 256 patches) + Mixtral (4 layers, hidden 256, 8 experts top-2),
batch 4 x 512 tokens, each sample one image expanded to its 256 tokens followed by text. Both compute
the training loss (next-token CE over the text tokens plus the MoE balance loss) and the gradients of
every parameter; weights are cast to the precision (no autocast) for both. Ours is loaded from the HF
model through save_pretrained + neva.hf.load. Iterations of the two alternate, so load from other
processes on the machine hits both alike; we report the median after a warmup. On an oversubscribed
CPU, multi-threaded timings measure OpenMP waits more than compute: run with --threads 1 as well.

    python bench/forward_backward.py [--iters 6] [--warmup 2] [--dtypes fp32,bf16] [--threads N] [--profile]

Memory: the resident memory one step adds at its peak (Linux's high-water mark, reset before the
step), for each side after its timed steps.

MFU: model FLOPs per step (``neva.flops``: every matmul of every part, attention scores, backward = 2x
forward) over the step time, against the matmul peak this bench measures at start (a 2048^2 matmul in
the same dtype and thread count). ``--profile`` prints the top ops by self time of one step each.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import re
import statistics
import tempfile
import time

import torch

import neva
import neva.hf
from neva import flops
from neva.loss import label_count
from neva.train import precision
from neva.params import flatten, unflatten

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def hf_model(seed: int = 0):
    import transformers
    transformers.logging.set_verbosity_error()
    vision = transformers.SiglipVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                             num_attention_heads=4, image_size=224, patch_size=14)
    text = transformers.MixtralConfig(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=2, num_local_experts=8,
                                      num_experts_per_tok=2, output_router_logits=True)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=31999,
                                   vision_feature_select_strategy="full", vision_feature_layer=-1)
    torch.manual_seed(seed)
    return transformers.LlavaForConditionalGeneration(cfg)


def make_batch(cfg: neva.ModelConfig, B: int = 4, T: int = 512) -> dict:
    g = torch.Generator().manual_seed(0)
    P = cfg.tokens_per_image
    ids = torch.randint(0, cfg.image_token_id, (B, T), generator=g)
    ids[:, 1:1 + P] = cfg.image_token_id
    labels = ids.masked_fill(ids == cfg.image_token_id, -100)
    return {"input_ids": ids, "labels": labels,
            "pixel_values": torch.randn(B, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)}


def step_ours(params: dict, cfg, batch) -> None:
    leaves = list(flatten(params).values())
    loss = neva.loss(params, cfg, batch)
    torch.autograd.grad(loss, leaves, allow_unused=True)


def step_hf(model, batch, dtype) -> None:
    out = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"].to(dtype), labels=batch["labels"])
    torch.autograd.grad(out.loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def matmul_peak(dtype: torch.dtype, n: int = 2048) -> float:
    """FLOP/s of an n x n matmul in ``dtype`` (its best time of 5 after a warmup)."""
    return 2 * n ** 3 / precision.matmul_seconds(dtype, n, reps=5)


def _status_mb(key: str) -> float:
    return int(re.search(rf"{key}:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) / 1024


def step_memory_mb(fn) -> float | None:
    """Resident memory one call of ``fn`` adds at its peak (MB): the kernel's high-water mark (VmHWM),
    reset just before the call, minus the resident memory then. Freed heap goes back to the system
    first (malloc_trim), so memory that an earlier call freed and glibc kept does not hide this one's.
    None where Linux's /proc/self/clear_refs is not there."""
    try:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        before = _status_mb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                  # 5: reset the peak RSS to the current RSS
    except (OSError, AttributeError):
        return None
    fn()
    return _status_mb("VmHWM") - before


def step_flops(cfg, params, batch) -> int:
    """Training FLOPs of one bench step (neva.flops' conventions)."""
    proj = [tuple(v.shape) for k, v in flatten(params).items() if k.startswith("projector/")]
    B, T = batch["input_ids"].shape
    n_label = int(label_count(batch))
    return flops.train_flops(cfg, proj, batch=B, seq=T, n_images=B, n_label=n_label)


def profile(name: str, fn, rows: int = 12) -> None:
    """The top ops of one call of ``fn`` by self CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof
    with prof(activities=[ProfilerActivity.CPU]) as p:
        fn()
    print(f"  {name}: top ops by self time")
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48))


def run(dtype_name: str, model, folder: str, batch, iters: int, warmup: int,
        show_profile: bool = False) -> tuple[float, float, dict, object, tuple]:
    dtype = DTYPES[dtype_name]
    cfg, params = neva.hf.load(folder)
    params = unflatten({k: v.detach().to(dtype).requires_grad_(True) for k, v in flatten(params).items()})
    model = model.to(dtype).train()
    for p in model.parameters():
        p.requires_grad_(True)
    ours, hf = [], []
    for i in range(warmup + iters):
        a = timed(lambda: step_ours(params, cfg, batch))
        b = timed(lambda: step_hf(model, batch, dtype))
        if i >= warmup:
            ours.append(a)
            hf.append(b)
    mem = (step_memory_mb(lambda: step_ours(params, cfg, batch)), step_memory_mb(lambda: step_hf(model, batch, dtype)))
    if show_profile:
        profile(f"ours {dtype_name}", lambda: step_ours(params, cfg, batch))
        profile(f"transformers {dtype_name}", lambda: step_hf(model, batch, dtype))
    return statistics.median(ours), statistics.median(hf), params, cfg, mem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--profile", action="store_true", help="print the top ops by self time, ours and transformers")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = hf_model()
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        cfg, _ = neva.hf.load(folder)
        batch = make_batch(cfg)
        n_tok = batch["input_ids"].numel()
        print(f"SigLIP+Mixtral LLaVA: vision {cfg.vision.n_layers}L d{cfg.vision.dim} {cfg.vision.image_size}px/"
              f"{cfg.vision.patch_size}, llm {cfg.llm.n_layers}L d{cfg.llm.dim} {cfg.llm.n_experts}x top-"
              f"{cfg.llm.top_k}, batch {tuple(batch['input_ids'].shape)}, {cfg.tokens_per_image} image tokens/sample, "
              f"threads {torch.get_num_threads()}, median of {args.iters} after {args.warmup} warmup, "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        if os.getloadavg()[0] > os.cpu_count():
            print("  the CPU is oversubscribed: with >1 thread every parallel op can wait a scheduler slice for "
                  "its partner thread, which swamps compute; compare with --threads 1")
        for name in args.dtypes.split(","):
            peak = matmul_peak(DTYPES[name])
            t_ours, t_hf, params, cfg_d, (m_ours, m_hf) = run(name, model, folder, batch, args.iters, args.warmup,
                                                               args.profile)
            fl = step_flops(cfg_d, params, batch)
            print(f"{name}: ours {n_tok / t_ours:8.0f} tok/s ({t_ours * 1e3:.0f} ms, MFU {fl / t_ours / peak:.1%})   "
                  f"HF {n_tok / t_hf:8.0f} tok/s ({t_hf * 1e3:.0f} ms, MFU {fl / t_hf / peak:.1%})   "
                  f"ratio ours/HF {t_hf / t_ours:.2f}   [{fl / 1e9:.1f} GFLOP/step, matmul peak {peak / 1e9:.0f} GFLOP/s]")
            if m_ours is not None:
                print(f"{name}: peak memory a step adds (resident, over the weights): ours {m_ours:.0f} MB   "
                      f"HF {m_hf:.0f} MB   ratio ours/HF {m_ours / m_hf:.2f}")


if __name__ == "__main__":
    main()
