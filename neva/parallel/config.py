"""The ``parallel`` section of an experiment: the layout a launch asks for (dp is what the world
size leaves), checked against the world before anything starts."""
from __future__ import annotations

from dataclasses import dataclass

from neva.parallel.pipeline import SCHEDULES
from neva.parallel.plan import TOWER_LAYOUTS


@dataclass(frozen=True)
class ParallelConfig:
    """The layout of a torchrun launch: tp x pp x ep x cp must divide the world size; dp is what is left."""

    tp: int = 1                     # tensor parallel: heads, MLP inner dim, experts' inner dim, vocabulary
    pp: int = 1                     # pipeline stages (contiguous LLM layers; micro-batches = train.grad_accum)
    ep: int = 1                     # expert parallel: experts split over ranks that read different samples
    sp: bool = False                # sequence parallel with tp: norms and residuals split along the sequence
    pp_schedule: str = "1f1b"       # gpipe | 1f1b
    zero1: bool = False             # optimizer state (moments, fp32 masters) split over dp ranks (ZeRO-1)
    cp: int = 1                     # context parallel: the LLM's sequence over cp ranks (chunks i and 2cp-1-i)
    vision: str = "tp"              # the vision tower (encoder + projector): tp | replicate | frames

    def validate(self, world_size: int = 1, model=None) -> "ParallelConfig":
        """Raise naming every bad value; a layout that does not divide the world lists the layouts that
        fit it (and ``model``, a ModelConfig, when given)."""
        errs = []
        if self.pp_schedule not in SCHEDULES:
            errs.append(f"parallel.pp_schedule={self.pp_schedule!r}: use gpipe or 1f1b")
        if self.vision not in TOWER_LAYOUTS:
            errs.append(f"parallel.vision={self.vision!r}: use one of {TOWER_LAYOUTS}")
        m = self.tp * self.pp * self.ep * self.cp
        if min(self.tp, self.pp, self.ep, self.cp) < 1:
            errs.append("parallel.tp, parallel.pp, parallel.ep and parallel.cp must be >= 1")
        elif world_size % m:
            errs.append(f"parallel.tp*pp*ep*cp = {m} does not divide the world size {world_size}"
                        + self._fits(world_size, model))
        if self.sp and self.tp == 1:
            errs.append("parallel.sp=true needs parallel.tp > 1 (the sequence is split over tp)")
        if errs:
            raise ValueError("\n  ".join(errs))
        return self

    def _fits(self, world: int, model) -> str:
        from neva.parallel.plan import Layout, Plan
        if model is None:
            sizes = (1, 2, 4, 8)
            fits = [str(Layout.fit(world, tp, pp, ep, cp=self.cp)) for tp in sizes for pp in sizes for ep in sizes
                    if world % (tp * pp * ep * self.cp) == 0]
            return f"\n  layouts that fit {world} processes: " + ", ".join(fits[:12])
        from neva.model import specs
        try:
            return Plan(Layout(sp=self.sp, cp=self.cp)).suggest(model, specs(model), world)
        except ValueError:                 # the model itself is invalid: its own check says why
            return ""
