"""What ends a run early, agreed by every rank: stop signals (preemption) and errors one rank hits.

    with StopSignals(multi=world() > 1) as signals:     # while a stage trains
        ...
        sig, err = agree(signals.got, err)              # at each step boundary, on every rank

SIGTERM and SIGUSR1 (what Slurm and Kubernetes send before they preempt a job; ``kill``), and under
torchrun SIGINT (its launcher forwards Ctrl-C to every rank), only note that the run must stop;
``agree`` then tells every rank, at the same step, whether any rank got a signal or holds an error
(one small all-reduce a step), and hands every rank the first failing rank's error, so all save the
same step together and end with the same message. ``Stopped`` is how a run ends after a signal.
"""
from __future__ import annotations

import pickle
import signal
import threading

import torch
import torch.distributed as tdist


def world() -> int:
    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


class Stopped(SystemExit):
    """A stop signal ended the stage at ``step``, after its state was saved: a SystemExit with the
    shell's code for the signal (128 + its number), so no traceback prints, nothing after training
    runs as if it had finished, and ``train && export`` stops there."""

    def __init__(self, signum: int, step: int):
        super().__init__(128 + signum)
        self.signum, self.step = signum, step


class StopSignals:
    """Note a stop signal in ``got`` instead of dying, while installed (the main thread's handlers;
    the previous ones come back on exit). One process keeps Ctrl-C as KeyboardInterrupt."""

    def __init__(self, multi: bool):
        self.names = ("SIGTERM", "SIGUSR1") + (("SIGINT",) if multi else ())
        self.got, self.old = 0, {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():       # handlers live in the main thread
            for name in self.names:
                if hasattr(signal, name):
                    sig = getattr(signal, name)
                    self.old[sig] = signal.signal(sig, self._note)
        return self

    def _note(self, signum, frame) -> None:
        self.got = self.got or signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


def agree(sig: int, err: BaseException | None) -> tuple[int, BaseException | None]:
    """(a signal any rank got, this rank's error or else the first failing rank's): the same on
    every rank. Every rank must call it at the same point."""
    if world() == 1:
        return sig, err
    dev = torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else "cpu"
    flags = torch.tensor([sig, int(err is not None)], dtype=torch.int64, device=dev)
    tdist.all_reduce(flags, op=tdist.ReduceOp.MAX)
    return int(flags[0]), (_first_error(err) if int(flags[1]) else None)


def _first_error(mine: BaseException | None) -> BaseException:
    if mine is None:
        blob = None
    else:
        try:
            blob = (pickle.dumps(mine), str(mine))
        except Exception:  # noqa: BLE001 - an unpicklable exception travels as its message
            blob = (pickle.dumps(RuntimeError(str(mine))), str(mine))
    every = [None] * world()
    tdist.all_gather_object(every, blob)
    if mine is not None:
        return mine
    data, msg = next(b for b in every if b is not None)
    try:
        return pickle.loads(data)
    except Exception:  # noqa: BLE001
        return RuntimeError(msg)


def gather_ids(ids: list) -> list:
    """Every rank's sample ids, in rank order, each once (tensor and pipeline peers read the same)."""
    if world() == 1:
        return list(ids)
    every = [None] * world()
    tdist.all_gather_object(every, list(ids))
    return list(dict.fromkeys(i for rank_ids in every for i in rank_ids))
