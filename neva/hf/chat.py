"""Our conversation templates as Hugging Face chat templates (Jinja), and chat messages as our turns.

An exported folder must prompt the model as training did: ``apply_chat_template(messages,
add_generation_prompt=True)`` of its tokenizer or processor, tokenised whole (``<image>`` expanded by
``LlavaProcessor``), gives the ids ``neva.data`` gives the same conversation (``templates.render`` +
``tokenize.encode``; tested for every template). Each Jinja template below mirrors its render function
in ``neva/data/templates.py``; three things make a whole-string tokenisation equal ours:

* A piece ours tokenises as a new call (``own_call``: a sentencepiece tokenizer then starts it with
  its word-start ``▁``) is written after a special token with the tokenizer's ``word_start``: a space
  for a Metaspace tokenizer (unless the piece already starts with one), nothing for a byte-level BPE.
* The assistant prefix that follows a user turn is written only when a reply or the generation follows.
* Message content: a string is used as written (``<image>`` / ``<video>`` tags inside, as in LLaVA
  data); a list of parts (OpenAI / transformers style: ``text``, ``image`` / ``image_url``, ``video``
  / ``video_url``) is joined with ``\\n`` between parts, an image part as ``<image>``: ``[image, text]``
  is LLaVA's ``<image>\\nquestion``. ``turns_from_messages`` applies the same rule in Python.

HF LLaVA has no video token: a video is its frames as images, so the template writes ``<image>`` once
per frame (``frames_per_video`` of training) where ours writes ``<video>``; the ids are the same
(``frames x tokens_per_image`` image tokens in one run) and a user passes the frames as images.
"""
from __future__ import annotations

import json

from neva.data import templates
from neva.data.templates import NVGPT_LABEL, Turn

IMAGE, VIDEO = "<image>", "<video>"
IMAGE_PARTS = ("image", "image_url")
VIDEO_PARTS = ("video", "video_url")


def _lit(s: str) -> str:
    """A Python string as a Jinja string literal."""
    return json.dumps(s)


def word_start(tok) -> str:
    """What to write before text that ours tokenises as a new call, when it follows a special token:
    ``" "`` (Metaspace: a new call starts with ``▁``) or ``""`` (byte-level BPE: it does not)."""
    special = next(t for t in (tok.eos_token, tok.bos_token, *tok.all_special_tokens) if t)
    probes = ["[INST] Hello world", "USER: What is it?"]
    for ws in (" ", ""):
        if all(tok(p, add_special_tokens=False)["input_ids"] ==
               tok(special + ws + p, add_special_tokens=False)["input_ids"][1:] for p in probes):
            return ws
    raise ValueError(f"the tokenizer ({type(tok).__name__}) starts a new call on text neither as the same text after "
                     f"a special token nor as it with a leading space: no chat template can reproduce the templates "
                     f"that tokenise messages one by one (v1, llama_2, mistral); use one tokenised whole "
                     f"(mistral_vila, llama_3, chatml, nvgpt)")


# the shared head: constants, content -> text, the system message, the role check
_HEAD = (
    "{%- macro text(c) -%}{%- if c is string -%}{{ c | replace('<video>', video) }}{%- else -%}"
    "{%- for p in c -%}{%- if not loop.first -%}{{ '\\n' }}{%- endif -%}"
    "{%- if p['type'] == 'text' -%}{{ p['text'] }}{%- elif p['type'] in ['image', 'image_url'] -%}{{ '<image>' }}"
    "{%- elif p['type'] in ['video', 'video_url'] -%}{%- if not video -%}{{ raise_exception(video_error) }}"
    "{%- endif -%}{{ video }}{%- else -%}{{ raise_exception('unknown content part type ' ~ p['type']) }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}{%- endmacro -%}"
    "{%- macro call(t) -%}{{ (ws if not t.startswith(' ') else '') ~ t }}{%- endmacro -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}{%- set system = text(messages[0]['content']) -%}"
    "{%- set msgs = messages[1:] -%}{%- else -%}{%- set system = default_system -%}{%- set msgs = messages -%}"
    "{%- endif -%}"
    "{%- for m in msgs -%}{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('roles must alternate user, assistant, user, ... (after an optional system message)') }}"
    "{%- endif -%}{%- endfor -%}"
)
_USER, _GEN = "{%- if m['role'] == 'user' -%}", "{%- if not loop.last or add_generation_prompt -%}"
_FOR, _ELSE, _END = "{%- for m in msgs -%}", "{%- else -%}", "{%- endif -%}{%- endfor -%}"
_Q = "text(m['content'])"

_BODIES = {
    "plain": (_FOR + _USER + "{%- if not loop.first -%}{{ raise_exception('the plain template takes one user "
              "message') }}{%- endif -%}{{ '<image>' * " + _Q + ".count('<image>') }}" + _ELSE
              + "{{ " + _Q + " ~ '\\n' }}" + _END),
    "v1": ("{{ bos_token }}" + _FOR + _USER + "{{ call((system ~ ' ' if loop.first else '') ~ 'USER: ' ~ " + _Q
           + ") }}" + _GEN + "{{ ' ASSISTANT:' }}{%- endif -%}" + _ELSE + "{{ ' ' ~ " + _Q + " ~ eos_token }}" + _END),
    "llama_2": (_FOR + _USER + "{{ bos_token ~ call('[INST] ' ~ (('<<SYS>>\\n' ~ system ~ '\\n<</SYS>>\\n\\n') "
                "if loop.first and system else '') ~ " + _Q + " ~ ' [/INST]') }}" + _ELSE
                + "{{ ' ' ~ " + _Q + " ~ ' ' ~ eos_token }}" + _END),
    "mistral": ("{{ bos_token }}" + _FOR + _USER + "{{ call('[INST] ' ~ ((system ~ '\\n\\n') if loop.first and "
                "system else '') ~ " + _Q + " ~ ' [/INST]') }}" + _ELSE + "{{ call(" + _Q + ") ~ eos_token }}" + _END),
    "mistral_vila": (_FOR + _USER + "{{ (bos_token if loop.first else '') ~ '[INST] ' ~ ((system ~ '\\n') if "
                     "loop.first and system else '') ~ " + _Q + " ~ ' [/INST]' }}" + _ELSE
                     + "{{ " + _Q + " ~ eos_token }}" + _END),
    "llama_3": ("{{ '<|begin_of_text|>' }}{%- if system -%}{{ '<|start_header_id|>system<|end_header_id|>\\n\\n' ~ "
                "system ~ '<|eot_id|>' }}{%- endif -%}" + _FOR + _USER
                + "{{ '<|start_header_id|>user<|end_header_id|>\\n\\n' ~ " + _Q + " ~ '<|eot_id|>' }}" + _GEN
                + "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}" + _ELSE
                + "{{ " + _Q + " ~ '<|eot_id|>' }}" + _END),
    "nvgpt": ("{{ '<extra_id_0>System\\n' ~ system ~ '<extra_id_1>' }}" + _FOR + _USER
              + "{{ 'User\\n' ~ " + _Q + " ~ '\\n<extra_id_1>' }}" + _GEN
              + "{{ 'Assistant\\n<extra_id_2>' ~ nvgpt_label ~ '\\n' }}{%- endif -%}" + _ELSE
              + "{{ " + _Q + " ~ '\\n<extra_id_1>' }}" + _END),
    "chatml": ("{%- if system -%}{{ '<|im_start|>system\\n' ~ system ~ '<|im_end|>\\n' }}{%- endif -%}" + _FOR + _USER
               + "{{ '<|im_start|>user\\n' ~ " + _Q + " ~ '<|im_end|>\\n' }}" + _GEN
               + "{{ '<|im_start|>assistant\\n' }}{%- endif -%}" + _ELSE + "{{ " + _Q + " ~ '<|im_end|>\\n' }}" + _END),
}


def chat_template(template: str, tok, *, system: str | None = None, frames_per_video: int = 1) -> str:
    """The Jinja chat template that renders ``template``'s prompt as training tokenised it with ``tok``.

    system: the system prompt training used (None: the template's default); a system message replaces
    it. frames_per_video: images one video part becomes (``DataConfig.frames_per_video``; -1, all of a
    video's frames, has no fixed count: a video part is then an error)."""
    t = templates.get(template)
    if t.name not in _BODIES:
        raise ValueError(f"template {t.name!r} has no chat template here; add it to neva/hf/chat.py")
    sys_prompt = (t.system if system is None else system) if t.uses_system else ""
    video = IMAGE * frames_per_video if frames_per_video > 0 else ""
    consts = {"default_system": sys_prompt, "ws": word_start(tok) if t.name in ("v1", "llama_2", "mistral") else "",
              "video": video, "nvgpt_label": NVGPT_LABEL,
              "video_error": "this model was trained on all of each video's frames (data.num_frames=-1): pass the "
                             "frames you choose as image parts instead of a video part"}
    head = "".join("{%- set " + k + " = " + _lit(v) + " -%}" for k, v in consts.items())
    return head + _HEAD + _BODIES[t.name]


def content_text(content) -> tuple[str, list[dict]]:
    """A message's content (a string, or a list of parts) -> (text with ``<image>`` / ``<video>`` tags,
    its media parts in order), joined as the chat template joins them."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise ValueError(f"message content must be a string or a list of parts, not {type(content).__name__}")
    out, media = [], []
    for p in content:
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "text":
            if not isinstance(p.get("text"), str):
                raise ValueError("a text part needs a string 'text'")
            out.append(p["text"])
        elif kind in IMAGE_PARTS or kind in VIDEO_PARTS:
            out.append(IMAGE if kind in IMAGE_PARTS else VIDEO)
            media.append(p)
        else:
            raise ValueError(f"unknown content part type {kind!r}: use text, image_url or video_url")
    return "\n".join(out), media


def turns_from_messages(messages: list[dict]) -> tuple[str | None, list[Turn], list[dict]]:
    """Chat messages -> (system prompt or None, our turns, media parts in order of appearance)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    system, turns, media = None, [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"messages[{i}] needs a role of system, user or assistant")
        text, parts = content_text(m.get("content", ""))
        if m["role"] == "system":
            if i != 0 or parts:
                raise ValueError("a system message may only come first, and holds text only")
            system = text
            continue
        if m["role"] == "assistant" and parts:
            raise ValueError(f"messages[{i}]: an assistant message holds text only")
        turns.append(Turn(m["role"], text))
        media += parts
    return system, turns, media
