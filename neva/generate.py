"""Generation with a KV cache: greedy, temperature, top-k, top-p, repetition penalty, stop strings.

Prompts of different lengths are left-padded into one batch; their images and video frames (already
expanded to ``tokens_per_image`` image tokens each, pixel_values in order of appearance) go through
the model's own embed-and-splice path in the prefill. Each layer's cache is preallocated as
``{"k", "v": [B, KV, T_prompt + max_new_tokens, hd]}`` and written in place by the attention, so a
decode step costs one token per row. Logits processors run in transformers' order (repetition
penalty, temperature, top-k, top-p), so greedy decoding matches ``generate(do_sample=False)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from neva import llm, model
from neva.batch import Media
from neva.comm import LOCAL, Dist
from neva.config import ModelConfig


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
    """{layer: {"k", "v": zeros [B, KV/tp, S, hd]}} for every layer."""
    kv = cfg.llm.n_kv_heads // dist.tp_size
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


def _forward(params: dict, cfg: ModelConfig, x_btd: Tensor, pos_bt: Tensor, q_slots_t: Tensor, kv_valid: Tensor,
             cache: dict, cache_pos: int, dist: Dist) -> Tensor:
    """The trunk on embeddings ``x`` at cache slots ``q_slots`` -> logits at the last slot [B, V]."""
    lc = cfg.llm
    T = x_btd.shape[1]
    ctx = llm.context(lc, pos_bt, x_btd.dtype, k_valid_bs=kv_valid, q_slots_t=q_slots_t,
                      valid_bt=kv_valid[:, cache_pos:cache_pos + T], cache=cache, cache_pos=cache_pos)
    h, _, _ = llm.layers(params["llm"], x_btd, ctx, lc, dist, range(lc.n_layers), moe_dispatch=cfg.moe_dispatch)
    return llm.head(params["llm"], h[:, -1:], lc, dist)[:, 0].float()


@torch.no_grad()
def generate(params: dict, cfg: ModelConfig, prompts: list[list[int]], pixel_values: Media | None = None,
             sampling: Sampling = Sampling(), tokenizer: Any = None, dist: Dist = LOCAL,
             video_frames: Tensor | None = None,
             on_token: Callable[[Tensor, Tensor], None] | None = None) -> dict:
    """Continue each prompt (token ids, image tokens expanded; ``pixel_values`` float[N, 3, H, W] for
    all images and video frames of all prompts in order, per tower for kind=fused; ``video_frames``
    bool[N] marks the frames, which matters when the projector pools them). -> {"tokens": [[new ids] per prompt],
    "text": [decoded new text] (with a tokenizer, cut at a stop string), "finish": ["eos" | "stop" |
    "length"]}. Stop strings need ``tokenizer`` (anything with ``decode(ids)``). ``on_token(tok int[B],
    done bool[B])`` is called after every step (a row's EOS arrives with its row done), for streaming."""
    s = sampling.validate()
    if s.stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the generated text")
    if dist.tp is not None or dist.cp is not None:
        raise NotImplementedError("generation under tensor or context parallelism is not wired yet; run it with "
                                  "tp=1 and cp=1")
    lc = cfg.llm
    pad = lc.pad_id if lc.pad_id is not None else (lc.eos_id if lc.eos_id is not None else 0)
    ids, am = left_pad(prompts, pad)
    B, T = ids.shape
    S = T + s.max_new_tokens
    if S > lc.max_position:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({s.max_new_tokens}) exceed model.llm.max_position={lc.max_position}")
    dtype = params["llm"]["embed"]["w"].dtype
    cache = init_cache(cfg, B, S, dtype, dist)
    kv_valid = torch.cat([am.bool(), torch.ones(B, s.max_new_tokens, dtype=torch.bool)], 1)
    nb = model.normalize_batch(cfg, {"input_ids": ids, "attention_mask": am, "pixel_values": pixel_values,
                                     "video_frames": video_frames})
    x = model.embed_inputs(params, cfg, nb, dist)
    pos = nb["position_ids"]
    logits = _forward(params, cfg, x, pos, torch.arange(T), kv_valid, cache, 0, dist)
    gen = torch.Generator().manual_seed(s.seed)
    seen = torch.where(am.bool(), ids, ids[:, -1:])          # padding is never penalised (last token is real)
    out = torch.empty(B, 0, dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool)
    finish, lens = ["length"] * B, [s.max_new_tokens] * B
    last_pos = pos[:, -1:]
    for i in range(s.max_new_tokens):
        logits[:, cfg.image_token_id] = float("-inf")        # a placeholder is never a real answer
        tok = _next(logits, seen, s, gen)
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        out, seen = torch.cat([out, tok[:, None]], 1), torch.cat([seen, tok[:, None]], 1)
        for b in range(B):
            if done[b]:
                continue
            if s.stop_at_eos and lc.eos_id is not None and int(tok[b]) == lc.eos_id:
                done[b], finish[b], lens[b] = True, "eos", i          # eos is not part of the answer
            elif s.stop_strings and any(st in tokenizer.decode(out[b].tolist()) for st in s.stop_strings):
                done[b], finish[b], lens[b] = True, "stop", i + 1
        if on_token is not None:
            on_token(tok, done.clone())
        if bool(done.all()) or i + 1 == s.max_new_tokens:
            break
        last_pos = last_pos + 1
        x = model.embed_inputs(params, cfg, {"input_ids": tok[:, None]}, dist)
        logits = _forward(params, cfg, x, last_pos, torch.tensor([T + i]), kv_valid, cache, T + i, dist)
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
