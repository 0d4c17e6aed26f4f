"""Command-line entry points: an error a user can fix reaches them as one line naming the file,
sample or key and what to do, printed once (by rank 0 under torchrun), not as a traceback.

    if __name__ == "__main__":
        cli.run(main, sys.argv[1:])          # main(argv) of a script; exits 1 on a user's error

``--debug`` on the command line (or ``NEVA_DEBUG=1``) lets the traceback through, on every rank.
What counts as a user's error: a bad config value or override, a bad sample or data file, a plan
that does not fit, an unreadable or mismatched checkpoint or HF folder, losses that went non-finite
(``USER_ERRORS``); anything else is a bug and keeps its traceback. Ctrl-C prints one line too.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

from neva.train.checkpoint import CheckpointError
from neva.train.step import NonFiniteLoss

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, CheckpointError, NonFiniteLoss)


def debug(argv: list[str]) -> tuple[bool, list[str]]:
    """(whether tracebacks are wanted, ``argv`` without ``--debug``)."""
    on = "--debug" in argv or os.environ.get("NEVA_DEBUG", "0") not in ("", "0")
    return on, [a for a in argv if a != "--debug"]


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def report(e: BaseException) -> None:
    """Print ``e`` as the one line a user sees (on rank 0 only)."""
    if rank() == 0:
        print(f"error: {e}", file=sys.stderr, flush=True)


def run(main: Callable[[list[str]], object], argv: list[str]) -> None:
    """Run ``main(argv)``; a user's error (or Ctrl-C) exits with one line instead of a traceback."""
    tracebacks, argv = debug(argv)
    try:
        main(argv)
    except USER_ERRORS as e:
        if tracebacks:
            raise
        report(e)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        if tracebacks:
            raise
        if rank() == 0:
            print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
