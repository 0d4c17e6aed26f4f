"""A deterministic, resumable, data-parallel sampler whose whole state is three integers.

Units (samples, or packed rows) are visited in ``permutation(seed, epoch)`` order. Step ``s`` of an
epoch takes the global batch ``perm[s * B * W : (s + 1) * B * W]``; rank ``r`` gets the ``r``-th
slice of ``B``. The tail that does not fill a global batch is left out of that epoch (a different
tail each epoch), so every rank takes the same number of steps. The state ``(epoch, step, seed)``
is the same on every rank: a checkpoint saves one copy, and a resumed run (even with another
world size, if ``B * W`` is unchanged) continues with exactly the batches that were next.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class SamplerState:
    epoch: int = 0
    step: int = 0          # global batches already consumed in this epoch
    seed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


class ResumableSampler:
    def __init__(self, n_units: int, batch_size: int, *, rank: int = 0, world: int = 1, seed: int = 0,
                 shuffle: bool = True):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside a world of {world}")
        self.n, self.B, self.rank, self.world, self.seed, self.shuffle = n_units, batch_size, rank, world, seed, shuffle
        self.steps_per_epoch = n_units // (batch_size * world)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{n_units} samples (or packed rows) cannot fill one global batch of "
                             f"{batch_size} x {world} ranks: lower data.batch_size or add data")
        self._perm_epoch, self._perm = None, None

    def order(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = (np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle
                          else np.arange(self.n))
            self._perm_epoch = epoch
        return self._perm

    def batch(self, epoch: int, step: int) -> list[int]:
        """This rank's unit indices for (epoch, step)."""
        g = self.B * self.world
        start = step * g + self.rank * self.B
        return self.order(epoch)[start:start + self.B].tolist()

    def advance(self, state: SamplerState, steps: int = 1) -> SamplerState:
        s = state.step + steps
        return SamplerState(state.epoch + s // self.steps_per_epoch, s % self.steps_per_epoch, state.seed)

    def iterate(self, state: SamplerState):
        """Yield this rank's batches forever, starting at ``state`` (which is not modified)."""
        if state.seed != self.seed:
            raise ValueError(f"sampler state has seed {state.seed} but the sampler was built with seed {self.seed}")
        e, s = state.epoch, state.step
        while True:
            yield self.batch(e, s)
            s += 1
            if s == self.steps_per_epoch:
                e, s = e + 1, 0


class _Steps:
    """An infinite batch_sampler for torch's DataLoader, starting at a state."""

    def __init__(self, sampler: ResumableSampler, state: SamplerState):
        self.sampler, self.state = sampler, state

    def __iter__(self):
        return self.sampler.iterate(self.state)
