"""The ``parallel`` section of an experiment: the layout a launch asks for (dp is what the world
size leaves), checked against the world before anything starts."""
from __future__ import annotations

from dataclasses import dataclass

from neva.parallel.pipeline import SCHEDULES
from neva.parallel.plan import TOWER_LAYOUTS


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    sp: bool = False
    pp_schedule: str = "1f1b"       # gpipe | 1f1b
    zero1: bool = False             # optimizer state (moments, fp32 masters) split over dp ranks (ZeRO-1)
    cp: int = 1                     # context parallel: the LLM's sequence over cp ranks (chunks i and 2cp-1-i)
    vision: str = "tp"              # the vision tower (encoder + projector): tp | replicate | frames

    def validate(self, world_size: int = 1) -> "ParallelConfig":
        errs = []
        if self.pp_schedule not in SCHEDULES:
            errs.append(f"parallel.pp_schedule={self.pp_schedule!r}: use gpipe or 1f1b")
        if self.vision not in TOWER_LAYOUTS:
            errs.append(f"parallel.vision={self.vision!r}: use one of {TOWER_LAYOUTS}")
        m = self.tp * self.pp * self.ep * self.cp
        if min(self.tp, self.pp, self.ep, self.cp) < 1:
            errs.append("parallel.tp, parallel.pp, parallel.ep and parallel.cp must be >= 1")
        elif world_size % m:
            errs.append(f"parallel.tp*pp*ep*cp = {m} does not divide the world size {world_size}")
        if self.sp and self.tp == 1:
            errs.append("parallel.sp=true needs parallel.tp > 1 (the sequence is split over tp)")
        if errs:
            raise ValueError("\n  ".join(errs))
        return self
