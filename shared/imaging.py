"""Untrusted image bytes → the model's input, with memory and CPU bounded before any pixel.

Serving and ``train.py`` both call :func:`model_input`, so both see the same pixels. Pillow
decodes a PNG, WebP, GIF or BMP at full size whatever the model needs (only JPEG can decode at a
reduced scale), so the cost is bounded around that decode:

0. the file's structure is walked first, before Pillow parses any of it
   (:mod:`shared.imagefiles`): too many metadata blocks, or too much padding between them, is a
   400 (Pillow keeps an object per block: 10 MB of empty JPEG markers took ~450 MB to open);
1. the header is checked first (pixel count, each side at most 65,535 px; for WebP before libwebp
   allocates its canvas; for JPEG the scan count and sampling factors) and :func:`estimate`
   gives the decode's peak bytes and CPU seconds from the size and mode; :func:`check_request`
   refuses a request whose images would together take more than ``Limits.cpu_seconds`` of CPU;
2. a process-wide :class:`DecodeBudget` counts the estimated bytes of the decodes in flight, so
   the threads of one process never hold more full-size images than the budget (a request that
   cannot get its share soon is answered 503 + Retry-After);
3. the full-size image exists once, in the decoder's mode; everything else (palette, 1-bit and
   16-bit modes, alpha over white, CMYK, conversion to L/RGB, EXIF orientation, and the integer
   reduce that ``resize(reducing_gap=3)`` would do) runs on horizontal bands of a few hundred
   thousand pixels, whose height is a multiple of the reduce factor, so the result is exactly
   that of converting and resizing the whole image; 16-bit to 8-bit is an integer table lookup;
4. the full-size image is closed at once and glibc's ``malloc_trim`` hands its pages back, so a
   burst of large images does not leave the process at its peak size.

Figures per worst case (40 Mpx, each format and mode) are in the README.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import struct
import threading
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageFile, PngImagePlugin, UnidentifiedImageError

from shared import cgroup, imagefiles, isolated, libc
from shared.bands import ALPHA_MODES, BAND_PIXELS, REDUCING_GAP, reduced
from shared.config import Settings
from shared.errors import BadRequest, ServiceUnavailable

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
# Pillow opens a JPEG that carries a Multi-Picture index (APP2 "MPF": stereo cameras, some phones)
# as "MPO": the same file and decoder, its first picture read. It gets every JPEG rule: the draft,
# the scan limit, the progressive buffers (as "MPO" alone it decoded at full size, unbounded).
JPEG = ("JPEG", "MPO")
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated upload is an error, not a grey half-image
# Pillow warns about an upload's broken metadata (each corrupt EXIF entry of a JPEG it opens, up to
# thousands a file): the client's problem, not the operator's, and raw stderr lines between the
# JSON logs. Not shown.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
# A PNG's compressed text (zTXt, iTXt) is inflated as the file is opened, outside the decode
# budget: Pillow allows 64 MiB an image (63 chunks of 1 KB, each inflating to 1 MiB: 67 MB a
# thread from a 66 KB upload). 4 MiB in all is far above real metadata; over it is a 400.
PngImagePlugin.MAX_TEXT_MEMORY = 4 * 1024 * 1024
# Each side at most JPEG's (and GIF's) own maximum, 65,535 px: Pillow keeps an 8-byte pointer per
# row and a band is at least one row, so a 1x39,000,000 PNG (76 KB) took 430 MiB within 40 Mpx.
MAX_SIDE = 65_535
TRIM_AFTER_PIXELS = 4_000_000  # images this large give their freed pages back once decoded
BUDGET_WAIT_SECONDS = 5.0  # then 503 + Retry-After: the client comes back, no thread is held

# Bytes per pixel of Pillow's storage: every mode but the 8- and 16-bit ones takes 4 (RGB too).
_STORAGE = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
_ORIENTATION: dict[float, Image.Transpose] = {  # EXIF Orientation → transpose, as ImageOps.exif_transpose maps it
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(="|>)([0-9])')  # where Pillow looks without EXIF
_BAND_BYTES_PER_PIXEL = 6 * 4  # crop, RGBA, white, composite, RGB of one band (measured ~4 MiB)
_ROW_POINTER = 8  # Pillow's storage keeps a pointer per row
# CPU model, nanoseconds per pixel, fitted on 40 Mpx images (Pillow 13, one core of the 2-core
# machine this was built on) to over- rather than under-estimate. File size, which
# MAX_UPLOAD_BYTES bounds, adds entropy-decoding time on top (Huffman: 6-12 ns a byte).
_NS_DECODE = {"PNG": 10.0, "GIF": 5.0, "BMP": 2.0, "WEBP": 20.0, "JPEG": 1.0, "MPO": 1.0}  # per full-size pixel
# Pillow decodes an RLE BMP in Python: up to 225 ns a pixel (runs of one pixel), 153 (rows padded
# a pixel at a time after an end of line), and 195 ns a byte of commands that add nothing
# (measured idle; twice that beside other work). So a pixel and a byte each count.
_NS_BMP_RLE, _NS_BMP_RLE_BYTE = 300.0, 400.0
# A 16-bit colour PNG (RGB;16B, RGBA;16B, LA;16B), unpacked to 8 bits per sample: 33 ns a pixel
# measured against 11 for 8-bit RGB; with a colour key, 82 all told (a red team's 40 Mpx file).
_NS_PNG_16BIT_COLOUR = 40.0
# Lossless WebP data (an image, or alpha) on top of the lossy decode: 30-37 ns a pixel measured for
# lossless noise, 80-95 for lossy noise with lossless alpha (all told, against 20 + 25 counted).
_NS_WEBP_LOSSLESS = 40.0
_NS_PER_SCAN = 2.0  # progressive JPEG: each scan passes over the full-size coefficients
_NS_JPEG_LOSSLESS = 25.0  # per pixel, at full size (measured 9-16 ns)
# Arithmetic-coded JPEG: a decision per bit of every coefficient, whatever the draft, and a
# decision costs next to nothing in the file when it is always the same: blocks of 63 large equal
# coefficients took 10-12 us a block (1.1 us a byte). So a block counts, at full size.
_NS_ARITHMETIC_BLOCK = 20_000.0
_NS_BAND = 8.0  # crop + convert + transpose + reduce, per decoded pixel
_NS_ALPHA = 25.0  # compositing over white, per decoded pixel


@dataclass(frozen=True)
class Cost:
    """Estimated peak bytes and CPU seconds of decoding and preprocessing one image, and its
    pixels at full size (what the decoder's own buffers follow)."""

    bytes: int
    cpu_seconds: float
    pixels: int
    isolated: bool = False  # decoded in a child process (shared.isolated), which ``bytes`` includes


class DecodeBudget:
    """Estimated bytes of the decodes in flight in this process, first come first served: a
    large image waiting is not overtaken by a stream of small ones."""

    def __init__(self, total_bytes: int) -> None:
        self.total = total_bytes
        self._used = 0
        self._condition = threading.Condition()
        self._queue: deque[object] = deque()

    @contextlib.contextmanager
    def reserve(
        self, nbytes: int, wait: float = BUDGET_WAIT_SECONDS, busy: str = "busy decoding other large images"
    ) -> Iterator[None]:
        """Hold ``nbytes`` of the budget meanwhile: BadRequest if they can never fit,
        ServiceUnavailable (503, Retry-After) saying ``busy`` if they do not fit within ``wait``
        seconds."""
        if nbytes > self.total:
            raise BadRequest(
                f"image needs ~{nbytes >> 20} MiB to decode (limit {self.total >> 20} MiB); send a smaller image"
            )
        ticket = object()
        with self._condition:
            self._queue.append(ticket)
            fits = self._condition.wait_for(
                lambda: self._queue[0] is ticket and self._used + nbytes <= self.total, wait
            )
            self._queue.remove(ticket)
            if fits:
                self._used += nbytes
            self._condition.notify_all()
        if not fits:
            raise ServiceUnavailable(f"{busy}; retry shortly")
        try:
            yield
        finally:
            with self._condition:
                self._used -= nbytes
                self._condition.notify_all()


@dataclass(frozen=True)
class Limits:
    """How much decoding one image, one request and one process may do, and how much parsed
    JSON one process may hold."""

    max_pixels: int  # per image, from its header (MAX_IMAGE_PIXELS)
    budget: DecodeBudget = field(default_factory=lambda: DecodeBudget(1 << 62))  # per process, bytes
    # Estimated bytes of the V1/V2 JSON documents this process holds parsed, per process: one
    # document may take it all. Apart from the decode budget: the images inside such a document
    # draw on that one while the document is held.
    json_budget: DecodeBudget = field(default_factory=lambda: DecodeBudget(1 << 62))
    cpu_seconds: float = 4.0  # estimated decode CPU per request

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        """MAX_IMAGE_PIXELS, and a budget of DECODE_MEMORY_MB or else this container's memory
        limit less 224 MiB (a resting process with its model, and four requests' bodies in
        memory and in /tmp), at least 64 MiB; 160 MiB when there is no limit. 384 MiB → 160 MiB
        (every format and mode up to 40 Mpx but WebP), 512 MiB → 288 MiB. Parsed JSON has half
        as much again, its own: measured, a 384 MiB container holding both budgets full, four
        threads at once, stays under its limit."""
        budget = settings.decode_memory_mb << 20 if settings.decode_memory_mb else decode_budget(cgroup.memory_limit())
        return cls(settings.max_image_pixels, DecodeBudget(budget), json_budget=DecodeBudget(budget // 2))


def decode_budget(memory_limit: int | None) -> int:
    """The decode budget of a process in a container with ``memory_limit`` bytes (see
    :meth:`Limits.from_settings`); its JSON budget is half of it."""
    return max(64 << 20, memory_limit - (224 << 20)) if memory_limit else 160 << 20


# -- the header and the cost -------------------------------------------------------------------


def estimate(
    image: Image.Image, full_size: tuple[int, int], structure: imagefiles.Structure, target: tuple[int, int]
) -> Cost:
    """The cost of decoding ``image`` (opened and drafted, not loaded; ``structure`` what the walk
    found in its file) and reducing it in bands towards ``target``: its pixels in Pillow's storage
    and a pointer per row, plus what each decoder adds (measured): WebP keeps four canvases
    (16 B/px whatever the mode); a progressive JPEG, or one whose first scan leaves components
    out, keeps whole-image coefficient buffers at full size (2 bytes per coefficient), which draft
    does not shrink; an arithmetic-coded JPEG is read whole; an RLE BMP is decoded in Python into
    two more copies. A band is BAND_PIXELS, or more when one row, or one reduce block's rows (at
    most pixels / (3 x the target's smaller side)), is larger."""
    width, height = image.size
    pixels, full = width * height, full_size[0] * full_size[1]
    nbytes = pixels * _STORAGE.get(image.mode, 4) + height * _ROW_POINTER
    nanoseconds = full * _NS_DECODE.get(image.format or "", 20.0)
    tile = image.tile[0] if isinstance(image, ImageFile.ImageFile) and image.tile else None
    child = False
    if image.format == "WEBP":
        nbytes = pixels * 16
        if structure.webp_lossless:  # libwebp's Huffman tables (see shared.isolated), and slower pixels
            nanoseconds += full * _NS_WEBP_LOSSLESS
            tables = isolated.groups_bound(width, height, structure.size) * isolated.TABLE_BYTES_PER_GROUP
            if child := tables > isolated.IN_PROCESS_TABLE_BYTES:  # a child's Python, and what it may map
                tables = isolated.CHILD_TABLE_BYTES
                nbytes += isolated.CHILD_BASE_BYTES
                nanoseconds += isolated.CHILD_START_SECONDS * 1e9
            nbytes += tables
            nanoseconds += tables / isolated.TABLE_BYTES_PER_GROUP * isolated.NS_PER_GROUP
    elif image.format in JPEG and (image.info.get("progressive") or structure.scans > 1 or structure.partial_scan):
        nbytes += _jpeg_blocks(image, full_size) * 64 * 2
        nanoseconds += full * _NS_PER_SCAN * structure.scans
    elif image.format == "PNG" and tile and str(tile.args).startswith(("RGB;16", "RGBA;16", "LA;16")):
        nanoseconds = full * _NS_PNG_16BIT_COLOUR
    elif tile and tile.codec_name == "bmp_rle":
        nbytes += pixels * 2 + pixels // 8
        nanoseconds = full * _NS_BMP_RLE + structure.size * _NS_BMP_RLE_BYTE
    if structure.lossless:
        nanoseconds += full * _NS_JPEG_LOSSLESS
    if structure.arithmetic:
        nbytes += structure.size
        nanoseconds += _jpeg_blocks(image, full_size) * _NS_ARITHMETIC_BLOCK
    alpha = image.mode in ALPHA_MODES or "transparency" in image.info
    nanoseconds += pixels * (_NS_BAND + (_NS_ALPHA if alpha else 0.0))
    band = max(BAND_PIXELS, width, int(pixels / (REDUCING_GAP * max(1, min(target)))))
    return Cost(nbytes + band * _BAND_BYTES_PER_PIXEL, nanoseconds / 1e9, full, child)


def _jpeg_blocks(image: Image.Image, full_size: tuple[int, int]) -> int:
    """The 8x8 blocks of a JPEG at full size, over its components (each sampled at its factors)."""
    layers = getattr(image, "layer", None) or [(0, 1, 1, 0)] * len(image.getbands())
    hmax, vmax = max(h for _, h, _, _ in layers), max(v for _, _, v, _ in layers)
    return sum(
        math.ceil(math.ceil(full_size[0] * h / hmax) / 8) * math.ceil(math.ceil(full_size[1] * v / vmax) / 8)
        for _, h, v, _ in layers
    )


def open_image(data: bytes, max_pixels: int, target: tuple[int, int]) -> tuple[Image.Image, Cost]:
    """``data`` opened (its header read, no pixel decoded), refused with BadRequest when it is no
    image, corrupt or too large, drafted for JPEG (a reduced-scale decode still at least as large
    as ``target``), and its estimated cost."""
    if not data:
        raise BadRequest("file is empty")
    structure = imagefiles.check(data)
    if (size := imagefiles.webp_size(data)) and size[0] * size[1] > max_pixels:
        raise BadRequest(f"image too large: {size[0]}x{size[1]} pixels (limit {max_pixels})")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=FORMATS)
        except UnidentifiedImageError:
            raise BadRequest("not an image; send JPEG, PNG, WebP, GIF or BMP") from None
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            raise BadRequest(f"image too large (limit {max_pixels} pixels)") from None
        except (OSError, SyntaxError, ValueError, struct.error) as exc:
            raise BadRequest(f"image header is corrupt ({exc})") from None
    width, height = full_size = image.size
    if width * height > max_pixels:
        image.close()
        raise BadRequest(f"image too large: {width}x{height} pixels (limit {max_pixels})")
    if max(width, height) > MAX_SIDE:
        image.close()
        raise BadRequest(f"image too long: {width}x{height} pixels (limit {MAX_SIDE} on a side)")
    if image.format == "PNG":
        _png_colour_key(image)
    if image.format in JPEG:
        # Each component's sampling factors are 1 to 4 (ITU T.81 B.2.2); 0 also divides by zero
        if not all(1 <= h <= 4 and 1 <= v <= 4 for _, h, v, _ in getattr(image, "layer", [])):
            image.close()
            raise BadRequest("JPEG is invalid: a component's sampling factors are not 1 to 4")
        side = max(target)  # EXIF orientation may swap width and height: the larger side
        if not structure.lossless:  # libjpeg cannot scale a lossless JPEG (it refuses the decode)
            image.draft("RGB" if image.mode != "L" else "L", (side, side))
        if structure.arithmetic:  # handed over in one piece (see imagefiles.Structure.arithmetic)
            image.decodermaxblock = len(data)
    return image, estimate(image, full_size, structure, target)


def _png_colour_key(image: Image.Image) -> None:
    """A PNG's colour key (tRNS) in the scale of the pixels Pillow gives: it widens 2- and 4-bit
    grey to 8 bits and keeps the high byte of 16-bit RGB, but leaves the key as stored (so it
    matched no pixel, and the transparent background kept its stored colour)."""
    tile = image.tile if isinstance(image, ImageFile.ImageFile) else None
    key, rawmode = image.info.get("transparency"), tile[0].args if tile else None
    if isinstance(key, int) and rawmode in ("L;2", "L;4"):
        image.info["transparency"] = key * (85 if rawmode == "L;2" else 17)
    elif isinstance(key, tuple) and rawmode == "RGB;16B":
        image.info["transparency"] = tuple(value >> 8 for value in key)  # as close as 8 bits get


def header_cost(data: bytes, limits: Limits, target: tuple[int, int]) -> Cost:
    """The estimated cost of an image, from its header alone (BadRequest as :func:`open_image`)."""
    image, cost = open_image(data, limits.max_pixels, target)
    image.close()  # an opened WebP holds libwebp's (still untouched) canvases
    return cost


def check_request(costs: Sequence[Cost], limits: Limits) -> None:
    """BadRequest when one request's images would together take more than
    ``limits.cpu_seconds`` to decode (32 worst-case images would otherwise cost a minute)."""
    if (total := sum(cost.cpu_seconds for cost in costs)) > limits.cpu_seconds:
        raise BadRequest(
            f"images too large to decode in one request (~{total:.1f} s of CPU, limit "
            f"{limits.cpu_seconds:.0f} s); send fewer or smaller images"
        )


# -- decoding in bands -------------------------------------------------------------------------


def _orientation(image: Image.Image) -> Image.Transpose | None:
    """How to turn ``image`` upright, from its EXIF Orientation, else its XMP's, as Pillow's
    getexif() finds them, but read by :func:`imagefiles.exif_orientation` (see there why)."""
    info, value = image.info, None
    exif = info.get("exif")
    # A broken EXIF block is not worth refusing the image for: it stays as stored.
    with contextlib.suppress(ValueError, TypeError):
        if exif is None and "Raw profile type exif" in info:  # PNG text chunk (ImageMagick, exiftool)
            exif = bytes.fromhex("".join(info["Raw profile type exif"].split("\n")[3:]))
        if isinstance(exif, bytes):
            value = imagefiles.exif_orientation(exif)
    if value is None:
        xmp = info.get("XML:com.adobe.xmp") or info.get("xmp")  # PNG's iTXt (str), JPEG's and WebP's (bytes)
        xmp = xmp.encode("utf-8", "replace") if isinstance(xmp, str) else xmp
        if isinstance(xmp, bytes) and (found := _XMP_ORIENTATION.search(xmp)):
            value = int(found[2])
    return _ORIENTATION.get(value or 1)


def model_input(
    data: bytes,
    limits: Limits,
    input_spec: dict[str, Any],
    preprocessing: dict[str, Any],
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Image bytes → the model's input: float32 of shape (height, width, channels), upright,
    transparency over white, resized (stretched, bilinear) and scaled as ``preprocessing`` says,
    written into ``out`` when given (a row of the request's batch). BadRequest names the problem
    (not an image, truncated, too many pixels, too costly)."""
    height, width, channels = input_spec["height"], input_spec["width"], input_spec["channels"]
    image, cost = open_image(data, limits.max_pixels, (width, height))
    if cost.cpu_seconds > limits.cpu_seconds:
        image.close()
        check_request([cost], limits)  # one image alone over the per-request CPU limit
    mode = "L" if channels == 1 else "RGB"
    with limits.budget.reserve(cost.bytes):
        if cost.isolated:
            method = _orientation(image)  # a WebP's EXIF and XMP are read as it is opened
            _close(image)
            child_bytes = cost.bytes - isolated.CHILD_BASE_BYTES
            # Its own estimate, twice over, not the request's: 32 children must not take 4 s each.
            pixels = isolated.decode(data, (width, height), mode, method, child_bytes, 2 * cost.cpu_seconds)
            return scale(pixels, preprocessing, out)
        try:
            pixels = _decoded(image, (width, height), mode)
        except (OSError, SyntaxError, ValueError, EOFError, struct.error):
            raise BadRequest("image data is truncated or corrupt") from None
        finally:
            _close(image)  # free the pixels now, even while a traceback still refers to the image
            del image
            if cost.pixels >= TRIM_AFTER_PIXELS:  # its full-size buffers (and the decoder's) go back
                release_memory()
    return scale(pixels, preprocessing, out)


def _close(image: Image.Image) -> None:
    image.close()
    if hasattr(image, "_decoder"):
        image._decoder = None  # WebP: libwebp's canvases live as long as this reference


def _decoded(image: Image.Image, size: tuple[int, int], mode: str) -> np.ndarray:
    """``image`` (opened, not loaded) decoded, upright, in ``mode`` ("L" or "RGB") and resized to
    ``size`` (stretched, bilinear), in bands: uint8 of shape (height, width, channels)."""
    image.load()  # first: a PNG's EXIF or XMP after its pixel data reaches image.info only now
    small = reduced(image, size, mode, _orientation(image))
    return np.asarray(small).reshape(size[1], size[0], 1 if mode == "L" else 3)  # a copy: the image may go


def release_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing).

    Without this after each large decode, a 160 MiB budget let 4 threads reach 619 MiB
    (measured); with it, 209 MiB. It costs ~0.2 ms: not worth it after a small image."""
    if libc.malloc_trim is not None:
        libc.malloc_trim(0)


def scale(pixels: np.ndarray, preprocessing: dict[str, Any], out: np.ndarray | None = None) -> np.ndarray:
    """Pixel values as the model's input, float32: ``pixel * scale + offset`` as ``preprocessing``
    says (uploads and raw-pixel tensors of the inference protocols alike), in one pass into
    ``out`` (made when not given)."""
    factor, offset = preprocessing.get("scale", 1.0), preprocessing.get("offset", 0.0)
    if out is None:
        out = np.empty(pixels.shape, np.float32)
    if factor != 1.0:
        np.multiply(pixels, np.float32(factor), out=out, dtype=np.float32)
    else:
        np.copyto(out, pixels)
    if offset != 0.0:
        out += np.float32(offset)
    return out
