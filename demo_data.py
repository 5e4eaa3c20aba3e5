"""Generators for the two demo models' images, so they train with no download.

- ``shapes``: one filled circle, square or triangle of random size, position, rotation and
  colours on a random (plain, gradient or noisy) background, at the sizes and aspect ratios
  people upload — small icons to 1024x768 photos.
- ``arrows``: an arrow pointing up, down, left or right (±25°), any colours, any size.

    python demo_data.py shapes OUT_DIR --per-class 100 [--seed 1]

writes ``OUT_DIR/<label>/<n>.png|jpg`` (the folder layout ``train.py`` reads).
"""

from __future__ import annotations

import argparse
import math
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

Point = tuple[float, float]


def _canvas_size(rng: random.Random) -> tuple[int, int]:
    if rng.random() < 0.15:
        return rng.choice([(640, 480), (480, 640), (800, 600), (1024, 768)])
    side = rng.randint(40, 360)
    aspect = math.exp(rng.uniform(math.log(0.6), math.log(1.67)))
    return max(24, int(side * math.sqrt(aspect))), max(24, int(side / math.sqrt(aspect)))


def _colour(rng: random.Random) -> tuple[int, int, int]:
    return rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255)


def _luma(colour: tuple[int, int, int]) -> float:
    return 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]


def _contrasting(rng: random.Random, against: tuple[int, int, int], grey: bool = False) -> tuple[int, int, int]:
    """A colour that stands out from ``against`` (in brightness too when the model sees grey)."""
    while True:
        colour = _colour(rng)
        if sum(abs(a - b) for a, b in zip(colour, against, strict=False)) > 180 and (
            not grey or abs(_luma(colour) - _luma(against)) > 60
        ):
            return colour


def _background(rng: random.Random, size: tuple[int, int]) -> tuple[Image.Image, tuple[int, int, int]]:
    base = _colour(rng)
    kind = rng.random()
    if kind < 0.5:
        return Image.new("RGB", size, base), base
    w, h = size
    if kind < 0.8:  # soft gradient towards a near colour
        other = np.array([min(255, max(0, c + rng.randint(-60, 60))) for c in base], np.float32)
        t = np.linspace(0, 1, w if rng.random() < 0.5 else h, dtype=np.float32)
        ramp = np.array(base, np.float32)[None] * (1 - t[:, None]) + other[None] * t[:, None]
        pixels = np.broadcast_to(ramp[None], (h, w, 3)) if len(t) == w else np.broadcast_to(ramp[:, None], (h, w, 3))
        return Image.fromarray(pixels.astype(np.uint8), "RGB"), base
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 18, (h, w, 3))
    return Image.fromarray(np.clip(np.array(base) + noise, 0, 255).astype(np.uint8), "RGB"), base


def _rotate(points: list[Point], angle: float, centre: Point) -> list[Point]:
    c, s = math.cos(angle), math.sin(angle)
    cx, cy = centre
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def _finish(rng: random.Random, image: Image.Image) -> Image.Image:
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    return image


def shape_image(rng: random.Random, label: str) -> Image.Image:
    """One ``shapes`` image of class ``label`` (circle, square or triangle)."""
    image, bg = _background(rng, _canvas_size(rng))
    draw, (w, h) = ImageDraw.Draw(image), image.size
    r = rng.uniform(0.18, 0.42) * min(w, h)
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    fill = _contrasting(rng, bg)
    angle = rng.uniform(0, 2 * math.pi)
    if label == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif label == "square":
        half = r / math.sqrt(2) * 1.15
        draw.polygon(_rotate([(-half, -half), (half, -half), (half, half), (-half, half)], angle, (cx, cy)), fill=fill)
    else:
        corners = [(r * math.cos(a), r * math.sin(a)) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
        draw.polygon(_rotate(corners, angle, (cx, cy)), fill=fill)
    return _finish(rng, image)


ARROW_ANGLES = {"right": 0.0, "down": math.pi / 2, "left": math.pi, "up": -math.pi / 2}


def arrow_image(rng: random.Random, label: str) -> Image.Image:
    """One ``arrows`` image of class ``label`` (up, down, left or right)."""
    image, bg = _background(rng, _canvas_size(rng))
    draw, (w, h) = ImageDraw.Draw(image), image.size
    length = rng.uniform(0.45, 0.8) * min(w, h)
    half, shaft = length / 2, length * rng.uniform(0.08, 0.16)
    head_w, head_l = length * rng.uniform(0.25, 0.4), length * rng.uniform(0.3, 0.45)
    outline = [
        (-half, -shaft),
        (half - head_l, -shaft),
        (half - head_l, -head_w),
        (half, 0),
        (half - head_l, head_w),
        (half - head_l, shaft),
        (-half, shaft),
    ]
    angle = ARROW_ANGLES[label] + math.radians(rng.uniform(-25, 25))
    reach = half * 1.05
    cx, cy = rng.uniform(reach, w - reach), rng.uniform(reach, h - reach)
    draw.polygon(_rotate(outline, angle, (cx, cy)), fill=_contrasting(rng, bg, grey=True))
    return _finish(rng, image)


DEMOS: dict[str, tuple[list[str], Callable[[random.Random, str], Image.Image]]] = {
    "shapes": (["circle", "square", "triangle"], shape_image),
    "arrows": (["down", "left", "right", "up"], arrow_image),
}


def write_dataset(name: str, out: Path, per_class: int, seed: int) -> Path:
    """Write ``per_class`` images of each label of demo ``name`` under ``out/<label>/``."""
    labels, draw = DEMOS[name]
    rng = random.Random(seed)
    for label in labels:
        folder = out / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = draw(rng, label)
            if rng.random() < 0.5:
                image.save(folder / f"{i}.jpg", quality=rng.randint(60, 95))
            else:
                image.save(folder / f"{i}.png", compress_level=1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(DEMOS))
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    write_dataset(args.name, args.out, args.per_class, args.seed)


if __name__ == "__main__":
    main()
