"""The tokenizers that ship inside installed packages, loaded offline, plus local HF folders.

* ``mixtral()``: the 32k sentencepiece tokenizer of Mistral-7B v0.1 / Mixtral-8x7B, shipped by
  ``mistral-common`` as ``data/tokenizer.model.v1``.
* ``llama3()``: the Llama-3 tiktoken BPE shipped by ``llama-models``, converted once to a fast HF
  tokenizer with Llama-3's special tokens (``<|begin_of_text|>``, ``<|eot_id|>``, headers, ...).
* ``load(spec)``: ``"mixtral"`` | ``"llama3"`` | a local folder with an HF tokenizer.
* ``own_chat_template(tok, spec)``: the chat template the tokenizer's model serves with (its own, or
  for the shipped two the one their makers publish), for ``neva.data.inspect`` to check a template.

Everything downstream needs a *fast* tokenizer: label masks come from character offsets.
Converted folders are cached under ``$NEVA_CACHE`` (default ``~/.cache/neva``).
"""
from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path

SHIPPED = ("mixtral", "llama3")


def cache_dir() -> Path:
    return Path(os.environ.get("NEVA_CACHE", Path.home() / ".cache" / "neva")) / "tokenizers"


def _package_file(package: str, *parts: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; it ships the tokenizer file {'/'.join(parts)}")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed package {package!r}")
    return path


def _publish(tmp: Path, final: Path) -> None:
    """Move a fully written folder into place; a concurrent writer that won is fine."""
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def mixtral_folder() -> Path:
    """A folder holding the Mixtral tokenizer as ``tokenizer.model`` (what LlamaTokenizer expects)."""
    final = cache_dir() / "mixtral"
    if not (final / "tokenizer.model").exists():
        src = _package_file("mistral_common", "data", "tokenizer.model.v1")
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent))
        shutil.copyfile(src, tmp / "tokenizer.model")
        _publish(tmp, final)
    return final


@functools.lru_cache(maxsize=None)
def mixtral():
    """Mixtral-8x7B's 32k tokenizer: <s>=1, </s>=2, no BOS added implicitly (templates write it)."""
    from transformers import LlamaTokenizer

    tok = LlamaTokenizer.from_pretrained(str(mixtral_folder()))
    if len(tok) != 32000:
        raise RuntimeError(f"the Mixtral tokenizer loaded from {mixtral_folder()} has {len(tok)} tokens, not 32000")
    return tok


LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def llama3_specials() -> list[str]:
    """Llama-3.1's 256 special tokens in id order (ids 128000..128255)."""
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
             "<|eot_id|>", "<|python_tag|>", "<|image|>"]
    return named + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(named))]


def llama3_folder() -> Path:
    """A folder with the Llama-3 tokenizer as an HF ``tokenizer.json`` (converted from tiktoken once)."""
    final = cache_dir() / "llama3"
    if not (final / "tokenizer.json").exists():
        from transformers import PreTrainedTokenizerFast
        from transformers.convert_slow_tokenizer import TikTokenConverter

        src = _package_file("llama_models", "llama3", "tokenizer.model")
        backend = TikTokenConverter(vocab_file=str(src), pattern=LLAMA3_PATTERN,
                                    extra_special_tokens=llama3_specials()).converted()
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                      eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>")
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent))
        tok.save_pretrained(str(tmp))
        _publish(tmp, final)
    return final


@functools.lru_cache(maxsize=None)
def llama3():
    """Llama-3's 128k tokenizer: <|begin_of_text|>=128000, <|eot_id|>=128009 (the chat end token)."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(llama3_folder()))
    if tok.convert_tokens_to_ids("<|eot_id|>") != 128009:
        raise RuntimeError(f"the Llama-3 tokenizer in {llama3_folder()} maps <|eot_id|> to "
                           f"{tok.convert_tokens_to_ids('<|eot_id|>')}, not 128009: delete that folder")
    return tok


# The chat templates of the shipped tokenizers' models, on one line each (the published text, with the
# whitespace between Jinja tags removed). With these tokenizers their renderings tokenise exactly as the
# models' reference code does (tests/test_data_references.py).
# Mistral's V1 instruct format: mistralai/cookbook concept-deep-dive/tokenization/templates.md, "Tokenizer
# V1" (Mistral-7B-Instruct-v0.1/v0.2, Mixtral-8x7B-Instruct-v0.1); the spaces it writes before [INST]
# and the reply are the word-start markers mistral-common's per-message encoding gives.
MISTRAL_V1_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ ' [INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
# meta-llama/Meta-Llama-3-8B-Instruct, tokenizer_config.json "chat_template".
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
OWN_CHAT_TEMPLATES = {"mixtral": MISTRAL_V1_CHAT_TEMPLATE, "llama3": LLAMA3_CHAT_TEMPLATE}


def own_chat_template(tok, spec: str) -> str | None:
    """The tokenizer's own chat template, else the published one of a shipped tokenizer's model, else None."""
    return getattr(tok, "chat_template", None) or OWN_CHAT_TEMPLATES.get(spec)


def load(spec: str):
    """``"mixtral"`` | ``"llama3"`` | a local HF tokenizer folder -> a fast HF tokenizer."""
    if spec == "mixtral":
        return mixtral()
    if spec == "llama3":
        return llama3()
    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(f"data.tokenizer={spec!r} is neither {' nor '.join(SHIPPED)} nor a folder")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the folder named
        raise ValueError(f"could not load a tokenizer from {path}: {e}") from e
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"the tokenizer in {path} is not a fast (tokenizers-backed) tokenizer; label masks need "
                         f"character offsets: add a tokenizer.json to the folder")
    return tok
