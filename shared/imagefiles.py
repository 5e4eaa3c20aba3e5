"""What an image file's bytes hold before Pillow parses them: the checks :mod:`shared.imaging`
runs first, at C speed over the bytes (``bytes.find``, regular expressions, a jump per block).

Pillow (and libwebp) keep a Python object or a record per metadata block, and skip padding one
Python iteration at a time, all before any pixel limit applies: 10 MB of empty JPEG markers or
one-byte GIF comment blocks took ~450 MB and seconds of CPU to open. So too many segments,
chunks or sub-blocks, or too much padding between them, is a 400 here; and the headers say what
Pillow would only find out by allocating (a WebP's canvas, a JPEG's scan count).
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass

import numpy as np

from shared.errors import BadRequest

MAX_JPEG_SCANS = 64  # encoders write at most ~20; each scan is another pass over every block
# Metadata blocks that Pillow or libwebp parse into an object or a record each, before any pixel
# limit applies (10 MB of them took 100-460 MB and up to 9 s of CPU to open). The limits are far
# above what real files carry and keep the worst case to a few MiB and tens of milliseconds.
# JPEG: marker segments in the first picture (SOI to EOI, RST markers inside scans not counted).
# Cameras write < 20; the most in real files are an ICC profile or Extended XMP (depth maps)
# split into 64 KB APP2/APP1 segments (~160 for 10 MB), plus a DHT and an SOS per scan (<= 64).
MAX_JPEG_SEGMENTS = 1024
# JPEG and GIF: bytes between segments or blocks that belong to none (0xFF fill, junk), which
# Pillow skips one Python iteration at a time (10 MB: 7-9 s of CPU). Encoders write none.
MAX_PADDING_BYTES = 64 * 1024
# GIF: data sub-blocks of the extensions before the first image, each a bytes object for
# Pillow (2 M one-byte comment blocks: 460 MB). A full upload of 255-byte comment blocks is 41 Ki;
# XMP (its packet read as sub-blocks, then its 258-byte "magic trailer" of 257 more) and ICC
# profiles are a few thousand at most.
MAX_GIF_SUB_BLOCKS = 65_536
# PNG: chunks in the file, and those other than image data (IDAT, and APNG's fcTL/fdAT): Pillow
# keeps every private chunk and every text chunk (870 Ki empty private chunks: 100 MB, 4 s). Real
# PNGs have < 30 metadata chunks; image data comes in chunks of 8 KB or more (libpng), so a
# 10 MB file holds ~1,300.
MAX_PNG_CHUNKS = 65_536
MAX_PNG_METADATA_CHUNKS = 4096
# WebP: RIFF chunks (libwebp's demuxer records each, ~48 B: 1.3 M empty chunks took 63 MB); an
# animation is one ANMF chunk per frame, far fewer than this in any real file.
MAX_WEBP_CHUNKS = 65_536
# A VP8L chunk, or an ALPH chunk whose header byte names a compression (its two low bits) other
# than 0, raw: 1 is lossless (2 and 3 are reserved, and counted too).
_WEBP_LOSSLESS = re.compile(
    rb"VP8L|ALPH[\x00-\xff]{4}[" + re.escape(bytes(b for b in range(256) if b & 3)) + rb"]", re.DOTALL
)
# JPEG: entries in the EXIF's first directory, which Pillow parses in Python as it opens a JPEG
# (for its resolution), warning for each broken one: 65,535 entries (in 13 APP1 segments) took
# 0.4 s. Cameras write 10-30 there.
MAX_EXIF_ENTRIES = 1024
_JPEG_SIZELESS = frozenset({0x01, *range(0xD0, 0xD9)})  # TEM, RSTn, SOI: markers without a length
_JPEG_MARKER = re.compile(rb"\xff(?=[^\x00\xff])")  # 0xFF and a marker code: fill and stuffing skipped
# The end of entropy-coded data: a marker other than RSTn, after any 0xFF fill (T.81 B.1.1.2
# allows fill before a restart marker too: that is not the end). Linear: the search skips to each
# 0xFF at C speed (a literal first byte), starts a match only at the first 0xFF of a run (the
# lookbehind), and eats the run without giving any back (possessive). As \xff+[^...] it tried a
# match at every byte (0.8 ms of a 101 KB photo's walk, which now takes 57 µs in all), and every
# 0xFF of a run of fill went over the rest of the run: 10 s of CPU for 40,000 fill bytes.
_JPEG_SCAN_END = re.compile(rb"\xff(?<!\xff\xff)\xff*+[^\x00\xd0-\xd7\xff]")
_JPEG_FILL = re.compile(rb"\xff*+")
_IN_SCAN = frozenset({0x00, *range(0xD0, 0xD8)})  # after 0xFF inside a scan: stuffing, RSTn
_GIF_JUNK = re.compile(rb"[^!,;]*")  # what Pillow skips between GIF blocks


# EXIF: bytes per value of each TIFF field type Pillow reads (it skips an entry of any other
# type), and how it reads a number of each. Pillow's getexif() parses every entry of a directory
# in Python and warns for each broken one: 65,535 entries (786 KB) took 0.4 s and wrote 13 MB of
# warnings to stderr.
_TIFF_UNIT = np.zeros(65536, np.uint64)
_TIFF_UNIT[[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 16]] = [1, 1, 2, 4, 8, 1, 1, 2, 4, 8, 4, 8, 4, 8]
_TIFF_NUMBERS = {3: "H", 4: "I", 5: "II", 6: "b", 8: "h", 9: "i", 10: "ii", 11: "f", 12: "d", 13: "I", 16: "Q"}
_TIFF_ENTRY = [("tag", "u2"), ("type", "u2"), ("count", "u4"), ("value", "u4")]
# The headers Pillow takes for a TIFF (two misspelt, and big-endian BigTIFF read as a plain TIFF;
# little-endian BigTIFF it cannot read in EXIF), and the one or two "Exif" prefixes it drops.
_TIFF_ORDER = {b"MM\x00*": ">", b"II*\x00": "<", b"MM*\x00": ">", b"II\x00*": "<", b"MM\x00+": ">"}
_EXIF_PREFIXES = re.compile(rb"(?:Exif\x00\x00){1,2}")
_ORIENTATION_TAG = 0x0112


def _first_directory(exif: bytes) -> tuple[bytes, str, int, int] | None:
    """An EXIF block's TIFF data (after the ``Exif`` prefixes Pillow drops), its byte order, and
    where its first directory starts and how many entries it says it has; None when Pillow would
    read no directory in it."""
    if prefixes := _EXIF_PREFIXES.match(exif):
        exif = exif[prefixes.end() :]
    order = _TIFF_ORDER.get(exif[:4])
    if order is None or len(exif) < 8:
        return None
    (start,) = struct.unpack_from(order + "I", exif, 4)
    if start + 2 > len(exif):
        return None
    return exif, order, start, struct.unpack_from(order + "H", exif, start)[0]


def exif_entries(exif: bytes) -> int:
    """How many entries of an EXIF block's first directory Pillow would read: those it says it
    has, as far as the block holds them."""
    if (directory := _first_directory(exif)) is None:
        return 0
    exif, _, start, count = directory
    return min(count, (len(exif) - start - 2) // 12)


def exif_orientation(exif: bytes) -> float | None:
    """The Orientation tag (0x0112) of an EXIF block's first directory as Pillow's getexif()
    reads it, every entry looked at in one vectorised pass: the first entry of that tag that
    Pillow keeps (a type it reads, a value it can read) decides, by its first value when it holds
    numbers (6.0 and 12/2 are 6 to Pillow too), else 0 (present, but no orientation). None when
    there is no such entry or no EXIF: Pillow then looks in the XMP."""
    if (directory := _first_directory(exif)) is None:
        return None
    exif, order, start, count = directory
    table = exif[start + 2 : start + 2 + 12 * count]
    entries = np.frombuffer(table, np.dtype([(name, order + kind) for name, kind in _TIFF_ENTRY]), len(table) // 12)
    size, tags, index = _TIFF_UNIT[entries["type"]] * entries["count"], entries["tag"], np.arange(len(entries))
    # Pillow passes over an entry whose tag it already holds, and one of a type it does not read.
    # Values over 4 bytes lie elsewhere: it adds up their sizes, skips every such entry once they
    # are past the block's (the k-th on), and stops at the first that lies past the block's end.
    first = _first_of_each_tag(tags, size > 0)  # before the k-th, every one of them is kept
    elsewhere = size > 4
    over = np.flatnonzero(np.cumsum(np.where(first & elsewhere, size, 0)) > len(exif))
    before_k = index < (over[0] if over.size else len(entries))
    kept = _first_of_each_tag(tags, (size > 0) & (before_k | ~elsewhere))
    past_end = np.flatnonzero(first & elsewhere & before_k & (entries["value"].astype(np.uint64) + size > len(exif)))
    orientation = kept & (tags == _ORIENTATION_TAG)
    if not (found := np.flatnonzero(orientation[: past_end[0] if past_end.size else None])).size:
        return None
    at, entry = int(found[0]), entries[int(found[0])]
    if (number := _TIFF_NUMBERS.get(int(entry["type"]))) is None:
        return 0
    where = start + 2 + 12 * at + 8 if size[at] <= 4 else int(entry["value"])  # in the entry, or where it points
    value = struct.unpack_from(order + number, exif, where)
    if len(value) == 2:  # a rational
        return value[0] / value[1] if value[1] else math.nan
    return float(value[0])


def _first_of_each_tag(tags: np.ndarray, among: np.ndarray) -> np.ndarray:
    """Which entries are the first of their tag among those ``among`` selects."""
    first = np.zeros(len(tags), bool)
    first[np.unique(np.where(among, tags, -1), return_index=True)[1]] = True
    result: np.ndarray = first & among
    return result


@dataclass(frozen=True)
class Structure:
    """What the walk found that the decode's cost depends on."""

    size: int  # the file's bytes
    scans: int = 0  # JPEG: scans (SOS segments) of the first picture
    frame: int = 0  # JPEG: the first picture's SOF marker code (0xC0 baseline, 0xC2 progressive, ...)
    # JPEG: the first scan leaves some of the frame's components out. libjpeg then keeps every
    # component's coefficients at full size, as for a progressive file, whatever the draft scale
    # (a 470 KB one-scan 40 Mpx CMYK file took 310 MiB).
    partial_scan: bool = False
    # WebP: lossless data (a VP8L image, or lossless alpha), whose Huffman tables libwebp builds
    # before any pixel (see shared.isolated)
    webp_lossless: bool = False

    @property
    def lossless(self) -> bool:
        """A lossless JPEG (SOF3, 7, 11, 15): libjpeg decodes it at full size only."""
        return self.frame in (0xC3, 0xC7, 0xCB, 0xCF)

    @property
    def arithmetic(self) -> bool:
        """An arithmetic-coded JPEG (SOF9 and up): libjpeg cannot stop and resume inside its data,
        so it must be handed the whole file at once."""
        return self.frame >= 0xC9


def webp_size(data: bytes) -> tuple[int, int] | None:
    """Canvas size from a WebP header: Pillow's WebP plugin has libwebp allocate its canvases
    inside Image.open, before any pixel limit is checked."""
    if len(data) < 30 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    chunk = data[12:16]
    if chunk == b"VP8X":
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if chunk == b"VP8L":
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 ":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    return None


def _jpeg_walk(data: bytes) -> Structure:
    """The scans (SOS segments) and frame (SOF) of the first picture, walking its marker segments as
    Pillow and libjpeg do (an EXIF thumbnail's scans are skipped with its segment, entropy-coded
    data jumped over, junk and 0xFF fill skipped; before the first scan Pillow reads on past an
    EOI, so does this walk); BadRequest when it holds more than MAX_JPEG_SEGMENTS segments or
    MAX_PADDING_BYTES of fill and junk, or more than MAX_JPEG_SCANS scans."""
    position, scans, frame, segments, padding, size = 2, 0, 0, 0, 0, len(data)
    components, partial = 0, False
    exif: list[bytes] = []
    while position + 1 < size:
        if data[position] != 0xFF or data[position + 1] in (0x00, 0xFF):
            window = position + MAX_PADDING_BYTES - padding + 2  # search no further than the limit
            match = _JPEG_MARKER.search(data, position, window)
            following = match.start() if match else size if window >= size else window
            if (padding := padding + following - position) > MAX_PADDING_BYTES:
                raise BadRequest(f"JPEG is invalid: over {MAX_PADDING_BYTES} bytes of padding between its markers")
            position = following
            continue
        marker = data[position + 1]
        if (segments := segments + 1) > MAX_JPEG_SEGMENTS:
            raise BadRequest(f"JPEG has over {MAX_JPEG_SEGMENTS} marker segments (metadata); send a plain image")
        if marker == 0xD9 and scans:
            break  # the end of the first picture (an MPO's next picture follows)
        if marker in _JPEG_SIZELESS or marker == 0xD9:
            position += 2
            continue
        if position + 4 > size:
            break  # truncated: the decoder will say so
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and not frame:
            frame = marker  # SOFn (C4, C8 and CC are DHT, JPG and DAC)
            components = data[position + 9] if position + 9 < size else 0
        if marker == 0xE1 and not scans and data.startswith(b"Exif\x00\x00", position + 4, position + 2 + length):
            exif.append(data[position + (4 if not exif else 10) : position + 2 + length])  # as Pillow joins them
        if marker == 0xDA and not scans and position + 4 < size:
            partial = data[position + 4] < components  # Ns, the scan's components, against the frame's Nf
        position += 2 + max(length, 2)  # a length under 2: Pillow and libjpeg read on after it
        if marker == 0xDA:
            if (scans := scans + 1) > MAX_JPEG_SCANS:
                raise BadRequest(f"JPEG has over {MAX_JPEG_SCANS} scans (limit {MAX_JPEG_SCANS})")
            position = _scan_end(data, position)
    if exif and (entries := exif_entries(b"".join(exif))) > MAX_EXIF_ENTRIES:
        raise BadRequest(f"JPEG's EXIF has {entries} entries (limit {MAX_EXIF_ENTRIES}); send a plain image")
    return Structure(size, scans, frame, partial)


def _scan_end(data: bytes, start: int) -> int:
    """Where the entropy-coded data beginning at ``start`` ends: the first marker other than
    RSTn, fill before it included (the end of ``data`` if none)."""
    size, fill_end = len(data), _JPEG_FILL.match(data, start).end()  # type: ignore[union-attr]
    if fill_end > start:  # fill right at the start, which the search's lookbehind would not see as one
        if fill_end == size:
            return size  # fill and nothing after it: no marker
        if data[fill_end] not in _IN_SCAN:
            return start  # fill, then a marker: the data ends here
        start = fill_end + 1
    match = _JPEG_SCAN_END.search(data, start)
    return match.start() if match else size


def _gif_walk(data: bytes) -> None:
    """BadRequest when the extensions before a GIF's first image hold more than
    MAX_GIF_SUB_BLOCKS sub-blocks, or more than MAX_PADDING_BYTES of junk lies between them."""
    if len(data) < 13:
        return
    position, blocks, padding, size = 13, 0, 0, len(data)
    if data[10] & 0x80:  # a global colour table
        position += 3 << ((data[10] & 7) + 1)
    while position < size:
        kind = data[position]
        if kind in b",;":
            return  # the first image (or the end): Pillow reads no further when it opens the file
        if kind != 0x21:
            window = position + MAX_PADDING_BYTES - padding + 1  # search no further than the limit
            following = _GIF_JUNK.match(data, position, window).end()  # type: ignore[union-attr]
            if (padding := padding + following - position) > MAX_PADDING_BYTES:
                raise BadRequest(f"GIF is invalid: over {MAX_PADDING_BYTES} bytes of junk between its blocks")
            position = following
            continue
        position += 2  # the introducer and the extension's label
        while position < size and (length := data[position]):
            position += 1 + length
            if (blocks := blocks + 1) > MAX_GIF_SUB_BLOCKS:
                raise BadRequest(f"GIF has over {MAX_GIF_SUB_BLOCKS} extension blocks (metadata); send a plain image")
        position += 1


def _png_walk(data: bytes) -> None:
    """BadRequest when a PNG has more than MAX_PNG_CHUNKS chunks, more than
    MAX_PNG_METADATA_CHUNKS that are not image data, or more than one ICC profile (the PNG
    standard allows one; Pillow inflates each, up to 1 MiB, when the file is opened)."""
    position, chunks, metadata, profiles, size = 8, 0, 0, 0, len(data)
    while position + 8 <= size:
        kind = data[position + 4 : position + 8]
        if (chunks := chunks + 1) > MAX_PNG_CHUNKS:
            raise BadRequest(f"PNG has over {MAX_PNG_CHUNKS} chunks; send a plain image")
        if kind not in (b"IDAT", b"fdAT", b"fcTL") and (metadata := metadata + 1) > MAX_PNG_METADATA_CHUNKS:
            raise BadRequest(f"PNG has over {MAX_PNG_METADATA_CHUNKS} metadata chunks; send a plain image")
        if kind == b"iCCP" and (profiles := profiles + 1) > 1:
            raise BadRequest("PNG is invalid: more than one ICC profile (iCCP chunk)")
        if kind == b"IEND":
            return
        position += 12 + int.from_bytes(data[position : position + 4], "big")


def _webp_walk(data: bytes) -> None:
    """BadRequest when a WebP has more than MAX_WEBP_CHUNKS chunks."""
    position, chunks, size = 12, 0, len(data)
    while position + 8 <= size:
        if (chunks := chunks + 1) > MAX_WEBP_CHUNKS:
            raise BadRequest(f"WebP has over {MAX_WEBP_CHUNKS} chunks; send a plain image")
        length = int.from_bytes(data[position + 4 : position + 8], "little")
        position += 8 + length + (length & 1)


def webp_lossless(data: bytes) -> bool:
    """Whether a WebP may hold lossless data, whose Huffman tables libwebp builds before any pixel
    (see shared.isolated): a VP8L chunk, or an ALPH chunk not stored raw, anywhere in the file.
    Searched for, not walked: libwebp's demuxer reads frames (ANMF) in ways a walk must follow
    exactly (a frame nested in a frame is a frame of its own), and a search finds every chunk it
    could read. A lossy file that merely holds these bytes costs only a child process."""
    return _WEBP_LOSSLESS.search(data) is not None


def check(data: bytes) -> Structure:
    """The metadata limits above, checked on the bytes before Pillow parses any; what the walk
    found (the JPEG's scans and frame)."""
    if data[:3] == b"\xff\xd8\xff":
        return _jpeg_walk(data)
    if data[:6] in (b"GIF87a", b"GIF89a"):
        _gif_walk(data)
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        _png_walk(data)
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        _webp_walk(data)
        return Structure(len(data), webp_lossless=webp_lossless(data))
    return Structure(len(data))
