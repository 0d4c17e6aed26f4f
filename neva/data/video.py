"""Videos -> frames (VideoNeVA, LLaVA-Video): decord reads video files from a folder or from a tar
indexed once; a video may also be a folder (or a list) of pre-extracted frame images.

Which frames (``FrameChoice``), each with the name NeMo or LLaVA-Video gives it:
  splice_single_frame  (NeMo) first | middle | last: one frame
  num_frames           (NeMo) ``linspace(0, len - 1, min(len, num_frames))`` as integers, padded to
                       ``num_frames`` by repeating the last frame; -1 takes every frame
  fps, max_frames      (LLaVA-Video's ``video_fps`` and ``frames_upbound``) every ``round(native fps /
                       fps)``-th frame (1 fps: one a second); a video longer than ``max_frames`` of
                       those falls back to ``max_frames`` frames uniformly over the whole video
A frame's timestamp is its index over the native frame rate (a frame folder's rate is
``folder_fps``: LLaVA-Video extracts at 1 fps); ``timestamp_text`` writes them after the ``<video>``
tag (LLaVA-Video's ``add_time_instruction``, shortened).

Names: ``"clip.mp4"`` a video file; ``"clip_001"`` a folder of frame images (sorted by name; in a
tar, the members under ``clip_001/``); a tuple of image paths, one per frame. A tar is scanned once
for member offsets; each read is a seek into the file.
"""
from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
Name = str | tuple          # a video file or frame folder, or a tuple of frame images


def frame_indices(n_total: int, num_frames: int, splice: str | None = None) -> list[int]:
    """Indices into a video of ``n_total`` frames (may repeat the last index to pad)."""
    if n_total <= 0:
        raise ValueError("the video has no frames")
    if splice == "first":
        return [0]
    if splice == "middle":
        return [n_total // 2]
    if splice == "last":
        return [n_total - 1]
    if splice is not None:
        raise ValueError(f"splice_single_frame={splice!r}: use first, middle, last or None")
    if num_frames == -1:
        return list(range(n_total))
    idx = np.linspace(0, n_total - 1, min(n_total, num_frames), dtype=int).tolist()
    return idx + [idx[-1]] * (num_frames - len(idx))


def fps_indices(n_total: int, native_fps: float, fps: float, max_frames: int) -> list[int]:
    """LLaVA-Video's sampling: every ``round(native_fps / fps)``-th frame; more than ``max_frames``
    of them -> ``max_frames`` uniformly over the whole video."""
    if n_total <= 0:
        raise ValueError("the video has no frames")
    step = max(1, round(native_fps / fps))
    idx = list(range(0, n_total, step))
    if len(idx) > max_frames:
        idx = np.linspace(0, n_total - 1, max_frames, dtype=int).tolist()
    return idx


def timestamp_text(times: list[float]) -> str:
    """What follows a ``<video>`` tag when ``data.frame_timestamps``: `` sampled at 0.0s, 1.0s, ...``"""
    return " sampled at " + ", ".join(f"{t:.1f}s" for t in times)


@dataclass(frozen=True)
class FrameChoice:
    """How frames are picked from one video (the module docstring gives each rule's origin)."""

    num_frames: int = 4
    splice: str | None = None
    fps: float | None = None
    max_frames: int = 32
    folder_fps: float = 1.0

    @property
    def fixed(self) -> int | None:
        """Frames per video when it does not depend on the video (else None)."""
        if self.splice:
            return 1
        return None if self.fps is not None or self.num_frames == -1 else self.num_frames

    def indices(self, n_total: int, native_fps: float) -> list[int]:
        if self.fps is not None and not self.splice:
            return fps_indices(n_total, native_fps, self.fps, self.max_frames)
        return frame_indices(n_total, self.num_frames, self.splice)


# (extensions, a test on the first 12 bytes, the container's name) for the scan's header check
CONTAINERS = (
    ((".mp4", ".m4v", ".mov", ".3gp"),
     lambda b: b[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot"), "an MP4/QuickTime file"),
    ((".mkv", ".webm"), lambda b: b[:4] == b"\x1a\x45\xdf\xa3", "a Matroska/WebM file"),
    ((".avi",), lambda b: b[:4] == b"RIFF" and b[8:12] == b"AVI ", "an AVI file"),
)


class VideoSource:
    """Videos by relative name from ``root``: a folder, or a ``.tar`` whose members are indexed once."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.index: dict[str, tuple[int, int]] | None = None
        self._fh = None
        self._pid = None
        if self.root.suffix == ".tar":
            if not self.root.is_file():
                raise FileNotFoundError(f"video tar {self.root} does not exist")
            with tarfile.open(self.root, "r") as tar:
                self.index = {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}
        elif not self.root.is_dir():
            raise FileNotFoundError(f"video folder {self.root} does not exist")

    def __getstate__(self):  # worker processes reopen their own file handle
        return {**self.__dict__, "_fh": None, "_pid": None}

    def where(self, name: Name) -> str:
        if isinstance(name, tuple):
            return f"frames [{self.where(name[0])}, ... {len(name)} images]"
        return f"{self.root}:{name}" if self.index is not None else str(self.root / name)

    def _is_file(self, name: str) -> bool:
        return name in self.index if self.index is not None else (self.root / name).is_file()

    def frame_files(self, name: Name) -> list[str] | None:
        """The frame images of a frame folder or list (sorted by name), or None for a video file."""
        if isinstance(name, tuple):
            return list(name)
        if self.index is not None:
            pre = name.rstrip("/") + "/"
            got = sorted(m for m in self.index if m.startswith(pre) and m.lower().endswith(IMAGE_EXTS))
            return got or None
        folder = self.root / name
        if not folder.is_dir():
            return None
        return sorted(f"{name.rstrip('/')}/{p.name}" for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)

    def exists(self, name: Name) -> bool:
        files = self.frame_files(name)
        return self._is_file(name) if files is None else bool(files) and all(self._is_file(f) for f in files)

    def read_bytes(self, name: str) -> bytes:
        if self.index is None:
            return (self.root / name).read_bytes()
        if name not in self.index:
            raise FileNotFoundError(f"video {name!r} is not a member of {self.root}")
        if self._fh is None or self._pid != os.getpid():
            self._fh, self._pid = open(self.root, "rb"), os.getpid()
        off, size = self.index[name]
        self._fh.seek(off)
        return self._fh.read(size)

    def head(self, name: str, n: int = 12) -> tuple[bytes, int]:
        """The first ``n`` bytes of a video and its size, without reading the rest."""
        if self.index is not None:
            if name not in self.index:
                raise FileNotFoundError(f"video {name!r} is not a member of {self.root}")
            off, size = self.index[name]
            with open(self.root, "rb") as f:
                f.seek(off)
                return f.read(min(n, size)), size
        with open(self.root / name, "rb") as f:
            return f.read(n), os.fstat(f.fileno()).st_size

    def check_header(self, name: Name, sample: str = "") -> None:
        """Cheap check at scan time: the video is not empty and starts as its container must (for the
        extensions in ``CONTAINERS``); decoding errors show only when a worker reads the frames. A video
        given as frame images has no container: ``exists`` found them, a bad one shows when decoded."""
        if self.frame_files(name) is not None:
            return
        pre = f"{sample}: " if sample else ""
        head, size = self.head(name)
        if size == 0:
            raise ValueError(f"{pre}video {self.where(name)} is empty (0 bytes)")
        for exts, looks_right, what in CONTAINERS:
            if name.lower().endswith(exts) and not looks_right(head):
                raise ValueError(f"{pre}video {self.where(name)} does not start like {what} (first bytes {head!r}): "
                                 "the file is corrupt or not a video")

    def reader(self, name: str, sample: str = ""):
        """A decord VideoReader; raise naming the video (and sample) when missing, unreadable or empty."""
        import decord

        pre = f"{sample}: " if sample else ""
        try:
            data = self.read_bytes(name)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{pre}video {self.where(name)} does not exist") from e
        if not data:
            raise ValueError(f"{pre}video {self.where(name)} is empty (0 bytes)")
        try:
            vr = decord.VideoReader(io.BytesIO(data))
        except Exception as e:  # noqa: BLE001 - decord raises its own DECORDError
            raise ValueError(f"{pre}video {self.where(name)} cannot be decoded ({str(e).splitlines()[0]})") from e
        if len(vr) == 0:
            raise ValueError(f"{pre}video {self.where(name)} has no frames")
        return vr

    def _length_fps(self, name: Name, choice: FrameChoice, sample: str) -> tuple[int, float, object]:
        """(frames, native fps, a reader or the frame files) without decoding any frame."""
        files = self.frame_files(name)
        if files is not None:
            if not files:
                raise ValueError(f"{sample + ': ' if sample else ''}frame folder {self.where(name)} holds no images")
            return len(files), choice.folder_fps, files
        vr = self.reader(name, sample)
        return len(vr), float(vr.get_avg_fps()), vr

    def n_frames(self, name: Name, sample: str = "") -> int:
        return self._length_fps(name, FrameChoice(), sample)[0]

    def choose(self, name: Name, choice: FrameChoice, sample: str = "") -> tuple[list[int], list[float]]:
        """The frame indices ``choice`` takes from this video and their timestamps in seconds."""
        n, fps, _ = self._length_fps(name, choice, sample)
        idx = choice.indices(n, fps)
        return idx, [i / fps for i in idx]

    def sample(self, name: Name, choice: FrameChoice, sample: str = "") -> tuple[np.ndarray, list[float]]:
        """uint8[F, H, W, 3] frames as ``choice`` picks them, and their timestamps in seconds."""
        n, fps, src = self._length_fps(name, choice, sample)
        idx = choice.indices(n, fps)
        uniq = sorted(set(idx))
        pre = sample + ": " if sample else ""
        try:
            if isinstance(src, list):
                got = np.stack([np.asarray(Image.open(io.BytesIO(self.read_bytes(src[j]))).convert("RGB")) for j in uniq])
            else:
                got = src.get_batch(uniq).asnumpy()
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{pre}a frame of {self.where(name)} does not exist ({e})") from e
        except Exception as e:  # noqa: BLE001 - decord's and PIL's own errors
            raise ValueError(f"{pre}video {self.where(name)} failed to decode frames {uniq} "
                             f"({str(e).splitlines()[0]})") from e
        pos = {j: k for k, j in enumerate(uniq)}
        return got[[pos[j] for j in idx]], [i / fps for i in idx]

    def frames(self, name: Name, num_frames: int, splice: str | None = None, sample: str = "") -> np.ndarray:
        """uint8[F, H, W, 3]: NeMo's choice (``num_frames``, ``splice_single_frame``)."""
        return self.sample(name, FrameChoice(num_frames, splice), sample)[0]
