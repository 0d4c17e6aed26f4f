"""A run's per-step record: ``metrics.jsonl`` (one JSON row per step) and TensorBoard events."""
from __future__ import annotations

import json
import math
from pathlib import Path


class Metrics:
    """metrics.jsonl + TensorBoard, written by the main rank only. On resume, rows past the resumed
    step (written by the run that died) are dropped so the file reads as one clean run."""

    def __init__(self, run_dir: Path, keep_upto: int, tensorboard: bool, main: bool):
        self.main = main
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not main:
            return
        rows = []
        if keep_upto and self.path.exists():
            rows = [r for r in map(json.loads, self.path.read_text().splitlines()) if r["step"] <= keep_upto]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self._tb_args = (str(run_dir / "tb"), keep_upto + 1 if keep_upto else None) if tensorboard else None

    def _writer(self):
        """The TensorBoard writer, made at the first row: a stage that trains no step (a finished
        run started again) adds no empty events file."""
        if self.tb is None and self._tb_args is not None:
            logdir, purge = self._tb_args
            self._tb_args = None
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(logdir, purge_step=purge)
            except ImportError:                                  # tensorboard is optional at run time
                pass
        return self.tb

    def write(self, row: dict) -> None:
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._writer() is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self.tb.add_scalar(k if "/" in k else f"train/{k}", v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []
