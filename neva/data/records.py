"""LLaVA conversation records from JSON (a list) or JSONL (one object a line), validated.

A record: ``{"id", "image": str | [str], "video": str | [str] | [[frame images]], "conversations":
[{"from": "human" | "gpt" | "system", "value": "<image>\\n..."}], "system"?: str, ...}``. Any other
keys (``qtype``, ``answer``, ...) are kept in ``Record.meta``. ``human``/``user`` and ``gpt``/
``assistant`` are accepted; a ``system`` turn (first) or a top-level ``system`` key sets the system prompt.
Every problem raises ``BadSample`` naming the file, the line (JSONL) or index (JSON), and the id.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from neva.data.templates import MEDIA_TAGS, Turn
from neva.data.tokenize import BadSample
from neva.data.video import IMAGE_EXTS

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass(frozen=True)
class Record:
    id: str
    turns: tuple[Turn, ...]
    images: tuple[str, ...] = ()
    videos: tuple = ()                   # per <video>: a path (file or frame folder) or a tuple of frame images
    system: str | None = None
    where: str = ""                      # "train.jsonl:12" (line) or "train.json[12]" (index)
    meta: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def name(self) -> str:
        """How errors name this sample."""
        return f"sample {self.id!r} ({self.where})"

    def media_tags(self) -> list[str]:
        """Media tags in order of appearance over the user turns."""
        from neva.data.templates import media_tags_in

        return [t for turn in self.turns for t in media_tags_in(turn.text)]


def _as_list(v, what: str, name: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,)
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return tuple(v)
    raise BadSample(f"{name}: {what!r} must be a path or a list of paths, got {type(v).__name__}")


def _videos(v, n_tags: int, name: str) -> tuple:
    """The ``video`` key: a path (a video file or a folder of frames) or a list of them; a list of
    frame-image lists, one per video; or, for a sample with one <video>, a flat list of its frames."""
    if isinstance(v, list) and v and all(isinstance(x, list) and x and all(isinstance(f, str) for f in x) for x in v):
        return tuple(tuple(x) for x in v)
    if (isinstance(v, list) and n_tags == 1 and len(v) > 1 and all(isinstance(x, str) for x in v)
            and all(x.lower().endswith(IMAGE_EXTS) for x in v)):
        return (tuple(v),)
    try:
        return _as_list(v, "video", name)
    except BadSample:
        raise BadSample(f"{name}: 'video' must be a path (a video or a folder of frames), a list of them, or a "
                        f"list of frame-image lists, got {v!r:.80}") from None


def parse(obj, where: str) -> Record:
    """One JSON object -> Record; raise BadSample naming ``where`` and the id."""
    if not isinstance(obj, dict):
        raise BadSample(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
    rid = str(obj.get("id", where))
    name = f"sample {rid!r} ({where})"
    conv = obj.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise BadSample(f"{name}: 'conversations' must be a non-empty list of {{'from', 'value'}} turns")
    system = obj.get("system")
    turns = []
    for i, t in enumerate(conv):
        if not isinstance(t, dict) or "from" not in t or not isinstance(t.get("value"), str):
            raise BadSample(f"{name}: turn {i} must be an object with 'from' and a string 'value'")
        who = t["from"]
        if who == "system":
            if i != 0:
                raise BadSample(f"{name}: a system turn may only come first (found at turn {i})")
            system = t["value"]
            continue
        if who not in ROLES:
            raise BadSample(f"{name}: turn {i} is from {who!r}; use human, gpt or system")
        turns.append(Turn(ROLES[who], t["value"], t.get("label")))
    if not any(t.role == "assistant" for t in turns):
        raise BadSample(f"{name}: the conversation has no assistant (gpt) turn: nothing would be trained")
    for i, t in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if t.role != want:
            raise BadSample(f"{name}: turns must alternate human, gpt, ...; turn {i} is {t.role} where {want} was "
                            f"expected")
        if t.role == "assistant" and any(tag in t.text for tag in MEDIA_TAGS):
            raise BadSample(f"{name}: a media tag appears in gpt turn {i}; media go in human turns")
    n_video_tags = sum(t.text.count("<video>") for t in turns)
    rec = Record(rid, tuple(turns), _as_list(obj.get("image"), "image", name),
                 _videos(obj.get("video"), n_video_tags, name), system, where,
                 {k: v for k, v in obj.items() if k not in ("id", "image", "video", "conversations", "system")})
    tags = rec.media_tags()
    for tag, have, key in (("<image>", rec.images, "image"), ("<video>", rec.videos, "video")):
        n = tags.count(tag)
        if n != len(have):
            more = "more" if n > len(have) else "fewer"
            raise BadSample(f"{name}: {n} {tag} tags but {len(have)} entries in {key!r} ({more} tags than "
                            f"{key}s); write one {tag} where each {key} goes")
    return rec


def read(path: str | Path, on_bad: str = "error", log=None) -> tuple[list[Record], list[str]]:
    """All records of a JSON or JSONL file -> (records, skip messages). ``on_bad="skip"`` drops bad
    records (and malformed lines) with a message each; ``"error"`` raises on the first."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    items: list[tuple[str, object]] = []
    skipped: list[str] = []

    def bad(msg: str):
        if on_bad == "error":
            raise BadSample(msg)
        skipped.append(msg)
        if log:
            log(f"skipping: {msg}")

    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadSample(f"{path}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
        if not isinstance(data, list):
            raise BadSample(f"{path}: a .json data file must hold a list of records")
        items = [(f"{path.name}[{i}]", obj) for i, obj in enumerate(data)]
    else:
        for ln, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append((f"{path.name}:{ln}", json.loads(line)))
            except json.JSONDecodeError as e:
                bad(f"{path}:{ln}: malformed JSON line ({e.msg} at column {e.colno})")
    records = []
    for where, obj in items:
        try:
            records.append(parse(obj, where))
        except BadSample as e:
            bad(str(e))
    return records, skipped
