"""Images -> float[3, H, W] exactly as the encoder's HF image processor makes them (PIL + numpy).

* CLIP (CLIPImageProcessor): resize the shortest edge to ``image_size`` (bicubic; the long edge
  ``int(size * long / short)``), center crop ``image_size`` x ``image_size``, /255, normalise.
* SigLIP (SiglipImageProcessor): resize to ``image_size`` x ``image_size`` (bicubic), /255, normalise.
* DINOv2 (BitImageProcessor with its crop equal to its size, i.e. timm's and Prismatic's crop_pct 1.0
  rather than HF's 224 of 256): CLIP's resize and crop with the ImageNet mean and std.

Modes (NeMo's ``image_aspect_ratio``): ``square`` is the processor as is; ``pad`` first expands the
image to a square filled with the mean colour (LLaVA-1.5's expand2square); ``keep`` resizes the
shortest edge to ``min(2 * size / aspect, size)`` with no crop, so the result is not square: only an
encoder that takes any grid can use it.

An encoder with towers (kind=fused) gets one image per tower, each made by that tower's processor:
``spec_for`` then gives {tower kind: ImageSpec} and ``process`` {tower kind: float[3, H_t, W_t]}.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from neva.batch import Media

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZE = {"clip": (CLIP_MEAN, CLIP_STD), "siglip": (SIGLIP_MEAN, SIGLIP_STD), "dino": (IMAGENET_MEAN, IMAGENET_STD)}
CROPS = ("clip", "dino")             # shortest edge to size, then a center crop; the others resize to a square


@dataclass(frozen=True)
class ImageSpec:
    kind: str            # clip | siglip | dino
    size: int            # the encoder's image_size
    mode: str = "square"  # square | pad | keep

    @property
    def mean(self) -> tuple[float, ...]:
        return NORMALIZE[self.kind][0]

    @property
    def std(self) -> tuple[float, ...]:
        return NORMALIZE[self.kind][1]


Specs = ImageSpec | dict[str, ImageSpec]


def spec_for(vision_cfg, mode: str = "square") -> Specs:
    """The image processing a ``VisionConfig`` expects: one ImageSpec, or one per tower."""
    if vision_cfg.towers:
        return {t.kind: spec_for(t, mode) for t in vision_cfg.towers}
    if vision_cfg.kind not in NORMALIZE:
        raise ValueError(f"no image processing is defined for vision kind {vision_cfg.kind!r} (known: "
                         f"{', '.join(NORMALIZE)}); add its mean and std to neva.data.images.NORMALIZE")
    return ImageSpec(vision_cfg.kind, vision_cfg.image_size, mode)


def empty(spec: Specs) -> Media:
    """No images, shaped for ``spec``: float[0, 3, size, size] (per tower)."""
    if isinstance(spec, dict):
        return {k: empty(s) for k, s in spec.items()}
    return torch.zeros(0, 3, spec.size, spec.size)


def expand_to_square(img: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """Pad the short side (centred, as LLaVA does) with ``fill``."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), fill)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def _shortest_edge_size(w: int, h: int, short: int) -> tuple[int, int]:
    """(new_w, new_h) with the short edge ``short`` and the long edge int(short * long / short_in)."""
    if w <= h:
        return short, int(short * h / w)
    return int(short * w / h), short


def _center_crop(a_hwc: np.ndarray, size: int) -> np.ndarray:
    h, w = a_hwc.shape[:2]
    if h < size or w < size:  # HF zero-pads a too-small image; a resize to >= size never makes one
        raise ValueError(f"center crop {size} of a {h}x{w} image")
    top, left = (h - size) // 2, (w - size) // 2
    return a_hwc[top:top + size, left:left + size]


def process(img: Image.Image, spec: Specs) -> Media:
    """A PIL image -> float32[3, H, W] normalised pixels (H = W = size unless mode is keep); for a
    dict of specs, {tower kind: its pixels}."""
    if isinstance(spec, dict):
        return {k: process(img, s) for k, s in spec.items()}
    img = to_rgb(img)
    if spec.mode == "pad":
        img = expand_to_square(img, tuple(int(m * 255) for m in spec.mean))
    w, h = img.size
    if spec.mode == "keep":
        aspect = max(w, h) / min(w, h)
        short = int(min(2 * spec.size / aspect, spec.size))
        a = np.asarray(img.resize(_shortest_edge_size(w, h, short), Image.BICUBIC))
    elif spec.kind in CROPS:
        a = np.asarray(img.resize(_shortest_edge_size(w, h, spec.size), Image.BICUBIC))
        a = _center_crop(a, spec.size)
    elif spec.kind == "siglip":
        a = np.asarray(img.resize((spec.size, spec.size), Image.BICUBIC))
    else:
        raise ValueError(f"unknown encoder kind {spec.kind!r}")
    x = a.astype(np.float32) * np.float32(1 / 255)
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def check_header(path, name: str = "") -> None:
    """Cheap check at scan time: the file is not empty and PIL recognises its header (no pixels are
    decoded; a body cut short shows only when the image is loaded)."""
    pre = f"{name}: " if name else ""
    try:
        with Image.open(path) as im:
            im.size                                     # noqa: B018 - parsed from the header
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{pre}image file {path} does not exist") from e
    except Exception as e:  # noqa: BLE001 - PIL raises many types for a file that is not an image
        raise ValueError(f"{pre}image file {path} is not an image PIL can read ({e})") from e


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB. 16-bit and 32-bit integer greyscale ("I;16", "I": PNG, TIFF) is
    scaled from 0..65535 to 0..255; PIL's own convert clips it, turning most of the image white."""
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max(initial=0) <= 65535 else float(a.max())
        im = Image.fromarray(np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":                                # float images: 0..1
        im = Image.fromarray(np.clip(np.rint(np.asarray(im) * 255.0), 0, 255).astype(np.uint8), "L")
    return im.convert("RGB")


def open_image(path, name: str = "") -> Image.Image:
    """Open and fully decode an image as 8-bit RGB (``to_rgb``); raise naming the file (and sample)
    if missing or corrupt."""
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{name + ': ' if name else ''}image file {path} does not exist") from e
    except Exception as e:  # noqa: BLE001 - PIL raises many types for a corrupt file
        raise ValueError(f"{name + ': ' if name else ''}image file {path} cannot be decoded ({e})") from e
