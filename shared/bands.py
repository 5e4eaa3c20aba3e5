"""Decoding in bands: an opened image to the model's mode and size with its full-size pixels held
once, converted, turned and reduced a band of rows at a time (the result exactly that of
converting, turning and resizing the whole image). Pillow only: :mod:`shared.isolated`'s child
imports it without NumPy (0.05 s to start instead of 0.17)."""

from __future__ import annotations

import functools
from typing import Any

from PIL import Image

REDUCING_GAP = 3.0  # resize()'s reducing_gap: the integer reduce factors follow from it
BAND_PIXELS = 256 * 1024  # pixels per band: each band's temporaries are a few MiB
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


@functools.cache
def _sixteen_to_eight() -> Any:
    import numpy as np  # noqa: PLC0415

    return (np.arange(65536) // 257).astype(np.uint8)  # exact floor(v / 257)


def to_mode(band: Image.Image, target: str) -> Image.Image:
    """One band in the model's mode: 16-bit → 8-bit, transparency over white, anything → L/RGB."""
    mode, key = band.mode, band.info.get("transparency")  # P: an index; 1, L, I;16, RGB: a PNG colour key
    if mode.startswith("I;16"):
        import numpy as np  # noqa: PLC0415 (16-bit PNGs only: a WebP decoder's child needs no NumPy)

        sixteen = np.asarray(band)
        eight = _sixteen_to_eight()[sixteen]
        if isinstance(key, int):
            eight[sixteen == key] = 255  # a colour key is all or nothing: white where it matches
        band = Image.fromarray(eight)
    elif mode in ALPHA_MODES or (key is not None and mode in ("P", "1", "L", "RGB")):
        rgba = band if mode == "RGBA" else band.convert("RGBA")
        band = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    elif mode not in ("L", "RGB"):
        band = band.convert("RGB")  # 1, P, CMYK, YCbCr, I, F
    return band if band.mode == target else band.convert(target)


def axes(method: Image.Transpose | None) -> tuple[bool, bool]:
    """(swaps width and height, reverses the stored rows), found by transposing a 1×2 image."""
    if method is None:
        return False, False
    probe = Image.new("L", (1, 2))
    probe.putpixel((0, 1), 1)
    turned = probe.transpose(method)
    return turned.size != probe.size, turned.getpixel((0, 0)) == 1


Box = tuple[float, float, float, float]


def reduce_in_bands(
    image: Image.Image, size: tuple[int, int], target: str, method: Image.Transpose | None
) -> tuple[Image.Image, Box]:
    """The ``target``-mode image, turned upright by ``method``, reduced by the factors
    ``resize(size, reducing_gap=3)`` would use, and the box that resize must then sample,
    exactly as Image.resize does."""
    swap, flip = axes(method)
    width, height = image.size
    upright_w, upright_h = (height, width) if swap else (width, height)
    factor_x = int(upright_w / size[0] / REDUCING_GAP) or 1
    factor_y = int(upright_h / size[1] / REDUCING_GAP) or 1
    step = factor_x if swap else factor_y  # the factor along the stored rows
    box = (0.0, 0.0, upright_w / factor_x, upright_h / factor_y)
    if method is None and (factor_x, factor_y) == (1, 1) and image.mode == target and "transparency" not in image.info:
        return image, box  # nothing to convert, turn or reduce: the decoded image itself
    rows = max(step, BAND_PIXELS // width // step * step)
    out = Image.new(target, (-(-upright_w // factor_x), -(-upright_h // factor_y)))
    # Bands follow the upright frame: when orientation reverses the rows, count from the bottom,
    # so only the last band (upright) holds a partial reduce block, as in a whole-image reduce.
    for start in range(0, height, rows):
        end = min(start + rows, height)
        top, bottom = (height - end, height - start) if flip else (start, end)
        band = to_mode(image.crop((0, top, width, bottom)), target)
        if method is not None:
            band = band.transpose(method)
        if (factor_x, factor_y) != (1, 1):
            band = band.reduce((factor_x, factor_y))
        out.paste(band, (start // step, 0) if swap else (0, start // step))
    return out, box


def reduced(image: Image.Image, size: tuple[int, int], mode: str, method: Image.Transpose | None) -> Image.Image:
    """``image`` (opened, not loaded) decoded, turned upright by ``method``, in ``mode`` ("L" or
    "RGB") and resized to ``size`` (stretched, bilinear), in bands."""
    image.load()
    small, box = reduce_in_bands(image, size, mode, method)
    if small.size != size:
        small = small.resize(size, Image.Resampling.BILINEAR, box=box)
    return small
