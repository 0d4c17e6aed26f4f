"""Worlds to run a plan in: a simulated one in this process, and a persistent pool of gloo processes.

``local_world(cfg, layout)``: a fake process group plus PyTorch's LocalTensorMode run every rank of a
small world (1-4) in one process; each tensor holds one value per rank and collectives combine them.
Fast enough for hypothesis; no send/recv (so no pipeline). It yields the rank's ``Parallel`` (whose
coordinates are per-rank values) and the mode (``mode.rank_map(fn)`` builds a per-rank tensor).

``GlooPool(world)``: real processes on gloo, started once and kept alive for a whole test session;
``pool.run(fn, *args)`` calls the importable function ``fn(rank, *args)`` on every rank and returns the
list of results (rank order). Inside a job, ``parallel(cfg, layout)`` is the rank's ``Parallel``.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import socket
import traceback
from typing import Callable

import torch
import torch.distributed as tdist
from torch import Tensor

from neva.config import ModelConfig
from neva.parallel import mesh, runtime
from neva.parallel.plan import Layout, Plan
from neva.parallel.runtime import Parallel

_DISTS: dict = {}   # layout -> this process's Dist: a mesh creates process groups, once per layout


def parallel(cfg: ModelConfig, layout: Layout, specs: dict | None = None, schedule: str = "1f1b",
             zero1: bool = False, vision: str = "tp") -> Parallel:
    """This process's ``Parallel`` for ``layout`` in an initialised world (a pool job or a simulated
    world); the mesh of a layout is built once per process. ``vision``: the vision tower's layout."""
    if layout.world != tdist.get_world_size():
        raise ValueError(f"layout {layout} needs {layout.world} ranks; this world has {tdist.get_world_size()}")
    key = (layout, tdist.get_backend())
    if key not in _DISTS or tdist.get_backend() == "fake":
        _DISTS[key] = mesh.build(layout)[0]
    plan = Plan(layout, towers=Plan.vision_rows(vision))
    return runtime.make(cfg, plan, _DISTS[key], specs, tdist.get_rank(), schedule, zero1)


@contextlib.contextmanager
def local_world(cfg: ModelConfig, layout: Layout, specs: dict | None = None, vision: str = "tp"):
    """A simulated world of ``layout.world`` ranks in this process -> (Parallel, LocalTensorMode)."""
    from torch.distributed._local_tensor import LocalTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if layout.pp > 1:
        raise ValueError("a simulated world has no send/recv: pipelines need the gloo pool")
    if tdist.is_initialized():
        tdist.destroy_process_group()
    tdist.init_process_group("fake", rank=0, world_size=layout.world, store=FakeStore())
    try:
        with LocalTensorMode(layout.world) as mode:
            yield parallel(cfg, layout, specs, vision=vision), mode
    finally:
        tdist.destroy_process_group()


def value_on(t, rank: int):
    """A plain value: ``t`` as rank ``rank`` holds it (a LocalTensor's shard; anything else itself)."""
    lt = getattr(t, "_local_tensors", None)
    return (lt[rank] if lt is not None else t).detach().clone() if isinstance(t, Tensor) else t


# ----------------------------------------------------------------------------- the gloo pool
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, conn) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    while True:
        msg = conn.recv()
        if msg is None:
            break
        fn, args = msg
        try:
            conn.send(("ok", fn(rank, *args)))
        except BaseException:  # noqa: BLE001 - the test process shows it
            conn.send(("error", traceback.format_exc()))
    tdist.destroy_process_group()


class GlooPool:
    """``world`` gloo processes kept alive; ``run(fn, *args)`` runs ``fn(rank, *args)`` on each."""

    def __init__(self, world: int = 4):
        ctx = mp.get_context("spawn")
        self.world, port = world, _free_port()
        self.conns, self.procs = [], []
        for r in range(world):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(r, world, port, child), daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)

    def run(self, fn: Callable, *args, timeout: float = 300.0) -> list:
        for c in self.conns:
            c.send((fn, args))
        out, errors = [], []
        for r, c in enumerate(self.conns):
            if not c.poll(timeout):
                raise TimeoutError(f"gloo pool rank {r} did not answer in {timeout:.0f} s")
            status, val = c.recv()
            (errors.append(f"rank {r}:\n{val}") if status == "error" else out.append(val))
        if errors:
            raise RuntimeError("a pool job failed:\n" + "\n".join(errors))
        return out

    def close(self) -> None:
        for c in self.conns:
            with contextlib.suppress(Exception):
                c.send(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
