"""Conversation templates, rendered as pieces of text that are trained or not.

A template turns alternating user/assistant turns into ``Piece(text, trained, own_call)``s whose
concatenation is the exact prompt string. Only assistant replies and the end token that closes them are
trained; media tags (``<image>``, ``<video>``) stay in the user text and are expanded by ``tokenize``.
A piece with ``own_call`` is tokenised on its own, as a new tokenizer call (a sentencepiece tokenizer
then starts it with its word-start marker ``▁``), never merged with the text before it: that is how
the reference implementations below cut the text into encode calls, whatever the HF tokenizer's
``legacy`` / prepend setting does after a special token.

Exact layouts (B / E: the tokenizer's BOS / EOS; ``[...]`` the trained text; ``|`` a new call):

* ``plain``    (pretraining, one pair)  ``<image>[caption\\n]``  -- the user text is dropped, as NeMo does
* ``v1``       ``B|{sys} USER: {q1} ASSISTANT: [{a1}E]|USER: {q2} ASSISTANT: [{a2}E]``
* ``llama_2``  ``B|[INST] <<SYS>>\\n{sys}\\n<</SYS>>\\n\\n{q1} [/INST] [{a1} E]B|[INST] {q2} [/INST] [{a2} E]``
* ``mistral``  ``B|[INST] {sys\\n\\n}{q1} [/INST]|[{a1}E]|[INST] {q2} [/INST]|[{a2}E]``
* ``mistral_vila``  ``B[INST] {sys\\n}{q1} [/INST][{a1}E][INST] {q2} [/INST][{a2}E]`` (one call)
* ``llama_3``  ``<|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{sys}<|eot_id|>`` (no
  system block when the system prompt is empty), then per turn
  ``<|start_header_id|>user<|end_header_id|>\\n\\n{q}<|eot_id|>``
  ``<|start_header_id|>assistant<|end_header_id|>\\n\\n[{a}<|eot_id|>]``
* ``nvgpt``    ``<extra_id_0>System\\n{sys}<extra_id_1>User\\n{q}\\n<extra_id_1>Assistant\\n``
  ``<extra_id_2>{label}\\n[{a}\\n<extra_id_1>]`` (the next ``User\\n...`` follows)
* ``chatml``   ``<|im_start|>system\\n{sys}<|im_end|>\\n<|im_start|>user\\n{q}<|im_end|>\\n``
  ``<|im_start|>assistant\\n[{a}<|im_end|>]\\n`` (no system block when the system prompt is empty)

Sources, and the reference each is tested against token for token (``tests/test_data_references.py``):
* ``mistral``: Mistral's own V1 instruct format (Mistral-7B-Instruct-v0.1/v0.2, Mixtral-8x7B-Instruct),
  as ``mistral-common``'s ``MistralTokenizer.v1()`` encodes it: BOS, then each message its own
  sentencepiece call (``[INST] {q} [/INST]``, then the reply), EOS after each reply, the system
  prompt joined to the first user message by a blank line. Labels as ``mistral-finetune`` masks:
  each reply's tokens and its EOS.
* ``mistral_vila``: NeMo's ``mistral`` (``vlm/neva/data/conversation.py``, VILA's ``conv_mistral_vila``),
  one string tokenised whole. It differs from Mistral's own: the ``[INST]`` after BOS and EOS and the
  first word of each reply lose their word-start marker (``[`` 28792 for ``▁[`` 733, ``Three`` for
  ``▁Three``), and the system prompt is joined by one newline.
* ``llama_3``: NeMo's ``llava_llama_3`` = Meta's Llama-3 chat format (``llama-models``' ``ChatFormat``).
* ``llama_2``: NeMo's ``llava_llama_2`` = Llama-2-chat's chat template; Meta's own encoding
  (``llama`` ``chat_completion``) makes each round ``[INST] ... [/INST] {a} `` one sentencepiece call.
* ``v1``: NeMo's / LLaVA's ``conv_vicuna_v1`` = FastChat's ``vicuna_v1.1``; LLaVA tokenised it with the
  slow (legacy) Llama tokenizer, which encodes each run of text between special tokens on its own.
* ``chatml``: the ChatML format as OpenHermes-2.5-Mistral-7B's chat template writes it.
* ``plain``, ``nvgpt``: NeMo ``multimodal/data/neva/conversation.py`` + ``neva_dataset.py``.
v1 and llama_2 start with BOS (LLaVA's tokenizer adds it; NeMo 1 re-maps its own BOS id to 1), and
llama_2 uses Meta's ``</s><s>`` between rounds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

MEDIA_TAGS = ("<image>", "<video>")
NVGPT_LABEL = "quality:4,toxicity:0,humor:0,creativity:0,helpfulness:4,correctness:4,coherence:4,complexity:4,verbosity:4"


@dataclass(frozen=True)
class Turn:
    role: str          # "user" | "assistant"
    text: str
    label: str | None = None   # nvgpt's steering label for an assistant turn


@dataclass(frozen=True)
class Piece:
    text: str
    trained: bool = False
    own_call: bool = False     # tokenised as a new tokenizer call, not as the continuation of the text before


@dataclass(frozen=True)
class Template:
    """``render(turns, system, bos, eos, generation)``: turns alternate user, assistant, ... With
    ``generation=True`` the turns end on a user turn and the pieces end with the open assistant prefix."""

    name: str
    system: str                       # the default system prompt
    render: Callable[..., list[Piece]]
    end: Callable[[str], str]         # eos -> the string that closes an assistant reply (the stop string)
    uses_system: bool = True
    specials: tuple[str, ...] = ()    # strings that must be single special tokens of the tokenizer
    needs_bos_eos: bool = False       # renders the tokenizer's own BOS / EOS


def _pairs(turns: list[Turn]):
    """(user, assistant | None) per round."""
    for i in range(0, len(turns), 2):
        yield turns[i], (turns[i + 1] if i + 1 < len(turns) else None)


def _plain(turns, system, bos, eos, generation=False):
    user, reply = turns[0], (turns[1] if len(turns) > 1 else None)
    tags = "".join(t for t in media_tags_in(user.text))
    pieces = [Piece(tags)]
    if reply is not None:
        pieces.append(Piece(reply.text + "\n", True))
    return pieces


def media_tags_in(text: str) -> list[str]:
    out, i = [], 0
    while True:
        hits = [(text.find(t, i), t) for t in MEDIA_TAGS if text.find(t, i) >= 0]
        if not hits:
            return out
        pos, tag = min(hits)
        out.append(tag)
        i = pos + len(tag)


def _v1(turns, system, bos, eos, generation=False):
    pieces, head = [Piece(bos)], system + " "
    for user, reply in _pairs(turns):
        if reply is None:
            pieces.append(Piece(head + f"USER: {user.text} ASSISTANT:", own_call=True))
            break
        pieces += [Piece(head + f"USER: {user.text} ASSISTANT: ", own_call=True), Piece(reply.text + eos, True)]
        head = ""
    return pieces


def _llama_2(turns, system, bos, eos, generation=False):
    pieces = []
    for i, (user, reply) in enumerate(_pairs(turns)):
        q = (f"<<SYS>>\n{system}\n<</SYS>>\n\n" if i == 0 and system else "") + user.text
        pieces.append(Piece(bos))
        if reply is None:
            pieces.append(Piece(f"[INST] {q} [/INST]", own_call=True))
            break
        pieces += [Piece(f"[INST] {q} [/INST] ", own_call=True), Piece(f"{reply.text} {eos}", True)]
    return pieces


def _mistral(turns, system, bos, eos, generation=False):
    """Mistral's V1 instruct format as mistral-common encodes it: every message its own call."""
    pieces = [Piece(bos)]
    for i, (user, reply) in enumerate(_pairs(turns)):
        q = ((system + "\n\n") if i == 0 and system else "") + user.text
        pieces.append(Piece(f"[INST] {q} [/INST]", own_call=True))
        if reply is None:
            break
        pieces.append(Piece(reply.text + eos, True, own_call=True))
    return pieces


def _mistral_vila(turns, system, bos, eos, generation=False):
    """NeMo's (VILA's) rendering: one string, tokenised whole."""
    pieces = []
    for i, (user, reply) in enumerate(_pairs(turns)):
        q = ((system + "\n") if i == 0 and system else "") + user.text
        pieces.append(Piece((bos if i == 0 else "") + f"[INST] {q} [/INST]"))
        if reply is None:
            break
        pieces.append(Piece(reply.text + eos, True))
    return pieces


def _header(role: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


def _llama_3(turns, system, bos, eos, generation=False):
    pieces = [Piece("<|begin_of_text|>" + (_header("system") + system + "<|eot_id|>" if system else ""))]
    for user, reply in _pairs(turns):
        pieces.append(Piece(_header("user") + user.text + "<|eot_id|>" + _header("assistant")))
        if reply is None:
            break
        pieces.append(Piece(reply.text + "<|eot_id|>", True))
    return pieces


def _nvgpt(turns, system, bos, eos, generation=False):
    pieces = [Piece("<extra_id_0>System\n" + system + "<extra_id_1>")]
    for user, reply in _pairs(turns):
        label = (reply.label if reply is not None and reply.label else NVGPT_LABEL)
        pieces.append(Piece(f"User\n{user.text}\n<extra_id_1>Assistant\n<extra_id_2>{label}\n"))
        if reply is None:
            break
        pieces.append(Piece(f"{reply.text}\n<extra_id_1>", True))
    return pieces


def _chatml(turns, system, bos, eos, generation=False):
    pieces = [Piece(f"<|im_start|>system\n{system}<|im_end|>\n" if system else "")]
    for user, reply in _pairs(turns):
        pieces.append(Piece(f"<|im_start|>user\n{user.text}<|im_end|>\n<|im_start|>assistant\n"))
        if reply is None:
            break
        pieces += [Piece(f"{reply.text}<|im_end|>", True), Piece("\n")]
    return pieces


VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
LLAVA_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                "that the user provides, and assist the user with a variety of tasks using natural language.")

TEMPLATES: dict[str, Template] = {
    "plain": Template("plain", "", _plain, lambda eos: "\n", uses_system=False),
    "v1": Template("v1", VICUNA_SYSTEM, _v1, lambda eos: eos, needs_bos_eos=True),
    "llama_2": Template("llama_2", LLAVA_SYSTEM, _llama_2, lambda eos: eos, needs_bos_eos=True),
    "mistral": Template("mistral", "", _mistral, lambda eos: eos, needs_bos_eos=True),
    "mistral_vila": Template("mistral_vila", "", _mistral_vila, lambda eos: eos, needs_bos_eos=True),
    "llama_3": Template("llama_3", LLAVA_SYSTEM, _llama_3, lambda eos: "<|eot_id|>",
                        specials=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "nvgpt": Template("nvgpt", VICUNA_SYSTEM + "\n\n", _nvgpt, lambda eos: "\n<extra_id_1>",
                      specials=("<extra_id_0>", "<extra_id_1>", "<extra_id_2>")),
    "chatml": Template("chatml", "You are a helpful assistant.", _chatml, lambda eos: "<|im_end|>",
                       specials=("<|im_start|>", "<|im_end|>")),
}


def get(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}: use one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def check_tokenizer(template: str | Template, tok) -> None:
    """Raise unless ``tok`` has what the template writes as single tokens (BOS/EOS, special markers)."""
    t = get(template) if isinstance(template, str) else template
    need = list(t.specials)
    if t.needs_bos_eos:
        if not tok.bos_token or not tok.eos_token:
            raise ValueError(f"template {t.name} writes the tokenizer's BOS and EOS, but this tokenizer has "
                             f"bos_token={tok.bos_token!r}, eos_token={tok.eos_token!r}")
        need += [tok.bos_token, tok.eos_token]
    for s in need:
        n = len(tok(s, add_special_tokens=False)["input_ids"])
        if n != 1:
            raise ValueError(f"template {t.name} needs {s!r} to be one special token, but the tokenizer splits it "
                             f"into {n} tokens: use a tokenizer that has it (e.g. tokenizer=llama3 for llama_3, "
                             f"NeMo's GPT tokenizers for nvgpt, a ChatML tokenizer for chatml)")


def render(template: str | Template, turns: list[Turn], *, bos: str = "", eos: str = "",
           system: str | None = None, generation: bool = False) -> list[Piece]:
    """Pieces of the prompt; raise ValueError (the caller names the sample) on a bad turn order."""
    t = get(template) if isinstance(template, str) else template
    if not turns or turns[0].role != "user":
        raise ValueError("the conversation must start with a user (human) turn")
    for i, turn in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if turn.role != want:
            raise ValueError(f"turn {i} is from {turn.role} where {want} was expected: turns must alternate "
                             f"human, gpt, human, gpt, ...")
    if generation and turns[-1].role != "user":
        raise ValueError("a generation prompt must end with a user turn")
    if not generation and not any(tn.role == "assistant" for tn in turns):
        raise ValueError("the conversation has no assistant (gpt) turn: nothing would be trained")
    if t.name == "plain" and len(turns) > 2:
        raise ValueError(f"the plain template takes one human/gpt pair (media then caption); got {len(turns)} turns")
    sys_prompt = t.system if system is None else system
    return [p for p in t.render(turns, sys_prompt, bos, eos, generation) if p.text]


def text_of(pieces: list[Piece]) -> str:
    return "".join(p.text for p in pieces)
