"""Shared helpers for the data tests: tokenizers, a small synthetic dataset, trained-run decoding."""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from neva.config import ModelConfig, tiny_llm, tiny_vision
from neva.data import tokenizers
from neva.loss import IGNORE


@functools.lru_cache(maxsize=None)
def synth_dir() -> Path:
    """A small synthetic dataset, generated once per test process."""
    from neva.data.synthetic import generate

    out = Path(tempfile.mkdtemp(prefix="neva_synth_"))
    generate(out, seed=0, train_images=48, eval_images=6, qa_per_image=3, train_videos=6, eval_videos=2, frames=6)
    return out


def tiny_model(kind: str = "llama2", vision: str = "siglip", **llm_kw) -> ModelConfig:
    """A tiny NeVA whose vocab holds the Mixtral tokenizer's 32000 ids plus the image token 32000."""
    return ModelConfig(vision=tiny_vision(vision), llm=tiny_llm(kind, vocab_size=32064, **llm_kw), image_token_id=32000)


@functools.lru_cache(maxsize=None)
def mixtral_with(*specials: str):
    """A fresh Mixtral tokenizer with extra special tokens (ids 32000, 32001, ... in order)."""
    from transformers import LlamaTokenizer

    tok = LlamaTokenizer.from_pretrained(str(tokenizers.mixtral_folder()))
    if specials:
        tok.add_special_tokens({"additional_special_tokens": list(specials)})
    return tok


def run_text(tok, ids: list[int]) -> str:
    """Exact text of a run of tokens, keeping the word-start space sentencepiece's decoder strips."""
    text = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    first = tok.convert_ids_to_tokens(ids[0])
    if first.startswith("▁") and not text.startswith(" "):
        text = " " + text
    return text


def trained_runs(tok, enc) -> list[str]:
    """The text of each maximal run of trained tokens."""
    runs, cur = [], []
    for t, l in zip(enc.input_ids.tolist(), enc.labels.tolist()):
        if l != IGNORE:
            assert l == t, "a trained label differs from its input token"
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [run_text(tok, r) for r in runs]
