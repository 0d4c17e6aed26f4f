"""Synthetic clips for VideoNeVA, written into a tar with fixed member metadata (byte-for-byte
reproducible):

* motion: one shape moving left, right, up or down (``frames`` frames of ``size`` x ``size``; it
  crosses about half the frame in a straight line), mp4 encoded with PyAV (MPEG-4 part 2,
  near-lossless quantiser), in ``videos.tar``;
* needle in a video (LongVA's V-NIAH idea, for long video): 32-64 frames of a small grey square
  drifting across a dark frame, one of which flashes a large shape of one colour at a random time;
  questions ask the colour and whether it came in the first or the second half. Stored as folders
  of PNG frames (``needle_train_000001/007.png``) in ``needles.tar``, a video given as frame images.
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


def write_clips(out: Path, tar_name: str, splits: dict[str, int], seed: int, make, progress: bool = False,
                desc: str = "write clips") -> None:
    """``splits[split]`` clips per split into ``out/tar_name``: ``make(tar, split, i, rng)`` writes
    clip i's members and returns its records; each split's records go to ``out/{split}.jsonl``."""
    bar = Progress(sum(splits.values()), desc, unit="clip", on=progress, leave=False)
    with tarfile.open(out / tar_name, "w", format=tarfile.USTAR_FORMAT) as tar:
        for split, n in splits.items():
            rows = []
            for i in range(n):
                rows += make(tar, split, i, rng_for(seed, split, i))
                bar.update()
            (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    bar.close()


def write_videos(out: Path, *, seed: int, n_train: int, n_eval: int, frames: int, size: int,
                 progress: bool = False) -> dict:
    def make(tar, split: str, i: int, rng: np.random.Generator) -> list[dict]:
        clip, facts = clip_frames(rng, frames, size)
        rec = motion_record(split, i, facts, rng)
        _add(tar, rec["video"], encode_mp4(clip))
        return [rec]

    write_clips(out, "videos.tar", {"video_train": n_train, "video_eval": n_eval}, seed, make, progress)
    return {"train_videos": n_train, "eval_videos": n_eval}


# ------------------------------------------------------------------------------ needle in a video
HALVES = ("first", "second")


def needle_frames(rng: np.random.Generator, n: int, size: int = 32) -> tuple[np.ndarray, dict]:
    """uint8[n, size, size, 3]: a grey square drifting over ``n`` frames; frame ``index`` instead shows
    a large shape of ``colour``. -> (frames, {"colour", "index", "half"})."""
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    index = int(rng.integers(n))
    kind = KINDS[int(rng.integers(len(KINDS)))]
    x0, y0, side = int(rng.integers(2, size // 2)), int(rng.integers(2, size // 2)), size // 4
    out = np.empty((n, size, size, 3), np.uint8)
    for f in range(n):
        img = Image.new("RGB", (size, size), BACKGROUND)
        d = ImageDraw.Draw(img)
        if f == index:
            draw_shape(d, Shape(colour, kind, 0, size // 8, size // 8, size * 3 // 4))
        else:
            x = (x0 + f) % (size - side)
            d.rectangle([x, y0, x + side - 1, y0 + side - 1], fill=(110, 110, 110))
        out[f] = np.asarray(img)
    return out, {"colour": colour, "index": index, "half": HALVES[int(index >= n / 2)]}


def needle_questions(facts: dict) -> list[tuple[str, str, str]]:
    """[(qtype, question, answer)]: the flash's colour, and the half of the clip it came in."""
    return [("colour", "What colour flashes in the video?", facts["colour"]),
            ("half", "Does the flash come in the first or the second half of the video?", facts["half"])]


def write_needles(out: Path, *, seed: int, n_train: int, n_eval: int, min_frames: int = 32, max_frames: int = 64,
                  size: int = 32, progress: bool = False) -> dict:
    """``needles.tar`` (a folder of PNG frames per clip) and ``needle_train.jsonl`` (both questions
    as two turns) / ``needle_eval.jsonl`` (one record per question, with ``qtype`` and ``answer``)."""
    def make(tar, split: str, i: int, rng: np.random.Generator) -> list[dict]:
        frames, facts = needle_frames(rng, int(rng.integers(min_frames, max_frames + 1)), size)
        clip = f"{split}_{i:06d}"
        for f, fr in enumerate(frames):
            buf = io.BytesIO()
            Image.fromarray(fr).save(buf, format="PNG", optimize=False)
            _add(tar, f"{clip}/{f:03d}.png", buf.getvalue())
        qs = needle_questions(facts)
        base = {"video": clip, "frames": len(frames), "index": facts["index"]}
        if split == "needle_eval":
            return [{"id": f"{clip}_{qt}", **base, "qtype": qt, "answer": a,
                     "conversations": [{"from": "human", "value": "<video>\n" + q}, {"from": "gpt", "value": a}]}
                    for qt, q, a in qs]
        rng.shuffle(qs)
        conv = [{"from": "human", "value": "<video>\n" + qs[0][1]}, {"from": "gpt", "value": qs[0][2]},
                {"from": "human", "value": qs[1][1]}, {"from": "gpt", "value": qs[1][2]}]
        return [{"id": clip, **base, "qtypes": [q[0] for q in qs], "conversations": conv}]

    write_clips(out, "needles.tar", {"needle_train": n_train, "needle_eval": n_eval}, seed, make, progress,
                "needle clips")
    return {"needle_train": n_train, "needle_eval": n_eval}
