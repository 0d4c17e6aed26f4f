"""Synthetic motion clips for VideoNeVA: one shape moving left, right, up or down, as mp4 in a tar.

Each clip has ``frames`` frames of ``size`` x ``size``; the shape crosses about half the frame in a
straight line. Clips are encoded with PyAV (MPEG-4 part 2, near-lossless quantiser) and stored in
``videos.tar`` with fixed member metadata, so the tar is byte-for-byte reproducible.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from neva.progress import Progress
from neva.data.shapes import BACKGROUND, COLOURS, KINDS, Shape, draw_shape, rng_for

DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def clip_frames(rng: np.random.Generator, frames: int = 8, size: int = 32) -> tuple[np.ndarray, dict]:
    """uint8[F, size, size, 3] frames and the clip's facts (colour, kind, direction)."""
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    kind = KINDS[int(rng.integers(len(KINDS)))]
    direction = list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
    dx, dy = DIRECTIONS[direction]
    s = int(rng.integers(size * 9 // 32, size * 12 // 32 + 1))
    travel = size - s - 4                          # the path runs from one margin to the other
    lateral = int(rng.integers(2, size - s - 1))   # where across the motion axis the path lies
    out = np.empty((frames, size, size, 3), np.uint8)
    for f in range(frames):
        along = 2 + round(travel * f / max(1, frames - 1))
        if dx or dy:
            along = along if (dx > 0 or dy > 0) else size - s - along
        x, y = (along, lateral) if dx else (lateral, along)
        img = Image.new("RGB", (size, size), BACKGROUND)
        draw_shape(ImageDraw.Draw(img), Shape(colour, kind, 0, x, y, s))
        out[f] = np.asarray(img)
    return out, {"colour": colour, "kind": kind, "direction": direction}


def encode_mp4(frames_fhw3: np.ndarray, fps: int = 8) -> bytes:
    """MPEG-4 in an mp4 container; qscale 2 keeps colours close to the drawn ones."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as box:
        st = box.add_stream("mpeg4", rate=fps, options={"qscale": "2"})
        st.width, st.height, st.pix_fmt = frames_fhw3.shape[2], frames_fhw3.shape[1], "yuv420p"
        st.codec_context.qmin, st.codec_context.qmax = 1, 3
        for f in frames_fhw3:
            for pkt in st.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                box.mux(pkt)
        for pkt in st.encode():
            box.mux(pkt)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def motion_record(split: str, i: int, facts: dict, rng: np.random.Generator) -> dict:
    q = f"Which way does the {facts['colour']} {facts['kind']} move?"
    if rng.integers(2):
        q = f"In which direction is the {facts['kind']} moving?"
    return {"id": f"{split}_{i:06d}", "video": f"{split}_{i:06d}.mp4", "qtype": "motion",
            "answer": facts["direction"], "qtypes": ["motion"],
            "conversations": [{"from": "human", "value": "<video>\n" + q}, {"from": "gpt", "value": facts["direction"]}]}


def write_videos(out: Path, *, seed: int, n_train: int, n_eval: int, frames: int, size: int,
                 progress: bool = False) -> dict:
    bar = Progress(n_train + n_eval, "write clips", unit="clip", on=progress, leave=False)
    with tarfile.open(out / "videos.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for split, n in (("video_train", n_train), ("video_eval", n_eval)):
            rows = []
            for i in range(n):
                rng = rng_for(seed, split, i)
                clip, facts = clip_frames(rng, frames, size)
                rec = motion_record(split, i, facts, rng)
                _add(tar, rec["video"], encode_mp4(clip))
                rows.append(rec)
                bar.update()
            (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    bar.close()
    return {"train_videos": n_train, "eval_videos": n_eval}
