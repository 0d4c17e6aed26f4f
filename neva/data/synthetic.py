"""A small real task for the default run: coloured shapes, questions with one-word answers, and clips.

Images are ``size`` x ``size`` (default 32: a 4x4 grid of 8 px patches) with 1-3 shapes, each in its
own quadrant, all (colour, kind) pairs distinct. Question types (``qtype``), each balanced:

  colour    What colour is the circle? | ... the shape at the top left?   -> red | green | blue | yellow
  shape     What shape is the red object? | What shape is at the top left? -> circle | square | triangle
  count     How many shapes are there?                                     -> 1 | 2 | 3
  position  Where is the red circle?                  -> top left | top right | bottom left | bottom right
  yesno     Is there a blue square?                                        -> yes | no (half each)
  motion    (video) Which way does the red circle move?                    -> left | right | up | down

Files written to OUT_DIR (all LLaVA format, paths relative to OUT_DIR; ``videos.tar`` is the video
folder of the video records):
  train.jsonl      one record per training image, ``qa_per_image`` (default all 5) question turns, ``"qtypes"``
  captions.jsonl   one caption per training image (``plain`` template pretraining)
  eval.jsonl       held-out images, one record per question, with ``"qtype"`` and ``"answer"``
  video_train.jsonl, video_eval.jsonl, videos.tar   motion clips (mp4), same conventions

Every image, clip and question is drawn from ``numpy.random.default_rng([seed, split, index])``:
the output is a pure function of the arguments. ``python -m neva.data.synthetic OUT_DIR --help``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from neva.progress import Progress
from neva.data.shapes import COLOURS, KINDS, QUADRANTS, Shape, render_scene, rng_for

QTYPES = ("colour", "shape", "count", "position", "yesno")


def sample_scene(rng: np.random.Generator, size: int = 32, n: int | None = None,
                 jitter: int | None = 1) -> list[Shape]:
    """1-3 shapes in distinct quadrants with distinct (colour, kind). A shape of 11-13 px (of a 16 px
    quadrant) sits within ``jitter`` px of its quadrant's centre, so the quadrant's 2 x 2 patches see
    it whole and alike; ``jitter=None``: 9-13 px anywhere inside the quadrant (a harder task)."""
    n = int(rng.integers(1, 4)) if n is None else n
    half = size // 2
    pairs = [(c, k) for c in COLOURS for k in KINDS]
    chosen = rng.choice(len(pairs), n, replace=False)
    quads = rng.choice(4, n, replace=False)
    lo = half * (9 if jitter is None else 11) // 16
    shapes = []
    for p, q in zip(chosen, quads):
        s = int(rng.integers(max(4, lo), half * 13 // 16 + 1))
        x0, y0 = (half if q % 2 else 0), (half if q >= 2 else 0)
        if jitter is None:
            dx, dy = int(rng.integers(1, half - s)), int(rng.integers(1, half - s))
        else:
            c = (half - s) // 2
            dx, dy = (int(np.clip(c + rng.integers(-jitter, jitter + 1), 1, half - s - 1)) for _ in range(2))
        shapes.append(Shape(*pairs[p], int(q), x0 + dx, y0 + dy, s))
    return sorted(shapes, key=lambda s: s.quadrant)


def caption(shapes: list[Shape]) -> str:
    parts = [f"a {s.colour} {s.kind} at the {QUADRANTS[s.quadrant]}" for s in shapes]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


def question(rng: np.random.Generator, shapes: list[Shape], qtype: str) -> tuple[str, str]:
    """(question, answer) of one type about the scene; always answerable and unambiguous."""
    s = shapes[int(rng.integers(len(shapes)))]
    where = QUADRANTS[s.quadrant]
    by_kind = sum(o.kind == s.kind for o in shapes) == 1
    by_colour = sum(o.colour == s.colour for o in shapes) == 1
    pick = bool(rng.integers(2))
    if qtype == "colour":
        q = f"What colour is the {s.kind}?" if by_kind and pick else f"What colour is the shape at the {where}?"
        return q, s.colour
    if qtype == "shape":
        q = f"What shape is the {s.colour} object?" if by_colour and pick else f"What shape is at the {where}?"
        return q, s.kind
    if qtype == "count":
        return "How many shapes are there?", str(len(shapes))
    if qtype == "position":
        return f"Where is the {s.colour} {s.kind}?", where
    if qtype == "yesno":
        present = {(o.colour, o.kind) for o in shapes}
        if pick:
            return f"Is there a {s.colour} {s.kind}?", "yes"
        absent = [(c, k) for c in COLOURS for k in KINDS if (c, k) not in present]
        c, k = absent[int(rng.integers(len(absent)))]
        return f"Is there a {c} {k}?", "no"
    raise ValueError(f"unknown question type {qtype!r}: use one of {QTYPES}")


def image_name(split: str, i: int) -> str:
    return f"images/{split}_{i:06d}.png"


def train_records(i: int, shapes: list[Shape], rng: np.random.Generator, qa_per_image: int) -> tuple[dict, dict]:
    """(multi-turn QA record, caption record) for training image ``i``."""
    qtypes = [str(t) for t in rng.choice(QTYPES, min(qa_per_image, len(QTYPES)), replace=False)]
    conv = []
    for k, qt in enumerate(qtypes):
        q, a = question(rng, shapes, qt)
        conv += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + q}, {"from": "gpt", "value": a}]
    img = image_name("train", i)
    qa = {"id": f"train_{i:06d}", "image": img, "conversations": conv, "qtypes": qtypes}
    cap = {"id": f"caption_{i:06d}", "image": img, "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image briefly."}, {"from": "gpt", "value": caption(shapes)}]}
    return qa, cap


def eval_records(i: int, shapes: list[Shape], rng: np.random.Generator) -> list[dict]:
    """One single-question record per question type for held-out image ``i``."""
    out = []
    for qt in QTYPES:
        q, a = question(rng, shapes, qt)
        out.append({"id": f"eval_{i:06d}_{qt}", "image": image_name("eval", i), "qtype": qt, "answer": a,
                    "conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]})
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def generate(out_dir: str | Path, *, seed: int = 0, train_images: int = 3000, eval_images: int = 100,
             qa_per_image: int = 5, train_videos: int = 300, eval_videos: int = 60, frames: int = 8,
             size: int = 32, jitter: int | None = 1, progress: bool = False) -> dict:
    """Write the dataset (see the module docstring); -> counts of what was written.

    The defaults (every question type on every training image, shapes centred within 1 px) learn
    fastest: a 2-layer SigLIP + 2-layer Mixtral (dim 128, 4 experts) at lr 1e-3, batch 32, reached
    0.62 held-out exact match in 600 steps, against 0.52 with 3 questions an image and free placement."""
    from neva.data.synthetic_video import write_videos

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    bar = Progress(train_images + eval_images, "write images", unit="image", on=progress, leave=False)
    train, caps, held = [], [], []
    for i in range(train_images):
        rng = rng_for(seed, "train", i)
        shapes = sample_scene(rng, size, jitter=jitter)
        render_scene(shapes, size).save(out / image_name("train", i), optimize=False)
        qa, cap = train_records(i, shapes, rng, qa_per_image)
        train.append(qa), caps.append(cap), bar.update()
    for i in range(eval_images):
        rng = rng_for(seed, "eval", i)
        shapes = sample_scene(rng, size, jitter=jitter)
        render_scene(shapes, size).save(out / image_name("eval", i), optimize=False)
        held += eval_records(i, shapes, rng)
        bar.update()
    bar.close()
    _write_jsonl(out / "train.jsonl", train)
    _write_jsonl(out / "captions.jsonl", caps)
    _write_jsonl(out / "eval.jsonl", held)
    counts = {"train_images": train_images, "train_qa": sum(len(r["qtypes"]) for r in train), "captions": len(caps),
              "eval_images": eval_images, "eval_qa": len(held)}
    if train_videos or eval_videos:
        counts.update(write_videos(out, seed=seed, n_train=train_videos, n_eval=eval_videos, frames=frames,
                                   size=size, progress=progress))
    return counts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m neva.data.synthetic", description=__doc__.split("\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-images", type=int, default=3000)
    p.add_argument("--eval-images", type=int, default=100)
    p.add_argument("--qa-per-image", type=int, default=5, help="question turns per training image (<= 5 types)")
    p.add_argument("--train-videos", type=int, default=300)
    p.add_argument("--eval-videos", type=int, default=60)
    p.add_argument("--frames", type=int, default=8, help="frames per clip")
    p.add_argument("--size", type=int, default=32, help="image and frame side in pixels")
    p.add_argument("--jitter", type=int, default=1, help="max px a shape sits off its quadrant's centre (-1: anywhere)")
    a = p.parse_args(argv)
    t0 = time.time()
    counts = generate(a.out_dir, seed=a.seed, train_images=a.train_images, eval_images=a.eval_images,
                      qa_per_image=a.qa_per_image, train_videos=a.train_videos, eval_videos=a.eval_videos,
                      frames=a.frames, size=a.size, jitter=None if a.jitter < 0 else a.jitter, progress=True)
    print(f"wrote {a.out_dir} in {time.time() - t0:.1f}s: " + ", ".join(f"{k}={v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
