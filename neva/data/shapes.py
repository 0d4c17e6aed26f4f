"""The synthetic scenes' vocabulary and drawing: colours, shape kinds, quadrants, one shape on a
canvas, a whole scene; and the random source every synthetic image, clip and question is drawn from."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230), "yellow": (235, 210, 40)}
KINDS = ("circle", "square", "triangle")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
BACKGROUND = (24, 24, 24)
SPLITS = {"train": 0, "eval": 1, "video_train": 2, "video_eval": 3, "needle_train": 4, "needle_eval": 5}


@dataclass(frozen=True)
class Shape:
    colour: str
    kind: str
    quadrant: int          # index into QUADRANTS
    x: int                 # top-left corner of the bounding box, pixels
    y: int
    size: int


def rng_for(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS[split], index])


def draw_shape(d: ImageDraw.ImageDraw, s: Shape) -> None:
    box = [s.x, s.y, s.x + s.size - 1, s.y + s.size - 1]
    fill = COLOURS[s.colour]
    if s.kind == "circle":
        d.ellipse(box, fill=fill)
    elif s.kind == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(s.x + (s.size - 1) / 2, s.y), (s.x, s.y + s.size - 1), (s.x + s.size - 1, s.y + s.size - 1)],
                  fill=fill)


def render_scene(shapes: list[Shape], size: int = 32) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUND)
    d = ImageDraw.Draw(img)
    for s in shapes:
        draw_shape(d, s)
    return img
