"""Progress that reads well with and without a terminal.

On a terminal (stdout is a TTY) it is a tqdm bar. Without one (CI, Slurm, docker, ``nohup``: stdout
is a file or a pipe) a bar is a stream of carriage returns nobody sees, so it prints a plain line
instead, as torchtitan and NeMo log: every ``every`` counts and/or every ``seconds`` seconds, and once
at the end, with the fields the caller passes, the rate and the time left::

    bar = Progress(600, "train", unit="step", initial=start, every=10)
    for ...:
        bar.update(1, loss=0.512, **{"tokens/s": 3120})
    bar.close()
    # train: step 10/600 | loss 0.512 | tokens/s 3120 | 1.33 steps/s | ETA 7m23s

``on=False`` shows nothing. ``tty`` forces one mode (default: ``sys.stdout.isatty()``).
"""
from __future__ import annotations

import sys
import time


def interactive() -> bool:
    """Whether stdout is a terminal (a bar redraws there; anywhere else lines are appended)."""
    return bool(getattr(sys.stdout, "isatty", lambda: False)())


def duration(seconds: float) -> str:
    """``7s``, ``7m23s``, ``2h05m``: short enough to sit in a log line."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _number(v) -> str:
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.4g}"
    return str(v)


class Progress:
    """Counts ``total`` units of work (see the module docstring)."""

    def __init__(self, total: int, desc: str, *, unit: str = "item", on: bool = True, initial: int = 0,
                 every: int = 0, seconds: float = 30.0, leave: bool = True, tty: bool | None = None):
        self.total, self.desc, self.unit, self.on = total, desc, unit, on
        self.n = self._start = self._shown = initial
        self.every, self.seconds = every, seconds
        self.fields: dict = {}
        self._t0 = self._t_shown = time.perf_counter()
        self._bar = None
        if on and (interactive() if tty is None else tty):
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                             mininterval=1.0, leave=leave)

    def update(self, n: int = 1, **fields) -> None:
        """``n`` more units done; ``fields`` (name -> value) describe the latest one."""
        self.n += n
        if fields:
            self.fields = fields
        if self._bar is not None:
            self._bar.update(n)
            if fields:
                self._bar.set_postfix({k: _number(v) for k, v in fields.items()}, refresh=False)
            return
        if not self.on:
            return
        now = time.perf_counter()
        by_count = self.every > 0 and self.n // self.every > self._shown // self.every
        by_time = self.seconds > 0 and now - self._t_shown >= self.seconds
        if by_count or by_time:
            self._print(now)

    def write(self, text: str) -> None:
        """A message between updates (above the bar on a terminal)."""
        if not self.on:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.on and self.n != self._shown:
            self._print(time.perf_counter(), final=True)

    def line(self, now: float, final: bool = False) -> str:
        """The plain line: count, fields, rate, then the time left (or taken, at the end)."""
        parts = [f"{self.desc}: {self.unit} {self.n}/{self.total}"]
        parts += [f"{k} {_number(v)}" for k, v in self.fields.items()]
        done, spent = self.n - self._start, now - self._t0
        if done > 0 and spent > 0:
            rate = done / spent
            parts.append(f"{_number(rate)} {self.unit}s/s" if rate >= 1 else f"{1 / rate:.3g} s/{self.unit}")
            if final or self.n >= self.total:
                parts.append(f"took {duration(spent)}")
            else:
                parts.append(f"ETA {duration((self.total - self.n) / rate)}")
        return " | ".join(parts)

    def _print(self, now: float, final: bool = False) -> None:
        print(self.line(now, final), flush=True)
        self._shown, self._t_shown = self.n, now
