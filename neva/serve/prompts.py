"""OpenAI chat messages -> the prompt our data pipeline would make: ids (image tokens expanded) and
pixels, with every way a request can be wrong reported as a ``RequestError`` that names it.

Content parts: ``text``; ``image_url`` (``{"url": "data:image/png;base64,..."}``, or a local path /
``file://`` URL under ``--allowed-local-media-path``; the server fetches nothing from the network);
``video_url`` (vLLM's part, same URL forms; frames chosen as training chose them). Parts join as the
exported chat template joins them (``neva/hf/chat.py``). A model with a training record (our run
folders, and HF folders we exported: ``config.json["neva"]``) is prompted with its training template
and image mode; any other HF LLaVA folder with its own chat template, images square.
"""
from __future__ import annotations

import base64
import binascii
import io
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from neva.batch import Media, media_cat, media_map
from neva.config import ModelConfig
from neva.data import images as imaging
from neva.data import templates, tokenize
from neva.data.config import DataConfig
from neva.data.templates import Piece
from neva.data.video import VideoSource
from neva.hf import chat


class RequestError(ValueError):
    """A bad request: HTTP ``status`` and an OpenAI-style error body."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Prompt:
    ids: list[int]
    pixels: Media | None          # float[N, 3, H, W] (per tower), N = images + video frames, in order


@dataclass
class Prompter:
    """Turns ``messages`` into a ``Prompt`` as training did (``data``), or by ``chat_template`` if None."""

    cfg: ModelConfig
    tok: object
    data: DataConfig | None
    chat_template: str | None = None
    media_root: Path | None = None      # local paths are read only under this folder (None: refused)
    max_media: int = 8                  # image and video parts per request
    max_prompt_tokens: int | None = None

    def __post_init__(self):
        if self.data is None and not self.chat_template:
            raise ValueError("the model folder has neither a neva training record (config.json 'neva') nor a chat "
                             "template: export it with neva.hf.save(..., data=...) or add a chat_template")
        self.spec = imaging.spec_for(self.cfg.vision, self.data.image_mode if self.data else "square")
        limit = self.cfg.llm.max_position - 1
        self.max_prompt_tokens = min(self.max_prompt_tokens or limit, limit)

    def __call__(self, messages) -> Prompt:
        try:
            system, turns, parts = chat.turns_from_messages(messages)
        except ValueError as e:
            raise RequestError(str(e), param="messages") from None
        if turns and turns[-1].role != "user":
            raise RequestError("the last message must be from the user (the server answers it)", param="messages")
        if len(parts) > self.max_media:
            raise RequestError(f"{len(parts)} images and videos in one request; this server takes at most "
                               f"{self.max_media} (--max-media-per-prompt)", param="messages")
        media = [self._image(p) if p["type"] in chat.IMAGE_PARTS else self._video(p) for p in parts]
        frames = [1 if isinstance(m, Image.Image) else len(m) for m in media]
        try:
            pieces = self._pieces(messages, system, turns)
            enc = tokenize.encode(pieces, self.tok, image_token_id=self.cfg.image_token_id,
                                  tokens_per_image=self.cfg.tokens_per_image, frames=frames, require_trained=False,
                                  name="request")
        except ValueError as e:        # a media tag typed in the text without its part, a bad turn order, ...
            raise RequestError(str(e), param="messages") from None
        if len(enc) > self.max_prompt_tokens:
            raise RequestError(f"the prompt is {len(enc)} tokens (images included: {self.cfg.tokens_per_image} per "
                               f"image or frame); this model takes at most {self.max_prompt_tokens}",
                               param="messages", code="context_length_exceeded")
        pix = self._pixels(media)
        return Prompt(enc.input_ids.tolist(), media_cat(pix) if pix else None)

    def _pieces(self, messages, system, turns) -> list[Piece]:
        if self.data is not None:
            return templates.render(self.data.template, turns, bos=self.tok.bos_token or "",
                                    eos=self.tok.eos_token or "",
                                    system=system if system is not None else self.data.system_prompt, generation=True)
        msgs = ([{"role": "system", "content": system}] if system is not None else []) + \
            [{"role": t.role, "content": t.text} for t in turns]
        return [Piece(self.tok.apply_chat_template(msgs, chat_template=self.chat_template,
                                                   add_generation_prompt=True, tokenize=False))]

    def _pixels(self, media) -> list[Media]:
        out = []
        for m in media:
            frames = [m] if isinstance(m, Image.Image) else [Image.fromarray(f) for f in m]
            out += [media_map(lambda t: t[None], imaging.process(f, self.spec)) for f in frames]
        return out

    # ------------------------------------------------------------------------------ media
    def _bytes(self, part: dict, what: str) -> tuple[bytes | None, Path | None]:
        """(bytes of a data URL, or None and the local path) of an ``image_url`` / ``video_url`` part."""
        inner = part.get(part["type"])
        url = inner.get("url") if isinstance(inner, dict) else inner
        if not isinstance(url, str) or not url:
            raise RequestError(f"a {part['type']} part needs {{'{part['type']}': {{'url': ...}}}}", param="messages")
        if url.startswith("data:"):
            head, _, data = url.partition(",")
            if ";base64" not in head:
                raise RequestError(f"{what} data URL must be base64 (data:<mime>;base64,<data>)", param="messages")
            try:
                return base64.b64decode(data, validate=True), None
            except (binascii.Error, ValueError) as e:
                raise RequestError(f"{what} data URL holds bad base64 ({e})", param="messages") from None
        if url.startswith(("http://", "https://")):
            raise RequestError(f"{what}: this server fetches nothing from the network; send a data URL "
                               f"(data:image/png;base64,...) or a local path", param="messages")
        path = Path(url[len("file://"):] if url.startswith("file://") else url)
        if self.media_root is None:
            raise RequestError(f"{what}: local paths are off; start the server with --allowed-local-media-path DIR, "
                               f"or send a data URL", param="messages")
        path = path.resolve()
        if not path.is_relative_to(self.media_root):
            raise RequestError(f"{what}: {path} is outside --allowed-local-media-path {self.media_root}",
                               param="messages")
        if not path.is_file():
            raise RequestError(f"{what}: no file {path}", param="messages")
        return None, path

    def _image(self, part: dict) -> Image.Image:
        data, path = self._bytes(part, "image_url")
        try:
            with Image.open(io.BytesIO(data) if data is not None else path) as im:
                im.load()
                return imaging.to_rgb(im)
        except Exception as e:  # noqa: BLE001 - PIL raises many types for a file that is not an image
            raise RequestError(f"image_url: not an image PIL can read ({type(e).__name__}: {e})",
                               param="messages") from None

    def _video(self, part: dict):
        """uint8[F, H, W, 3]: the frames training would take (``num_frames``, ``splice_single_frame``)."""
        if self.data is None:
            raise RequestError("video_url: this model has no training record saying how it takes video",
                               param="messages")
        data, path = self._bytes(part, "video_url")
        try:
            if path is not None:
                return VideoSource(path.parent).frames(path.name, self.data.num_frames, self.data.splice_single_frame)
            with tempfile.TemporaryDirectory() as d:
                (Path(d) / "v.mp4").write_bytes(data)
                return VideoSource(d).frames("v.mp4", self.data.num_frames, self.data.splice_single_frame)
        except ImportError as e:
            raise RequestError(f"video_url: the server cannot decode video ({e}); install neva[video]",
                               status=501) from None
        except Exception as e:  # noqa: BLE001 - decord raises its own error types for a bad file
            raise RequestError(f"video_url: not a video this server can decode ({type(e).__name__}: {e})",
                               param="messages") from None
