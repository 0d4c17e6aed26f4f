"""Generation with a KV cache: greedy, temperature, top-k, top-p, repetition penalty, stop strings.

Prompts of different lengths are left-padded into one batch; their images and video frames (already
expanded to ``tokens_per_image`` image tokens each, pixel_values in order of appearance) go through
the model's own embed-and-splice path in the prefill. Each layer's cache is preallocated as
``{"k", "v": [B, KV, T_prompt + max_new_tokens, hd]}`` and written in place by the attention, so a
decode step costs one token per row: the rotary tables of every slot are built once, a step's mask
is a view of the padding mask (built only under a sliding window), the head runs on the last
position only, MoE layers skip their balance statistics and run only the experts that got rows. Logits processors run in transformers' order (repetition
penalty, temperature, top-k, top-p), so greedy decoding matches ``generate(do_sample=False)``.

Under a parallel plan (``dist``: tp, ep, dp; not pp) every rank runs the same batch on its shard of
the params: the cache holds the rank's kv heads, MoE layers dispatch each step's tokens to the ranks
that own their experts, the vocab-sharded logits are gathered whole, and rank 0's choice of each
token is every rank's. Sequence parallelism is off (a decode step is one token per row). A server
calls ``on_plan`` on every rank: rank 0's request is broadcast, every rank generates, rank 0 gets
the answer; ``follow`` is the loop of the other ranks, ``release`` ends it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
import torch.distributed as tdist
from torch import Tensor

from neva import comm, llm, model
from neva.batch import Media
from neva.comm import LOCAL, Dist
from neva.config import ModelConfig
from neva.layers.attention import make_mask


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 32
    temperature: float = 0.0           # 0 = greedy
    top_k: int = 0                     # 0 = off
    top_p: float = 1.0                 # 1 = off
    repetition_penalty: float = 1.0    # 1 = off (CTRL: divide positive logits, multiply negative ones)
    stop_strings: tuple[str, ...] = ()  # needs a tokenizer; the text is cut before the stop string
    stop_at_eos: bool = True
    seed: int = 0

    def validate(self) -> "Sampling":
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise ValueError("need temperature >= 0, top_k >= 0, 0 < top_p <= 1, repetition_penalty > 0")
        return self


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """-> ids int[B, T], attention_mask int[B, T], prompts right-aligned."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, each with at least one token")
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    am = torch.zeros((len(prompts), T), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.as_tensor(p)
        am[b, T - len(p):] = 1
    return ids, am


def init_cache(cfg: ModelConfig, B: int, S: int, dtype: torch.dtype, dist: Dist = LOCAL) -> dict:
    """{layer: {"k", "v": zeros [B, KV/tp, S, hd]}} for every layer: this rank's kv heads."""
    kv = cfg.llm.n_kv_heads // dist.part("llm").tp_size
    shape = (B, kv, S, cfg.llm.hd)
    return {i: {"k": torch.zeros(shape, dtype=dtype), "v": torch.zeros(shape, dtype=dtype)}
            for i in range(cfg.llm.n_layers)}


def process_logits(logits_bv: Tensor, seen_bt: Tensor, s: Sampling) -> Tensor:
    """Repetition penalty over ``seen`` tokens, then temperature, top-k and top-p (-inf outside)."""
    x = logits_bv.float()
    if s.repetition_penalty != 1.0:
        got = x.gather(1, seen_bt)
        x = x.scatter(1, seen_bt, torch.where(got < 0, got * s.repetition_penalty, got / s.repetition_penalty))
    if s.temperature == 0:
        return x
    x = x / s.temperature
    if s.top_k:
        kth = x.topk(min(s.top_k, x.shape[-1]), dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if s.top_p < 1.0:
        srt, idx = x.sort(dim=-1, descending=False)
        cum = srt.softmax(-1).cumsum(-1)
        drop = cum <= 1 - s.top_p
        drop[:, -1] = False                                   # always keep the most likely token
        x = x.masked_fill(drop.scatter(1, idx, drop), float("-inf"))
    return x


def _next(logits_bv: Tensor, seen_bt: Tensor, s: Sampling, gen: torch.Generator) -> Tensor:
    x = process_logits(logits_bv, seen_bt, s)
    if s.temperature == 0:
        return x.argmax(-1)
    return torch.multinomial(x.softmax(-1), 1, generator=gen)[:, 0]


def _forward(params: dict, cfg: ModelConfig, x_btd: Tensor, ctx: llm.Context, dist: Dist) -> Tensor:
    """The trunk on embeddings ``x`` in ``ctx`` -> logits at the last position [B, V], whole on every
    tp rank (the head runs on that position only)."""
    lc, d = cfg.llm, dist.part("llm")
    h, _, _ = llm.layers(params["llm"], x_btd, ctx, lc, d, range(lc.n_layers), moe_dispatch=cfg.moe_dispatch)
    return comm.all_gather_nograd(llm.head(params["llm"], h[:, -1:], lc, d)[:, 0].float(), d.tp, dim=-1)


def _step_context(cfg: ModelConfig, rope: tuple[Tensor, Tensor], kv_valid_bs: Tensor, slot: int,
                  cache: dict) -> llm.Context:
    """The Context of a decode step whose token goes to cache ``slot``: views into the rotary tables
    built once for every slot, and a mask over slots 0..slot that is the padding's view (attention
    reads no later slot, so causality holds by itself); a sliding window needs a mask built."""
    B, w = kv_valid_bs.shape[0], cfg.llm.sliding_window
    if w is None or slot < w:
        mask = kv_valid_bs[:, None, None, :slot + 1]
    else:
        mask = make_mask(torch.full((B, 1), slot), torch.arange(slot + 1).expand(B, -1), window=w,
                         k_valid=kv_valid_bs[:, :slot + 1])
    return llm.Context(rope=(rope[0][:, slot:slot + 1], rope[1][:, slot:slot + 1]), mask=mask, cache=cache,
                       cache_pos=slot, stats=False)


def _world(dist: Dist):
    """The group every rank of a plan is in (None for one process)."""
    return tdist.group.WORLD if any(g is not None for g in (dist.tp, dist.ep, dist.dp, dist.data)) else None


@torch.no_grad()
def generate(params: dict, cfg: ModelConfig, prompts: list[list[int]], pixel_values: Media | None = None,
             sampling: Sampling = Sampling(), tokenizer: Any = None, dist: Dist = LOCAL,
             video_frames: Tensor | None = None,
             on_token: Callable[[Tensor, Tensor], Any] | None = None) -> dict:
    """Continue each prompt (token ids, image tokens expanded; ``pixel_values`` float[N, 3, H, W] for
    all images and video frames of all prompts in order, per tower for kind=fused; ``video_frames``
    bool[N] marks the frames, which matters when the projector pools them). -> {"tokens": [[new ids] per prompt],
    "text": [decoded new text] (with a tokenizer, cut at a stop string), "finish": ["eos" | "stop" |
    "length"]}. Stop strings need ``tokenizer`` (anything with ``decode(ids)``). ``video_frames``
    bool[N] marks which of ``pixel_values`` are video frames (it matters when the projector pools them).

    ``on_token(tok int[B], done bool[B])`` is called after every step with the step's tokens (pad for
    rows that had finished) and which rows are done now (a row's EOS arrives with its row done): for
    streaming, and for timing the first token apart from the rest. Under a plan, every rank calls
    ``generate`` at once with the same arguments and ``params`` its shard."""
    s = sampling.validate()
    if s.stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the generated text")
    if dist.pp is not None or dist.cp is not None:
        raise NotImplementedError("generation under pipeline or context parallelism is not wired: generate with "
                                  "parallel.pp=1 and parallel.cp=1 (tp, ep and dp work), or gather the model "
                                  "(Parallel.gather) first")
    dist = replace(dist, sp=False)          # one token per row per step: no sequence to split
    world = _world(dist)
    lc = cfg.llm
    pad = lc.generation_pad_id
    ids, am = left_pad(prompts, pad)
    B, T = ids.shape
    S = T + s.max_new_tokens
    if S > lc.max_position:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({s.max_new_tokens}) exceed model.llm.max_position={lc.max_position}")
    dtype = params["llm"]["embed"]["w"].dtype
    cache = init_cache(cfg, B, S, dtype, dist)
    kv_valid = torch.cat([am.bool(), torch.ones(B, s.max_new_tokens, dtype=torch.bool)], 1)   # [B, S]
    nb = model.normalize_batch(cfg, {"input_ids": ids, "attention_mask": am, "pixel_values": pixel_values,
                                     "video_frames": video_frames})
    pos = nb["position_ids"]
    rope = llm.rope_tables(lc, torch.cat([pos, pos[:, -1:] + torch.arange(1, s.max_new_tokens + 1)], 1), dtype)
    ctx = llm.context(lc, pos, dtype, k_valid_bs=am.bool(), cache=cache)
    logits = _forward(params, cfg, model.embed_inputs(params, cfg, nb, dist), replace(ctx, stats=False), dist)
    gen = torch.Generator().manual_seed(s.seed)
    out = torch.full((B, s.max_new_tokens), pad, dtype=torch.long)
    seen = torch.cat([torch.where(am.bool(), ids, ids[:, -1:]), out], 1)   # padding is never penalised
    done = torch.zeros(B, dtype=torch.bool)
    finish, lens = ["length"] * B, [s.max_new_tokens] * B
    for i in range(s.max_new_tokens):
        logits[:, cfg.image_token_id] = float("-inf")        # a placeholder is never a real answer
        # ep ranks compute the same rows inside differently shaped expert matmuls, so their logits
        # may differ in the last bit: rank 0's token is everyone's, and every rank stops together
        tok = comm.broadcast_(_next(logits, seen[:, :T + i], s, gen), world)
        tok = torch.where(done, pad, tok)
        out[:, i], seen[:, T + i] = tok, tok
        for b, t in enumerate(tok.tolist()):
            if done[b]:
                continue
            if s.stop_at_eos and t == lc.eos_id:
                done[b], finish[b], lens[b] = True, "eos", i          # eos is not part of the answer
            elif s.stop_strings and any(st in tokenizer.decode(out[b, :i + 1].tolist()) for st in s.stop_strings):
                done[b], finish[b], lens[b] = True, "stop", i + 1
        if on_token is not None:
            on_token(tok, done.clone())
        if bool(done.all()) or i + 1 == s.max_new_tokens:
            break
        x = llm.embed(params["llm"], tok[:, None], dist.part("llm"))
        logits = _forward(params, cfg, x, _step_context(cfg, rope, kv_valid, T + i, cache), dist)
    tokens = [out[b, :lens[b]].tolist() for b in range(B)]
    text = None
    if tokenizer is not None:
        text = []
        for t in tokens:
            txt = tokenizer.decode(t)
            for st in s.stop_strings:
                if st in txt:
                    txt = txt[:txt.index(st)]
            text.append(txt)
    return {"tokens": tokens, "text": text, "finish": finish}


# ------------------------------------------------------------------------- every rank of a plan
_STOP = "stop"


def _share(par, msg):
    """Rank 0's ``msg`` (any picklable object) on every rank of ``par``."""
    box = [msg if par.main else None]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def on_plan(par, params: dict, prompts: list[list[int]] | None = None, pixel_values: Media | None = None,
            sampling: Sampling = Sampling(), tokenizer: Any = None,
            on_token: Callable[[Tensor, Tensor], Any] | None = None, video_frames: Tensor | None = None) -> dict | None:
    """``generate`` under the plan of ``par`` (a ``neva.parallel.runtime.Parallel``), called on every
    rank at once with ``params`` its shard (``par.shard(full)`` or ``par.localize(hf.load(...,
    shard=par.hf_slices))``): rank 0's prompts, pixel_values and sampling are broadcast (the other
    ranks' are ignored), every rank generates, and rank 0 gets generate's dict (None elsewhere). One
    process: ``generate``. ``tokenizer``: each rank's own (stop strings are checked on every rank).
    ``on_token``: rank 0's streaming callback (``generate``'s)."""
    if par.single:
        return generate(params, par.cfg, prompts, pixel_values, sampling, tokenizer, on_token=on_token,
                        video_frames=video_frames)
    msg = _share(par, ("generate", prompts, pixel_values, sampling, video_frames))
    if msg == _STOP:
        raise RuntimeError("on_plan: rank 0 sent release() while this rank asked to generate; ranks > 0 "
                           "wait for rank 0's requests with follow()")
    return _answer(par, params, msg, tokenizer, on_token if par.main else None)


def _answer(par, params: dict, msg: tuple, tokenizer: Any, on_token=None) -> dict | None:
    _, prompts, pixel_values, sampling, video_frames = msg
    out = generate(params, par.cfg, prompts, pixel_values, sampling, tokenizer, par.dist, video_frames, on_token)
    return out if par.main else None


def follow(par, params: dict, tokenizer: Any = None) -> int:
    """The loop of every rank but 0 while rank 0 serves: take part in each ``on_plan`` call rank 0
    makes, until rank 0 calls ``release``. -> the number of requests served."""
    if par.main:
        raise RuntimeError("follow() is for ranks > 0; rank 0 calls on_plan() per request and release() at the end")
    n = 0
    while (msg := _share(par, None)) != _STOP:
        _answer(par, params, msg, tokenizer)
        n += 1
    return n


def release(par) -> None:
    """Rank 0: end the ``follow`` loops of the other ranks (a server shutting down)."""
    if not par.single:
        _share(par, _STOP)
