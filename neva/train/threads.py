"""How many threads a CPU run uses: one, or every core when that is clearly faster now."""
from __future__ import annotations

import os
import time

import torch


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
