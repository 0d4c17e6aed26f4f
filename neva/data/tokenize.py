"""Template pieces -> (input_ids, labels) with media spans expanded, checked, and truncated.

How a sample is tokenised, and why it cannot silently disagree with its template:
* The rendered text is cut at media tags, and before every ``own_call`` piece, into chunks. Each
  chunk is tokenised *whole*, with character offsets, so tokens are exactly what tokenising that
  string gives (no length arithmetic per round, the source of LLaVA's silently-zeroed-loss bug). A
  chunk that starts the text or an ``own_call`` piece is tokenised as a string of its own (a
  sentencepiece tokenizer starts it with ``▁``, as ``mistral-common`` and Meta's ``llama`` encode each
  message); a chunk that follows a media span is tokenised as text that follows a special token (as
  HF's LlavaProcessor sees text after its ``<image>`` token).
* A token is trained iff its characters overlap a trained piece. A token that straddles a
  template boundary may only carry whitespace from the untrained side (``ASSISTANT: red`` ->
  ``▁red``); anything else raises, naming the sample.
* Each chunk's tokens must decode back to the chunk's text (up to the word-start a legacy
  sentencepiece tokenizer puts after a special token), every non-space character must be covered by a
  token, and at least one label must be trained, else ``BadSample``.
* Each media tag becomes ``frames x tokens_per_image`` copies of ``image_token_id`` (a ``<video>``'s
  frames ``tokens_per_frame`` each when the projector pools frames).
* Truncation to ``max_seq_len`` is explicit (reported in ``Encoded.truncated``) and never cuts a
  media span: the cut moves to the span's start and the media after it are dropped.
"""
from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field

import numpy as np

from neva.data.templates import MEDIA_TAGS, Piece
from neva.batch import IGNORE

_TAG_RE = re.compile("|".join(re.escape(t) for t in MEDIA_TAGS))


class BadSample(ValueError):
    """A sample that cannot train as written; the message names the sample and its source."""


@dataclass
class Span:
    tag: str        # "<image>" | "<video>"
    frames: int     # media images (video frames) this span holds
    start: int      # token positions [start, end) in input_ids
    end: int


@dataclass
class Encoded:
    input_ids: np.ndarray                   # int64[T]
    labels: np.ndarray                      # int64[T], IGNORE where not trained
    spans: list[Span] = field(default_factory=list)
    truncated: int = 0                      # tokens cut off by max_seq_len

    @property
    def n_trained(self) -> int:
        return int((self.labels != IGNORE).sum())

    def __len__(self) -> int:
        return len(self.input_ids)


def _chunks(pieces: list[Piece], name: str):
    """-> list of ("text", str, char-level trained mask, starts a call) | ("media", tag), in order."""
    out, text, mask = [], [], []
    fresh = [True]                       # the next text chunk starts a tokenizer call (not after media)

    def flush():
        if text:
            out.append(("text", "".join(text), np.concatenate(mask), fresh[0]))
            text.clear(), mask.clear()
            fresh[0] = True

    for p in pieces:
        if p.own_call:
            flush()
            fresh[0] = True
        if p.trained:
            if _TAG_RE.search(p.text):
                raise BadSample(f"{name}: a media tag appears in an assistant reply ({p.text[:60]!r}); media go in "
                                f"human turns")
            text.append(p.text), mask.append(np.ones(len(p.text), bool))
            continue
        pos = 0
        for m in _TAG_RE.finditer(p.text):
            if m.start() > pos:
                text.append(p.text[pos:m.start()]), mask.append(np.zeros(m.start() - pos, bool))
            flush()
            out.append(("media", m.group()))
            fresh[0] = False
            pos = m.end()
        if pos < len(p.text):
            text.append(p.text[pos:]), mask.append(np.zeros(len(p.text) - pos, bool))
    flush()
    return out


_ANCHORS: dict[int, tuple] = {}   # id(tok) -> (weakref to tok, anchor): a reused id is detected
_SPECIALS: dict[int, tuple] = {}  # id(tok) -> (weakref to tok, regex of its special / added tokens + " ")


def _squeeze_after_specials(tok, text: str) -> str:
    """``text`` without the single space right after each special token: a legacy sentencepiece
    tokenizer starts the text after a special token with its word-start marker, which decodes as a
    space that the rendered text does not have."""
    hit = _SPECIALS.get(id(tok))
    if hit is None or hit[0]() is not tok:
        specials = sorted({*getattr(tok, "all_special_tokens", []), *getattr(tok, "get_added_vocab", dict)()},
                          key=len, reverse=True)
        hit = (weakref.ref(tok), re.compile("(" + "|".join(re.escape(s) for s in specials if s) + ") ") if specials else None)
        _SPECIALS[id(tok)] = hit
    return text if hit[1] is None else hit[1].sub(r"\1", text)


def anchor_token(tok) -> str:
    """A special token whose successor is tokenised like text after a media token."""
    hit = _ANCHORS.get(id(tok))
    if hit is not None and hit[0]() is tok:
        return hit[1]
    for t in [tok.bos_token, tok.eos_token, *getattr(tok, "all_special_tokens", [])]:
        if t and len(tok(t, add_special_tokens=False)["input_ids"]) == 1:
            _ANCHORS[id(tok)] = (weakref.ref(tok), t)
            return t
    raise ValueError("the tokenizer has no single-id special token to tokenise text that follows a media span")


def _encode_chunk(tok, text: str, after_special: bool, name: str) -> tuple[list[int], list[tuple[int, int]]]:
    if not after_special:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    a = anchor_token(tok)
    enc = tok(a + text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offs = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    if not offs or offs[0] != (0, len(a)):
        raise BadSample(f"{name}: could not tokenise the text after a media span on its own ({text[:40]!r})")
    return ids[1:], [(s - len(a), e - len(a)) for s, e in offs[1:]]


def _check_chunk(tok, text: str, ids: list[int], offs, trained_chars: np.ndarray, first: bool, name: str):
    """-> per-token trained flags; raise BadSample where text, tokens and labels disagree."""
    covered = np.zeros(len(text), bool)
    flags = []
    for s, e in offs:
        covered[s:e] = True
        seg = trained_chars[s:e]
        t = bool(seg.any())
        if t and not seg.all() and "".join(c for c, m in zip(text[s:e], seg) if not m).strip():
            raise BadSample(f"{name}: the token {text[s:e]!r} spans a prompt/reply boundary; the template's trained "
                            f"text must start and end on token boundaries")
        flags.append(t)
    lost = [c for c, cov in zip(text, covered) if not cov and not c.isspace()]
    if lost:
        raise BadSample(f"{name}: the tokenizer dropped characters {''.join(lost[:20])!r} of the rendered text")
    if first:
        back = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    else:  # decode after the anchor, so a decoder that strips a leading space leaves this text alone
        a = anchor_token(tok)
        back = tok.decode(tok.convert_tokens_to_ids([a]) + ids, skip_special_tokens=False,
                          clean_up_tokenization_spaces=False)
        back = back[len(a):] if back.startswith(a) else back
    if back != text and not (first and back.lstrip() == text.lstrip()) and \
            _squeeze_after_specials(tok, back).lstrip() != _squeeze_after_specials(tok, text).lstrip():
        i = next((k for k, (a, b) in enumerate(zip(back, text)) if a != b), min(len(back), len(text)))
        raise BadSample(f"{name}: tokens decode to text that differs from the rendered template at char {i}: "
                        f"{back[max(0, i - 20):i + 20]!r} vs {text[max(0, i - 20):i + 20]!r}")
    return flags


def encode(pieces: list[Piece], tok, *, image_token_id: int, tokens_per_image: int, frames: list[int],
           max_seq_len: int | None = None, name: str = "sample", require_trained: bool = True,
           tokens_per_frame: int | None = None) -> Encoded:
    """Tokenise rendered pieces. ``frames[k]``: media images of the k-th media tag (1 for an image);
    a ``<video>``'s are ``tokens_per_frame`` tokens each (default ``tokens_per_image``)."""
    ids: list[int] = []
    labels: list[int] = []
    spans: list[Span] = []
    chunks = _chunks(pieces, name)
    n_media = sum(c[0] == "media" for c in chunks)
    if n_media != len(frames):
        raise BadSample(f"{name}: the text has {n_media} media tags but {len(frames)} media were given")
    k = 0
    for i, c in enumerate(chunks):
        if c[0] == "media":
            n = frames[k] * (tokens_per_image if c[1] == "<image>" or tokens_per_frame is None else tokens_per_frame)
            spans.append(Span(c[1], frames[k], len(ids), len(ids) + n))
            ids += [image_token_id] * n
            labels += [IGNORE] * n
            k += 1
            continue
        _, text, trained_chars, fresh = c
        cids, offs = _encode_chunk(tok, text, not fresh, name)
        flags = _check_chunk(tok, text, cids, offs, trained_chars, first=fresh, name=name)
        if image_token_id in cids:
            raise BadSample(f"{name}: the text tokenises to image_token_id={image_token_id}, which must be an id the "
                            f"tokenizer never produces (e.g. len(tokenizer) = {len(tok)})")
        ids += cids
        labels += [t if f else IGNORE for t, f in zip(cids, flags)]
    out = Encoded(np.asarray(ids, np.int64), np.asarray(labels, np.int64), spans)
    if max_seq_len is not None and len(out) > max_seq_len:
        out = truncate(out, max_seq_len)
    if require_trained and out.n_trained == 0:
        why = f" after truncation to max_seq_len={max_seq_len}" if out.truncated else ""
        raise BadSample(f"{name}: no token is trained{why}: the sample would add nothing but a zero loss")
    return out


def truncate(e: Encoded, max_len: int) -> Encoded:
    """Cut to at most ``max_len`` tokens, never inside a media span (whole spans are dropped)."""
    cut = max_len
    for s in e.spans:
        if s.start < cut < s.end:
            cut = s.start
    spans = [s for s in e.spans if s.end <= cut]
    return Encoded(e.input_ids[:cut], e.labels[:cut], spans, e.truncated + len(e) - cut)
