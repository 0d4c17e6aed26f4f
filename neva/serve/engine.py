"""The batching engine: requests queue (bounded); one worker thread takes every waiting request that
can share a batch with the first (same sampling settings; a seeded sampled request runs alone, so its
seed reproduces), runs one ``generate`` call over them, and hands each request its tokens as they come
(``on_token``, for streaming) and its result. Requests that arrive while a batch decodes wait for the
next batch.

The model is behind ``GenerateFn``: ``fn(prompts, pixel_values, sampling, on_token) -> generate's
dict``. ``local(params, cfg, tok)`` is the one-process one. Under torchrun rank 0 runs this engine and
the HTTP server with the plan's ``fn`` (``neva.serve.__main__.plan``: ``neva.generate.on_plan``
broadcasts each batch, and every rank generates with its shard); the other ranks wait in
``neva.generate.follow`` until rank 0 ``release``s them.
"""
from __future__ import annotations

import queue
import random
import threading
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from neva.batch import media_cat, media_map
from neva.generate import Sampling, generate
from neva.serve.prompts import Prompt, RequestError

GenerateFn = Callable[..., dict]


def local(params: dict, cfg, tok) -> GenerateFn:
    """One process: ``neva.generate.generate`` on the whole model."""
    def fn(prompts, pixel_values, sampling: Sampling, on_token=None) -> dict:
        return generate(params, cfg, prompts, pixel_values, sampling, tokenizer=tok, on_token=on_token)
    return fn


@dataclass(eq=False)    # jobs are told apart by identity: equal requests are still two jobs (and a field
class Job:              # by field == would compare their image tensors, which raises)
    prompt: Prompt
    sampling: Sampling               # max_new_tokens: this request's own
    seeded: bool = False             # sampled with a seed the client chose: batch alone
    on_text: Callable[[str], None] | None = None    # streamed text deltas (called from the worker thread)
    on_done: Callable[[], None] | None = None       # called once, from the worker thread, when it ends
    done: threading.Event = field(default_factory=threading.Event)
    result: dict | None = None       # {"text", "tokens", "finish", "completion_tokens"}
    error: BaseException | None = None
    _ids: list[int] = field(default_factory=list)
    _sent: str = ""
    _over: bool = False

    def finish(self) -> None:
        self.done.set()
        if self.on_done is not None:
            self.on_done()

    def key(self):
        s = self.sampling
        if s.temperature == 0:
            return ("greedy", s.stop_strings, s.repetition_penalty)
        return ("sample", s.temperature, s.top_k, s.top_p, s.stop_strings, s.repetition_penalty,
                id(self) if self.seeded else None)


def _held(text: str, stops: tuple[str, ...]) -> str:
    """``text`` without a tail that may still become a stop string or a multi-byte character."""
    text = text.rstrip("\ufffd")
    for st in stops:
        if st in text:
            return text[:text.index(st)]
    cut = max((k for st in stops for k in range(1, len(st)) if text.endswith(st[:k])), default=0)
    return text[:len(text) - cut]


class Engine:
    def __init__(self, fn: GenerateFn, tok, *, eos_id: int | None, dtype: torch.dtype, max_batch: int = 8,
                 max_queue: int = 64):
        self.fn, self.tok, self.eos_id, self.dtype = fn, tok, eos_id, dtype
        self.max_batch = max_batch
        self.q: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.pending: list[Job] = []            # taken from the queue, not yet in a batch (worker only)
        self.batches = 0                        # batches run, and their sizes (for /health and tests)
        self.sizes: list[int] = []
        threading.Thread(target=self._loop, name="neva-serve-engine", daemon=True).start()

    def submit(self, job: Job) -> Job:
        try:
            self.q.put_nowait(job)
        except queue.Full:
            raise RequestError(f"the server is busy: {self.q.maxsize} requests are waiting (--max-queue); retry "
                               f"later", status=429, kind="rate_limit_error", code="queue_full") from None
        return job

    def _take(self) -> list[Job]:
        """The first waiting job and every waiting job that can share its batch (up to max_batch)."""
        if not self.pending:
            self.pending.append(self.q.get())
        while True:                              # everything already waiting
            try:
                self.pending.append(self.q.get_nowait())
            except queue.Empty:
                break
        key = self.pending[0].key()
        batch = [j for j in self.pending if j.key() == key][:self.max_batch]
        self.pending = [j for j in self.pending if j not in batch]
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            try:
                self._run(batch)
            except BaseException as e:  # noqa: BLE001 - a failed batch fails its requests, never the server
                for j in batch:
                    if not j.done.is_set():
                        j.error = e
                        j.finish()

    def _run(self, batch: list[Job]) -> None:
        s = batch[0].sampling
        seed = s.seed if batch[0].seeded else random.randrange(2**31)
        sampling = replace(s, max_new_tokens=max(j.sampling.max_new_tokens for j in batch), seed=seed)
        pix = [j.prompt.pixels for j in batch if j.prompt.pixels is not None]
        pv = media_map(lambda t: t.to(self.dtype), media_cat(pix)) if pix else None
        self.batches += 1
        self.sizes.append(len(batch))

        def on_token(tok, done):
            for b, j in enumerate(batch):
                if j._over:
                    continue
                t = int(tok[b])
                if not (bool(done[b]) and t == self.eos_id):
                    j._ids.append(t)
                j._over = bool(done[b]) or len(j._ids) >= j.sampling.max_new_tokens
                if j.on_text is not None:
                    text = _held(self.tok.decode(j._ids, skip_special_tokens=True), j.sampling.stop_strings)
                    if len(text) > len(j._sent) and text.startswith(j._sent):
                        j.on_text(text[len(j._sent):])
                        j._sent = text

        res = self.fn([j.prompt.ids for j in batch], pv, sampling, on_token)
        for b, j in enumerate(batch):
            toks, finish = res["tokens"][b], res["finish"][b]
            if len(toks) > j.sampling.max_new_tokens:
                toks, finish = toks[:j.sampling.max_new_tokens], "length"
            text = self.tok.decode(toks, skip_special_tokens=True)
            for st in j.sampling.stop_strings:       # cut here too: the tokens may have been cut to max_tokens
                if st in text:
                    text, finish = text[:text.index(st)], "stop"
            if j.on_text is not None and len(text) > len(j._sent) and text.startswith(j._sent):
                j.on_text(text[len(j._sent):])
            j.result = {"text": text, "tokens": toks, "finish": "length" if finish == "length" else "stop",
                        "completion_tokens": len(toks) + (finish == "eos")}
            j.finish()
