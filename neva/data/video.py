"""Videos -> frames (VideoNeVA): decord reads from a folder or from a tar indexed once.

Frame choice follows NeMo's TarOrFolderVideoLoader: ``splice_single_frame`` first | middle | last
takes one frame; otherwise ``num_frames`` frames at ``linspace(0, len - 1, min(len, num_frames))``
(integer indices), padded to ``num_frames`` by repeating the last frame; ``num_frames = -1`` takes
every frame. A tar is scanned once for member offsets; each read is a seek into the file.
"""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np


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

    def where(self, name: str) -> str:
        return f"{self.root}:{name}" if self.index is not None else str(self.root / name)

    def exists(self, name: str) -> bool:
        return name in self.index if self.index is not None else (self.root / name).is_file()

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

    def check_header(self, name: str, sample: str = "") -> None:
        """Cheap check at scan time: the video is not empty and starts as its container must (for the
        extensions in ``CONTAINERS``); decoding errors show only when a worker reads the frames."""
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

    def n_frames(self, name: str, sample: str = "") -> int:
        return len(self.reader(name, sample))

    def frames(self, name: str, num_frames: int, splice: str | None = None, sample: str = "") -> np.ndarray:
        """uint8[F, H, W, 3] frames chosen as the module docstring says."""
        vr = self.reader(name, sample)
        idx = frame_indices(len(vr), num_frames, splice)
        uniq = sorted(set(idx))
        try:
            got = vr.get_batch(uniq).asnumpy()
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{sample + ': ' if sample else ''}video {self.where(name)} failed to decode frames "
                             f"{uniq} ({str(e).splitlines()[0]})") from e
        pos = {j: k for k, j in enumerate(uniq)}
        return got[[pos[j] for j in idx]]
