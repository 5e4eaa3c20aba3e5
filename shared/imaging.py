"""Image decoding and preprocessing, shared by serving and ``train.py`` so both see the same
pixels. Uses Pillow and NumPy only.

:func:`decode` turns untrusted upload bytes into an upright RGB or L image (or raises
BadRequest naming the problem); :func:`to_array` resizes and scales it as a bundle's
``preprocessing`` says.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from shared.errors import BadRequest

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated upload is an error, not a grey half-image


def decode(data: bytes, max_pixels: int, size_hint: tuple[int, int] | None = None) -> Image.Image:
    """Decode one uploaded image: first frame, EXIF orientation applied, mode RGB or L.

    The pixel count is checked from the header before any pixel is decoded, so a
    decompression bomb costs nothing. ``size_hint`` (width, height) lets JPEG decode at a
    reduced scale that is still at least that large.
    """
    if not data:
        raise BadRequest("file is empty")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=FORMATS)
        except UnidentifiedImageError:
            raise BadRequest("not an image; send JPEG, PNG, WebP, GIF or BMP") from None
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            raise BadRequest(f"image too large (limit {max_pixels} pixels)") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise BadRequest(f"image header is corrupt ({exc})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadRequest(f"image too large: {width}x{height} pixels (limit {max_pixels})")
    if size_hint and image.format == "JPEG":
        side = max(size_hint)  # orientation may swap width and height: ask for the larger side
        image.draft("RGB" if image.mode != "L" else "L", (side, side))
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError):
        raise BadRequest("image data is truncated or corrupt") from None
    # A broken EXIF block is not worth refusing the image for: it stays as stored.
    upright: Image.Image = image
    with contextlib.suppress(OSError, ValueError, SyntaxError, KeyError, TypeError):
        upright = ImageOps.exif_transpose(image)
    return _normalise_mode(upright)


def _normalise_mode(image: Image.Image) -> Image.Image:
    """Any Pillow mode → RGB (or L for grey), transparency composited over white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or pixels.max(initial=0) > 255:
            pixels = pixels / 257.0  # 16-bit range → 8-bit
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("L", "RGB"):
        return image
    return image.convert("RGB")  # 1, P, CMYK, YCbCr, LAB, HSV


def to_array(image: Image.Image, input_spec: dict[str, Any], preprocessing: dict[str, Any]) -> np.ndarray:
    """``image`` as the model's input: (height, width, channels) float32, resized and scaled
    as ``preprocessing`` says (``scale`` and ``offset``: value = pixel * scale + offset)."""
    height, width, channels = input_spec["height"], input_spec["width"], input_spec["channels"]
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (width, height):
        # reducing_gap makes large photos cheap: reduce by an integer factor, then resample.
        image = image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=3.0)
    array = np.asarray(image, dtype=np.float32)
    if channels == 1:
        array = array[:, :, None]
    return scale(array, preprocessing)


def scale(pixels: np.ndarray, preprocessing: dict[str, Any]) -> np.ndarray:
    """Pixel values (float32) as the model's input: ``pixel * scale + offset`` as
    ``preprocessing`` says (uploads and raw-pixel tensors of the inference protocols alike)."""
    factor, offset = preprocessing.get("scale", 1.0), preprocessing.get("offset", 0.0)
    if factor != 1.0 or offset != 0.0:
        return pixels * np.float32(factor) + np.float32(offset)
    return pixels
