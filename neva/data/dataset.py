"""Records -> checked, tokenised samples with their pixels; the map-style dataset the loader reads.

``NevaDataset`` reads and validates every record up front (a *scan*: parse, render, tokenise,
check media files exist and their headers read: cheap, no decoding) so a bad sample is reported
before training starts, with its id, and so packing knows every length. Workers re-tokenise
(deterministic) and decode the media.

``on_bad_sample``: ``error`` raises ``BadSample`` naming the sample; ``skip`` drops it, counts it in
``stats`` and logs it. A sample whose media turn out corrupt only when a worker decodes them is
skipped the same way, by the loader (``Loader.skipped``). More skipped samples than
``data.max_skip_fraction`` of the data (at least one is allowed) is an error naming the first ones
(``check_skips``): a skip setting must never hide a dataset that does not load.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from neva.batch import Media, media_cat, media_count, media_map
from neva.data import images as imaging
from neva.data import templates, tokenizers
from neva.data.config import DataConfig
from neva.data.records import Record, read
from neva.data.tokenize import BadSample, Encoded, encode
from neva.data.video import VideoSource, timestamp_text
from neva.progress import Progress

log = logging.getLogger("neva.data")


@dataclass
class Source:
    """Where one data file's media live."""

    image_root: Path
    video: VideoSource | None


@dataclass
class Sample:
    """What a worker returns for one record: tensors for the collate, or the reason it was skipped."""

    id: str
    input_ids: torch.Tensor | None = None          # int64[T]
    labels: torch.Tensor | None = None             # int64[T]
    pixel_values: Media | None = None              # float32[n_media_images, 3, H, W] (per tower: a dict)
    video_frames: torch.Tensor | None = None       # bool[n_media_images]: True for a video's frames
    skipped: str | None = None
    error: str | None = None                       # on_bad_sample=error: why it failed (the Loader raises it)
    truncated: int = 0


@dataclass
class ScanStats:
    records: int = 0
    skipped: list[str] = field(default_factory=list)
    truncated: int = 0
    truncated_tokens: int = 0

    def summary(self) -> str:
        return (f"{self.records} samples kept, {len(self.skipped)} skipped, {self.truncated} truncated "
                f"({self.truncated_tokens} tokens cut)")


LOAD_ERRORS = (BadSample, FileNotFoundError, ValueError, OSError)   # what a bad sample raises when loaded


def named(rec: Record, e: Exception) -> str:
    """An error's message, naming the sample unless it already does."""
    return str(e) if rec.name in str(e) else f"{rec.name}: {e}"


def _paths(spec: str | list[str]) -> list[Path]:
    items = spec if isinstance(spec, (list, tuple)) else [p for p in str(spec).split(",") if p.strip()]
    return [Path(p.strip()) for p in items]


class NevaDataset(torch.utils.data.Dataset):
    """``data_path``: one file, a comma-separated list, or a list. Index i -> ``Sample``."""

    def __init__(self, cfg: DataConfig, model_cfg, data_path: str | list[str] | None = None, tok=None,
                 progress: bool = False):
        self.cfg = cfg.validate()
        self.image_token_id = model_cfg.image_token_id
        self.tokens_per_image = model_cfg.tokens_per_image
        self.tokens_per_frame = getattr(model_cfg, "tokens_per_frame", self.tokens_per_image)
        self.choice = self.cfg.frame_choice()
        self.spec = imaging.spec_for(model_cfg.vision, cfg.image_mode)
        self.tok = tok if tok is not None else tokenizers.load(cfg.tokenizer)
        self.template = templates.get(cfg.template)
        templates.check_tokenizer(self.template, self.tok)
        self.records: list[Record] = []
        self.sources: list[Source] = []
        self.source_of: list[int] = []
        self.frames: list[list[int]] = []      # media images per media tag, per sample
        self.times: list[list[list[float]]] = []   # per sample, per <video>: its frames' timestamps (seconds)
        lengths = []
        self.stats = ScanStats()
        for path in _paths(data_path if data_path is not None else cfg.data_path):
            self._scan_file(path, lengths, progress)
        self.lengths = np.asarray(lengths, np.int64)
        self.stats.records = len(self.records)
        if self.stats.skipped or self.stats.truncated:
            log.warning("data scan: %s (max_seq_len=%d)", self.stats.summary(), cfg.max_seq_len)
        self.check_skips()
        if not self.records:
            raise ValueError(f"no usable samples in {cfg.data_path if data_path is None else data_path}")

    # ------------------------------------------------------------------------------------ scan
    def check_skips(self, later: list[str] = ()) -> None:
        """Raise BadSample if the scan's skips plus ``later`` ones (found when decoding) are more than
        ``data.max_skip_fraction`` of the samples (at least one is allowed), naming the first."""
        bad = self.stats.skipped + list(later)
        total = len(self.records) + len(self.stats.skipped)
        limit = max(1, int(self.cfg.max_skip_fraction * total))
        if len(bad) > limit:
            raise BadSample(f"{len(bad)} of {total} samples could not be used, more than data.max_skip_fraction="
                            f"{self.cfg.max_skip_fraction} allows ({limit}); the first: " + " | ".join(bad[:3])
                            + (" ..." if len(bad) > 3 else "") + ". Fix or remove them, or raise data.max_skip_fraction")

    def _bad(self, msg: str) -> None:
        if self.cfg.on_bad_sample == "error":
            raise BadSample(msg)
        self.stats.skipped.append(msg)
        log.warning("skipping %s", msg)

    def _scan_file(self, path: Path, lengths: list, progress: bool) -> None:
        recs, skipped = read(path, self.cfg.on_bad_sample)
        if not recs and not skipped:
            log.warning("data file %s holds no records", path)
        for msg in skipped:
            self._bad(msg)
        root = path.parent
        vroot = Path(self.cfg.video_folder) if self.cfg.video_folder else root
        src = Source(Path(self.cfg.image_folder) if self.cfg.image_folder else root,
                     VideoSource(vroot) if any(r.videos for r in recs) else None)
        self.sources.append(src)
        bar = Progress(len(recs), f"scan {path.name}", unit="sample", on=progress, leave=False)
        for rec in recs:
            bar.update()
            try:
                self._check_media(rec, src)
                frames, times = self._frames(rec, src)
                enc = self._encode(rec, frames, times)
            except (BadSample, FileNotFoundError, ValueError) as e:
                self._bad(named(rec, e))
                continue
            if enc.truncated:
                self.stats.truncated += 1
                self.stats.truncated_tokens += enc.truncated
            self.records.append(rec)
            self.source_of.append(len(self.sources) - 1)
            self.frames.append(frames)
            self.times.append(times)
            lengths.append(len(enc))
        bar.close()

    def _check_media(self, rec: Record, src: Source) -> None:
        """Each media file exists and its header reads (no decoding: a truncated body shows at load)."""
        for p in rec.images:
            if not (src.image_root / p).is_file():
                raise FileNotFoundError(f"{rec.name}: image file {src.image_root / p} does not exist")
            imaging.check_header(src.image_root / p, rec.name)
        for v in rec.videos:
            if not src.video.exists(v):
                raise FileNotFoundError(f"{rec.name}: video {src.video.where(v)} does not exist")
            src.video.check_header(v, rec.name)

    def _frames(self, rec: Record, src: Source) -> tuple[list[int], list[list[float]]]:
        """Media images per media tag, and each video's frame timestamps (read from the video's header
        when the count depends on it or timestamps are asked for; none otherwise)."""
        out, times, vi = [], [], 0
        for tag in rec.media_tags():
            if tag == "<image>":
                out.append(1)
                continue
            if self.choice.fixed is not None and not self.cfg.frame_timestamps:
                out.append(self.choice.fixed)
            else:
                idx, ts = src.video.choose(rec.videos[vi], self.choice, rec.name)
                out.append(len(idx))
                times.append(ts)
            vi += 1
        return out, times

    def _turns(self, rec: Record, times: list[list[float]]) -> list:
        """The record's turns; with ``frame_timestamps`` each <video> tag followed by its frames' times."""
        if not self.cfg.frame_timestamps:
            return list(rec.turns)
        it, out = iter(times), []
        for t in rec.turns:
            parts = t.text.split("<video>")
            out.append(replace(t, text=parts[0] + "".join("<video>" + timestamp_text(next(it)) + p for p in parts[1:])))
        return out

    def _encode(self, rec: Record, frames: list[int], times: list[list[float]]) -> Encoded:
        try:
            pieces = templates.render(self.template, self._turns(rec, times), bos=self.tok.bos_token or "",
                                      eos=self.tok.eos_token or "",
                                      system=self.cfg.system_prompt if self.cfg.system_prompt is not None else rec.system)
        except ValueError as e:
            raise BadSample(f"{rec.name}: {e}") from e
        return encode(pieces, self.tok, image_token_id=self.image_token_id, tokens_per_image=self.tokens_per_image,
                      frames=frames, max_seq_len=self.cfg.max_seq_len, name=rec.name,
                      tokens_per_frame=self.tokens_per_frame)

    # ------------------------------------------------------------------------------------ load
    def __len__(self) -> int:
        return len(self.records)

    def encoded(self, i: int) -> Encoded:
        return self._encode(self.records[i], self.frames[i], self.times[i])

    def frame_flags(self, i: int, n_images: int | None = None) -> torch.Tensor:
        """bool[N]: which of sample i's first ``n_images`` media images are video frames."""
        flags = [tag == "<video>" for tag, n in zip(self.records[i].media_tags(), self.frames[i]) for _ in range(n)]
        return torch.tensor(flags[:n_images], dtype=torch.bool)

    def media(self, i: int, n_spans: int | None = None) -> Media:
        """float32[N, 3, H, W] (per tower for kind=fused): the images and video frames of the first
        ``n_spans`` media tags."""
        rec, src = self.records[i], self.sources[self.source_of[i]]
        tags = rec.media_tags()[:n_spans]
        out, ii, vi = [], 0, 0
        for tag in tags:
            if tag == "<image>":
                img = imaging.open_image(src.image_root / rec.images[ii], rec.name)
                out.append(media_map(lambda t: t[None], imaging.process(img, self.spec)))
                ii += 1
            else:
                fr, _ = src.video.sample(rec.videos[vi], self.choice, rec.name)
                out.append(media_cat([media_map(lambda t: t[None], imaging.process(Image.fromarray(f), self.spec))
                                      for f in fr]))
                vi += 1
        return media_cat(out) if out else imaging.empty(self.spec)

    def __getitem__(self, i: int) -> Sample:
        rec = self.records[i]
        try:
            enc = self.encoded(i)
            pix = self.media(i, len(enc.spans))
            want = sum(s.frames for s in enc.spans)
            if media_count(pix) != want:
                raise BadSample(f"{rec.name}: decoded {media_count(pix)} media images where the tokens hold {want}")
        except LOAD_ERRORS as e:
            if self.cfg.on_bad_sample == "error":
                raise
            return Sample(rec.id, skipped=named(rec, e))
        return Sample(rec.id, torch.from_numpy(enc.input_ids), torch.from_numpy(enc.labels), pix,
                      self.frame_flags(i, media_count(pix)), truncated=enc.truncated)

    def prompt(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For generation: sample i's turns up to (not including) its last gpt reply, rendered with the
        open assistant prefix -> (input_ids int64[T], pixel_values float32[N, 3, H, W] or per tower). The reply it
        should produce is ``records[i].turns[-1].text`` (``records[i].meta`` has ``answer``/``qtype``)."""
        rec = self.records[i]
        turns = self._turns(rec, self.times[i])
        if turns[-1].role == "assistant":
            turns = turns[:-1]
        pieces = templates.render(self.template, turns, bos=self.tok.bos_token or "", eos=self.tok.eos_token or "",
                                  system=self.cfg.system_prompt if self.cfg.system_prompt is not None else rec.system,
                                  generation=True)
        n_media = sum(len(templates.media_tags_in(t.text)) for t in turns)
        enc = encode(pieces, self.tok, image_token_id=self.image_token_id, tokens_per_image=self.tokens_per_image,
                     frames=self.frames[i][:n_media], name=rec.name, require_trained=False,
                     tokens_per_frame=self.tokens_per_frame)
        return torch.from_numpy(enc.input_ids), self.media(i, n_media)

    def stop_strings(self) -> list[str]:
        """What ends an assistant reply under this template (the trained end token), for generation."""
        return [self.template.end(self.tok.eos_token or "")]
