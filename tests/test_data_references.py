"""Templates against the models' own references, token for token (ids and trained labels):

* ``mistral``  = ``mistral-common``'s ``MistralTokenizer.v1()`` (Mistral's own library); labels as
  ``mistral-finetune`` masks them (each assistant message's tokens and its EOS).
* ``llama_3``  = ``llama-models``' ``ChatFormat`` over the Llama-3 tokenizer it ships (images natively,
  as its ``<|image|>`` token); labels: each assistant message after its header.
* ``llama_2``  = Meta's ``chat_completion`` (each round one sentencepiece call between BOS and EOS), and
  ``apply_chat_template`` with Llama-2-chat's template on a tokenizer built from the shipped
  sentencepiece file as the hub's tokenizer.json behaves (``legacy=True``: a word-start after every
  special token).
* ``v1``       = LLaVA's tokenisation of FastChat's vicuna_v1.1 prompt (its slow legacy tokenizer:
  sentencepiece over each run of text between special tokens). Vicuna ships no chat template
  (lmsys/vicuna-7b-v1.5's tokenizer_config.json has none), so there is no apply_chat_template to match.
* ``chatml``   = ``apply_chat_template`` with OpenHermes-2.5-Mistral-7B's template on its tokenizer
  (Mistral's sentencepiece file plus ``<|im_end|>`` = 32000, ``<|im_start|>`` = 32001).

Every conversation: one and two rounds, with and without a system prompt, text only, ``<image>`` at the
start of a turn and in the middle of one. Llama-2, Vicuna and Mistral-7B were trained on 32k
sentencepiece vocabularies of the same kind; Mistral's is the one shipped offline (in mistral-common),
so it stands in for all three. Where a reference has no image token (sentencepiece ones), the image is
compared aside: our ids without the media span equal the reference's ids for the text without the tag,
and the span sits exactly where the tag was (LLaVA's ``<image>\\n`` convention).
"""
from __future__ import annotations

import functools
import io

import pytest

from data_helpers import mixtral_with
from neva.batch import IGNORE
from neva.data import templates, tokenizers
from neva.data.templates import Turn
from neva.data.tokenize import encode

IMG = -7          # one marker per media span in the collapsed id lists
SYSTEM = "Be brief."
CONTENTS = {"text": "What is this?", "image_start": "<image>\nWhat is this?",
            "image_middle": "Look at this <image>\nWhat colour is it?"}
CASES = [(rounds, system, content) for rounds in (1, 2) for system in (None, SYSTEM) for content in CONTENTS]
IDS = [f"{r}round-{'sys' if s else 'nosys'}-{c}" for r, s, c in CASES]


def conversation(rounds: int, content: str) -> list[Turn]:
    turns = [Turn("user", CONTENTS[content]), Turn("assistant", "Three.")]
    if rounds == 2:
        turns += [Turn("user", "Is it big?"), Turn("assistant", "No, it is small.")]
    return turns


def ours(template: str, turns, system, tok, *, collapse: bool = True):
    """(ids, labels) of our pipeline, each media span collapsed to one IMG (dropped if not ``collapse``)."""
    t = templates.get(template)
    pieces = templates.render(t, turns, bos=tok.bos_token or "", eos=tok.eos_token or "",
                              system=system if system is not None else "")
    n = sum(len(templates.media_tags_in(x.text)) for x in turns)
    enc = encode(pieces, tok, image_token_id=len(tok) + 9, tokens_per_image=3, frames=[1] * n)
    ids, labels, spans = enc.input_ids.tolist(), enc.labels.tolist(), {s.start: s for s in enc.spans}
    out_ids, out_labels, i = [], [], 0
    while i < len(ids):
        if i in spans:
            if collapse:
                out_ids.append(IMG), out_labels.append(IGNORE)
            i = spans[i].end
            continue
        out_ids.append(ids[i]), out_labels.append(labels[i])
        i += 1
    return out_ids, out_labels, enc, pieces


def labels_of(chunks) -> tuple[list[int], list[int]]:
    """[(ids, trained)] -> (ids, labels)."""
    ids, labels = [], []
    for part, trained in chunks:
        ids += part
        labels += part if trained else [IGNORE] * len(part)
    return ids, labels


def assert_media_where_the_tags_were(enc, pieces, tok):
    """Each media span starts right after the tokens of the text before its tag."""
    text = templates.text_of(pieces)
    ids = enc.input_ids.tolist()
    for k, s in enumerate(enc.spans):
        before = text[:[i for i in range(len(text)) if text.startswith("<image>", i)][k]]
        prefix = [t for t in ids[:s.start] if t != ids[s.start]]
        got = tok.decode(prefix, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        assert got.replace(" ", "") == before.replace("<image>", "").replace(" ", ""), (got, before)


# ------------------------------------------------------------------------------------- mistral
@functools.lru_cache(maxsize=None)
def mistral_common_v1():
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    return MistralTokenizer.v1().instruct_tokenizer


def mistral_reference(turns, system) -> tuple[list[int], list[int]]:
    """mistral-common v1, message by message (mistral-finetune's masks); the whole request's encoding
    must be the concatenation. Media tags are dropped from the text (v1 has no image token)."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
    from mistral_common.protocol.instruct.request import InstructRequest
    it = mistral_common_v1()
    msgs = [UserMessage(content=t.text.replace("<image>", "")) if t.role == "user" else AssistantMessage(content=t.text)
            for t in turns]
    chunks = [(it.start(), False)]
    last_user = max(i for i, m in enumerate(msgs) if isinstance(m, UserMessage))
    for i, m in enumerate(msgs):
        if isinstance(m, UserMessage):
            toks, _, _ = it.encode_user_message(m, None, i == last_user, i == 0, system_prompt=system)
            chunks.append((toks, False))
        else:
            chunks.append((it.encode_assistant_message(m, i < last_user), True))
    ids, labels = labels_of(chunks)
    assert ids == it.encode_instruct(InstructRequest(messages=msgs, system_prompt=system)).tokens
    return ids, labels


@pytest.mark.parametrize("rounds,system,content", CASES, ids=IDS)
def test_mistral_is_mistral_common_v1(rounds, system, content):
    tok = tokenizers.mixtral()
    turns = conversation(rounds, content)
    ids, labels, enc, pieces = ours("mistral", turns, system, tok, collapse=False)
    assert (ids, labels) == mistral_reference(turns, system)
    assert_media_where_the_tags_were(enc, pieces, tok)


def test_mistral_is_the_issue_example():
    """The report that opened this: [INST] after <s> is ▁[ (733), and the answer `Three.` trains ▁Three (9673)."""
    tok = tokenizers.mixtral()
    ids, labels, _, _ = ours("mistral", conversation(1, "text"), None, tok)
    assert ids[:2] == [1, 733] and 9673 in [x for x in labels if x != IGNORE] and 24851 not in ids
    vila, _, _, _ = ours("mistral_vila", conversation(1, "text"), None, tok)
    assert vila[:2] == [1, 28792] and 24851 in vila          # NeMo's rendering: the difference it keeps


@pytest.mark.parametrize("template", ["mistral", "llama_2", "v1"])
def test_own_calls_do_not_depend_on_the_prepend_setting(template):
    """A tokenizer built with legacy=True (a word-start after every special token, as the hub's
    tokenizer.json files of these models behave) gives the same ids for text-only conversations."""
    legacy = legacy_sp()
    for rounds in (1, 2):
        for system in (None, SYSTEM):
            turns = conversation(rounds, "text")
            assert ours(template, turns, system, legacy)[:2] == ours(template, turns, system, tokenizers.mixtral())[:2]


# ------------------------------------------------------------------------------------- llama_3
@functools.lru_cache(maxsize=None)
def chat_format():
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer
    return ChatFormat(Tokenizer.get_instance())


@functools.lru_cache(maxsize=None)
def png() -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def llama3_reference(turns, system) -> tuple[list[int], list[int]]:
    """ChatFormat message by message (the header of an assistant message is prompt, its content and
    <|eot_id|> are trained); the dialog encoding must be the concatenation plus the open assistant header."""
    from llama_models.datatypes import RawMediaItem, RawMessage, RawTextItem
    cf = chat_format()

    def content(text):
        if "<image>" not in text:
            return text
        items = []
        for k, part in enumerate(text.split("<image>")):
            if k:
                items.append(RawMediaItem(data=png()))
            if part:
                items.append(RawTextItem(text=part))
        return items

    msgs = ([RawMessage(role="system", content=system)] if system else []) + \
        [RawMessage(role=t.role, content=content(t.text)) for t in turns]
    chunks = [([cf.tokenizer.special_tokens["<|begin_of_text|>"]], False)]
    for m in msgs:
        toks, _ = cf.encode_message(m, None)
        head = len(cf._encode_header(m.role))
        chunks += [(toks[:head], False), (toks[head:], m.role == "assistant")]
    ids, labels = labels_of(chunks)
    ids = [IMG if t == cf.vision_token else t for t in ids]
    whole = cf.encode_dialog_prompt(msgs).tokens
    assert [IMG if t == 128256 else t for t in whole] == ids + cf._encode_header("assistant")
    return ids, labels


@pytest.mark.parametrize("rounds,system,content", CASES, ids=IDS)
def test_llama_3_is_llama_models_chat_format(rounds, system, content):
    turns = conversation(rounds, content)
    got = ours("llama_3", turns, system, tokenizers.llama3())[:2]
    assert got == llama3_reference(turns, system)


# ------------------------------------------------------------------------- sentencepiece references
@functools.lru_cache(maxsize=None)
def sp():
    import sentencepiece
    return sentencepiece.SentencePieceProcessor(model_file=str(tokenizers.mixtral_folder() / "tokenizer.model"))


@functools.lru_cache(maxsize=None)
def legacy_sp(*specials: str, chat_template: str | None = None):
    """The shipped sentencepiece file as an HF tokenizer with legacy=True (the hub's behaviour)."""
    from transformers import LlamaTokenizer
    tok = LlamaTokenizer.from_pretrained(str(tokenizers.mixtral_folder()), legacy=True)
    if specials:
        tok.add_special_tokens({"additional_special_tokens": list(specials)})
    if chat_template:
        tok.chat_template = chat_template
    return tok


def meta_llama2_reference(turns, system) -> tuple[list[int], list[int]]:
    """Meta's llama ``chat_completion``: per round BOS + encode(f"[INST] {q} [/INST] {a} ") + EOS, the
    system prompt as <<SYS>> in the first user message; the reply (from its word-start) is trained."""
    s = sp()
    chunks = []
    for i in range(0, len(turns), 2):
        q = turns[i].text.replace("<image>", "")
        if i == 0 and system:
            q = f"<<SYS>>\n{system}\n<</SYS>>\n\n{q}"
        prompt = f"[INST] {q} [/INST]"
        whole = s.encode(f"{prompt} {turns[i + 1].text} ")
        n = len(s.encode(prompt))
        assert whole[:n] == s.encode(prompt)
        chunks += [([s.bos_id()] + whole[:n], False), (whole[n:] + [s.eos_id()], True)]
    return labels_of(chunks)


@pytest.mark.parametrize("rounds,system,content", CASES, ids=IDS)
def test_llama_2_is_meta_chat_completion(rounds, system, content):
    tok = tokenizers.mixtral()
    turns = conversation(rounds, content)
    ids, labels, enc, pieces = ours("llama_2", turns, system or "", tok, collapse=False)
    assert (ids, labels) == meta_llama2_reference(turns, system)
    assert_media_where_the_tags_were(enc, pieces, tok)


# meta-llama/Llama-2-7b-chat-hf, tokenizer_config.json "chat_template" (what NeMo's llama_2 calls).
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
# teknium/OpenHermes-2.5-Mistral-7B, tokenizer_config.json "chat_template" (added tokens <|im_end|> 32000,
# <|im_start|> 32001 on Mistral-7B's sentencepiece vocabulary).
CHATML_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def hf_reference(tok, turns, system, trained_after: str, trained_until: str, sep: str = ""):
    """apply_chat_template's ids; trained = each reply from its first token (with the ``sep`` before
    it) through ``trained_until``, by the offsets of the rendered text (``trained_after`` precedes it)."""
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": t.role, "content": t.text} for t in turns]
    text = tok.apply_chat_template(msgs, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert enc["input_ids"] == tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
    spans, pos = [], 0
    for t in turns:
        if t.role == "assistant":
            start = text.index(trained_after + sep + t.text, pos) + len(trained_after)
            end = text.index(trained_until, start) + len(trained_until)
            spans.append((start, end))
            pos = end
    img = tok.convert_tokens_to_ids("<image>") if "<image>" in tok.get_vocab() else None
    ids = [IMG if t == img else t for t in enc["input_ids"]]
    labels = [t if any(s <= a < e for s, e in spans) else IGNORE for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])]
    return ids, labels


@pytest.mark.parametrize("rounds,system", [(r, s) for r in (1, 2) for s in (None, SYSTEM)])
def test_llama_2_is_llama_2_chats_own_template(rounds, system):
    """Text only: with <image> added as a special token a legacy tokenizer also starts the text after it
    with ▁, which neither Meta's encoding nor ours does."""
    tok = legacy_sp(chat_template=LLAMA2_CHAT_TEMPLATE)
    turns = conversation(rounds, "text")
    ids, labels = hf_reference(tok, turns, system, "[/INST]", "</s>", sep=" ")
    got = ours("llama_2", turns, system or "", tokenizers.mixtral())[:2]
    assert got == (ids, labels)


def llava_v1_reference(turns, system) -> tuple[list[int], list[int]]:
    """LLaVA's preprocess_v1: FastChat's prompt (system, `` USER: q ASSISTANT: a</s>`` per round),
    BOS added by the tokenizer, each run between special tokens one sentencepiece call; a reply is
    trained from the token after ``ASSISTANT:`` (its word-start) through ``</s>``."""
    s = sp()
    chunks, head = [([s.bos_id()], False)], system + " "
    for i in range(0, len(turns), 2):
        prompt = head + f"USER: {turns[i].text.replace('<image>', '')} ASSISTANT:"
        whole = s.encode(prompt + " " + turns[i + 1].text)
        n = len(s.encode(prompt))
        assert whole[:n] == s.encode(prompt)
        chunks += [(whole[:n], False), (whole[n:] + [s.eos_id()], True)]
        head = ""
    return labels_of(chunks)


@pytest.mark.parametrize("rounds,content", [(r, c) for r in (1, 2) for c in CONTENTS])
def test_v1_is_llavas_tokenisation(rounds, content):
    tok = tokenizers.mixtral()
    turns = conversation(rounds, content)
    ids, labels, enc, pieces = ours("v1", turns, templates.VICUNA_SYSTEM, tok, collapse=False)
    assert (ids, labels) == llava_v1_reference(turns, templates.VICUNA_SYSTEM)
    assert_media_where_the_tags_were(enc, pieces, tok)


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("rounds,system,content", CASES, ids=IDS)
def test_chatml_is_openhermes_own_template(rounds, system, content, legacy):
    """On the tokenizer as the hub ships it (legacy) and as transformers 5 builds it from the
    sentencepiece file; <image> added as a special token for the reference (as LlavaProcessor)."""
    if legacy:
        tok = legacy_sp("<|im_end|>", "<|im_start|>", chat_template=CHATML_CHAT_TEMPLATE)
        ref_tok = legacy_sp("<|im_end|>", "<|im_start|>", "<image>", chat_template=CHATML_CHAT_TEMPLATE)
    else:
        tok = mixtral_with("<|im_end|>", "<|im_start|>")
        ref_tok = mixtral_with("<|im_end|>", "<|im_start|>", "<image>")
        ref_tok.chat_template = CHATML_CHAT_TEMPLATE
    assert tok.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"]) == [32000, 32001]
    turns = conversation(rounds, content)
    ref = hf_reference(ref_tok, turns, system, "<|im_start|>assistant\n", "<|im_end|>")
    assert ours("chatml", turns, system or "", tok)[:2] == ref


# ------------------------------------------------------------------------------------- inspect
def test_inspect_flags_a_template_that_differs_from_the_tokenizers_own(tmp_path, capsys):
    """neva.data.inspect renders the sample with the tokenizer's own chat template too: the shipped
    Mixtral tokenizer with Mistral's published V1 template agrees with ``mistral`` and flags NeMo's
    ``mistral_vila``; a ChatML tokenizer folder with its chat template agrees with ``chatml`` and
    flags ``v1``."""
    import json
    from neva.data import inspect as inspect_cli
    rec = {"id": "a", "conversations": [{"from": "human", "value": "What is this?"}, {"from": "gpt", "value": "Three."},
                                        {"from": "human", "value": "Is it big?"}, {"from": "gpt", "value": "No."}]}
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(rec) + "\n")
    folder = tmp_path / "chatml_tok"
    tok = legacy_sp("<|im_end|>", "<|im_start|>", chat_template=CHATML_CHAT_TEMPLATE)
    tok.save_pretrained(str(folder))
    for template, tokenizer, same in [("mistral", "mixtral", True), ("mistral_vila", "mixtral", False),
                                      ("llama_3", "llama3", True), ("chatml", str(folder), True),
                                      ("mistral_vila", str(folder), False)]:
        assert inspect_cli.main([str(data), "--template", template, "--tokenizer", tokenizer]) == 0
        out = capsys.readouterr().out
        assert ("own chat template: same tokens" in out) == same, (template, tokenizer, out[-600:])
        assert ("DIFFERS" in out) != same
    plain = tmp_path / "no_template"
    legacy_sp().save_pretrained(str(plain))
    assert inspect_cli.main([str(data), "--template", "mistral", "--tokenizer", str(plain)]) == 0
    assert f"own chat template: not compared (tokenizer {plain} has no chat_template)" in capsys.readouterr().out
