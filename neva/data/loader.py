"""The training loader: dataset + (packing) + resumable DP sampler + worker processes + collate.

    loader = build_loader(data_cfg, model_cfg, rank=dp_rank, world=dp_size)
    for batch in loader:                     # infinite; epochs roll over
        ...                                  # batch: the dict neva.loss takes
        ckpt["data"] = loader.state_dict()   # {"epoch", "step", "seed"}: batches already yielded
    loader.load_state_dict(ckpt["data"])     # the next batch is the one that would have come next

``loader.stats`` counts samples, skipped samples and truncations; ``loader.skipped`` holds the
message of each sample skipped when loaded (logged once per sample; past ``data.max_skip_fraction``
the loader raises, naming the first). Under ``on_bad_sample=error`` a sample that fails in a worker
is raised here as ``BadSample`` with its message alone. ``loader.batch_ids``: the sample ids of the
batch just yielded. Resuming with another global batch (``data.batch_size`` x data ranks) continues
at exactly the next sample when the samples already seen in the epoch fill whole new batches, and
is an error otherwise.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from functools import partial

import numpy as np
import torch

from neva.data.collate import collate
from neva.data.config import DataConfig
from neva.data.dataset import LOAD_ERRORS, NevaDataset, Sample, named
from neva.data.images import empty
from neva.data.tokenize import BadSample
from neva.data.packing import batched_padding_fraction, pack, padding_fraction
from neva.data.sampler import ResumableSampler, SamplerState, _Steps

# the tokenizer runs in forked workers; its Rust thread pool must not be live at fork
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
log = logging.getLogger("neva.data")


class _Rows(torch.utils.data.Dataset):
    """Unit u -> the list of Samples of row u (one sample unpacked, several packed)."""

    def __init__(self, ds: NevaDataset, rows: list[list[int]]):
        self.ds, self.rows = ds, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, u: int) -> list:
        return [self._sample(i) for i in self.rows[u]]

    def _sample(self, i: int) -> Sample:
        try:
            return self.ds[i]
        except LOAD_ERRORS as e:        # on_bad_sample=error: the message goes to the main process
            return Sample(self.ds.records[i].id, error=named(self.ds.records[i], e))


def make_rows(ds: NevaDataset, cfg: DataConfig) -> list[list[int]]:
    if not cfg.packing:
        return [[i] for i in range(len(ds))]
    return pack(ds.lengths, cfg.max_seq_len, cfg.packing_algorithm, cfg.seed)


class Loader:
    """Batches for one data-parallel rank (see the module docstring)."""

    def __init__(self, ds: NevaDataset, cfg: DataConfig, *, rank: int = 0, world: int = 1):
        self.ds, self.cfg, self.rank, self.world = ds, cfg, rank, world
        self.rows = make_rows(ds, cfg)
        self.sampler = ResumableSampler(len(self.rows), cfg.batch_size, rank=rank, world=world, seed=cfg.seed,
                                        shuffle=cfg.shuffle)
        self.state = SamplerState(seed=cfg.seed)
        self.stats: Counter = Counter()
        self.skipped: dict[str, None] = {}        # messages of samples skipped when loaded, in order, once each
        self.batch_ids: list[str] = []
        pad_id = ds.tok.pad_token_id if ds.tok.pad_token_id is not None else 0
        pad_to = cfg.max_seq_len if (cfg.packing or cfg.pad_to_max_seq_len) else None
        self.collate = partial(collate, packed=cfg.packing, pad_to=pad_to, pad_id=pad_id, empty=empty(ds.spec))
        if cfg.packing:
            log.info("packing %d samples into %d rows of %d (%s): %.1f%% padding", len(ds), len(self.rows),
                     cfg.max_seq_len, cfg.packing_algorithm, 100 * padding_fraction(ds.lengths, self.rows,
                                                                                 cfg.max_seq_len))

    @property
    def epoch(self) -> int:
        return self.state.epoch

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.world

    def state_dict(self) -> dict:
        return {**self.state.as_dict(), "global_batch": self.global_batch}

    def load_state_dict(self, d: dict) -> None:
        st = SamplerState(int(d["epoch"]), int(d["step"]), int(d["seed"]))
        if st.seed != self.cfg.seed:
            raise ValueError(f"the checkpoint's data seed is {st.seed} but data.seed={self.cfg.seed}")
        was = int(d.get("global_batch", self.global_batch))
        if was != self.global_batch:          # the same next sample, if the seen ones fill whole new batches
            seen = st.step * was
            if seen % self.global_batch:
                raise ValueError(
                    f"the checkpoint stopped {seen} samples into epoch {st.epoch} with {was} rows per step "
                    f"(data.batch_size x data-parallel ranks); this run takes {self.global_batch}, which does not "
                    f"divide {seen}, so it could not continue at the next sample: resume with data.batch_size="
                    f"{was // self.world} or one whose rows per step divide {seen}")
            st = SamplerState(st.epoch, seen // self.global_batch, st.seed)
            if st.step >= self.sampler.steps_per_epoch:     # the epoch's rest is less than a batch: its tail
                st = SamplerState(st.epoch + 1, 0, st.seed)
        if not 0 <= st.step < self.sampler.steps_per_epoch:
            raise ValueError(f"data state step={st.step} is outside an epoch of {self.sampler.steps_per_epoch} "
                             f"steps: the dataset changed since the checkpoint")
        self.state = st

    def _dataloader(self):
        w = self.cfg.num_workers
        return torch.utils.data.DataLoader(_Rows(self.ds, self.rows), batch_sampler=_Steps(self.sampler, self.state),
                                           collate_fn=self.collate, num_workers=w,
                                           prefetch_factor=2 if w else None, persistent_workers=False)

    def __iter__(self):
        for batch in self._dataloader():
            st = batch.pop("_stats")
            if st["errors"]:
                raise BadSample(st["errors"][0])
            self.state = self.sampler.advance(self.state)
            self.stats.update(batches=1, samples=st["samples"], truncated=st["truncated"], skipped=len(st["skipped"]))
            for msg in st["skipped"]:
                if msg not in self.skipped:
                    self.skipped[msg] = None
                    log.warning("skipped %s", msg)
            if st["skipped"]:
                self.ds.check_skips(list(self.skipped))
            if "input_ids" in batch:       # a batch whose samples were all skipped yields nothing
                self.batch_ids = st["ids"]
                yield batch

    def padding_report(self) -> dict:
        """Padding fraction of one epoch of this configuration, and of the other (packed/unpacked)."""
        return padding_report(self.ds.lengths, self.cfg, self.world)


def padding_report(lengths: np.ndarray, cfg: DataConfig, world: int = 1) -> dict:
    """Padding fractions over one epoch: unpacked batches padded to their longest sample
    (``unpacked_longest``) or to max_seq_len (``unpacked_fixed``), and packed rows (``packed``)."""
    n = len(lengths)
    s = ResumableSampler(n, cfg.batch_size, world=world, seed=cfg.seed, shuffle=cfg.shuffle)
    batches = [s.batch(0, k) for k in range(s.steps_per_epoch)]
    rows = pack(lengths, cfg.max_seq_len, cfg.packing_algorithm, cfg.seed)
    return {"unpacked_longest": batched_padding_fraction(lengths, batches),
            "unpacked_fixed": batched_padding_fraction(lengths, batches, cfg.max_seq_len),
            "packed": padding_fraction(lengths, rows, cfg.max_seq_len), "rows": len(rows), "samples": n}


def build_loader(cfg: DataConfig, model_cfg, *, rank: int = 0, world: int = 1, data_path=None, tok=None,
                 progress: bool = False) -> Loader:
    """The training loader for ``cfg.data_path`` (or ``data_path``) on data-parallel rank ``rank``."""
    ds = NevaDataset(cfg, model_cfg, data_path, tok=tok, progress=progress)
    return Loader(ds, cfg, rank=rank, world=world)


def one_pass(ds: NevaDataset, cfg: DataConfig, *, rank: int = 0, world: int = 1, batch_size: int | None = None):
    """Every sample once, in order, rank r taking samples r, r + world, ...; the last batch may be
    short. For held-out loss; batches as the training loader makes them (unpacked)."""
    mine = list(range(rank, len(ds), world))
    B = batch_size or cfg.batch_size
    steps = [[[i] for i in mine[k:k + B]] for k in range(0, len(mine), B)]
    pad_to = cfg.max_seq_len if cfg.pad_to_max_seq_len else None
    pad_id = ds.tok.pad_token_id if ds.tok.pad_token_id is not None else 0
    for rows in steps:
        batch = collate([[ds[i] for i in row] for row in rows], packed=False, pad_to=pad_to, pad_id=pad_id,
                        empty=empty(ds.spec))
        batch.pop("_stats")
        if "input_ids" in batch:
            yield batch
