"""Uploads as careful users and careless ones send them: formats, modes, orientation, bad data."""

import io
import shutil
import struct
import subprocess
import sys
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from local import ROOT
from local.helpers import demo_image, encode, flat, jpeg_one_scan, webp_huffman_groups
from shared import imaging, isolated
from shared.errors import BadRequest, ServiceUnavailable
from tests.conftest import predict_client, subprocess_env
from tests.test_predict import upload


def circle():
    return demo_image("shapes", "circle", 5)


def to_mode(image, mode):
    if mode == "I;16":
        grey = np.asarray(image.convert("L"), dtype=np.uint16) * 257
        image16 = Image.fromarray(grey)
        assert image16.mode == "I;16"
        return image16
    return image.convert(mode)


@pytest.mark.parametrize(
    "fmt, mode, save",
    [
        ("JPEG", "RGB", {"quality": 85}),
        ("JPEG", "L", {}),
        ("JPEG", "CMYK", {}),
        ("PNG", "RGBA", {}),
        ("PNG", "LA", {}),
        ("PNG", "P", {}),
        ("PNG", "I;16", {}),
        ("PNG", "1", {}),
        ("WEBP", "RGB", {"quality": 90}),
        ("BMP", "RGB", {}),
        ("GIF", "P", {}),
    ],
)
def test_formats_and_modes_are_understood(shapes_client, bearer, fmt, mode, save):
    image = to_mode(circle(), mode)
    reply = upload(shapes_client, bearer, (f"c.{fmt.lower()}", encode(image, fmt, **save)))
    assert reply.status_code == 200, reply.get_json()
    if mode != "1":  # a 1-bit dither may lose the shape; it must still be read
        assert reply.get_json()["prediction"] == "circle"


def multi_picture(image, **save):
    """``image`` as a stereo camera writes it: a JPEG with a Multi-Picture index and a second
    picture after the first (Pillow opens it as format "MPO")."""
    return encode(image, "MPO", save_all=True, append_images=[image.resize((64, 64))], **save)


def test_multi_picture_jpeg_is_read_and_bounded_as_a_jpeg(shapes_client, bearer):
    reply = upload(shapes_client, bearer, ("stereo.jpg", multi_picture(circle(), quality=90)))
    assert reply.status_code == 200 and reply.get_json()["prediction"] == "circle"
    # A progressive 6000x6000 picture keeps its whole-image coefficients while it decodes, more
    # than the decode budget: refused as a JPEG, and so as the same picture with an MP index
    # (which was decoded at full size instead, ~350 MiB for a 160 MiB budget).
    big = Image.new("RGB", (6000, 6000), (10, 20, 30))
    save = {"progressive": True, "subsampling": 0, "quality": 50}
    for name, data in (("big.jpg", encode(big, "JPEG", **save)), ("stereo.jpg", multi_picture(big, **save))):
        reply = upload(shapes_client, bearer, (name, data))
        assert reply.status_code == 400 and "MiB to decode" in reply.get_json()["error"], (name, reply.get_json())


def test_transparent_png_is_composited_not_black(shapes_client, bearer):
    # A black triangle on a fully transparent black background: dropping alpha instead of
    # compositing would leave an all-black image with no shape at all.
    from PIL import ImageDraw

    image = Image.new("RGBA", (120, 100), (0, 0, 0, 0))
    ImageDraw.Draw(image).polygon([(60, 10), (105, 88), (15, 88)], fill=(0, 0, 0, 255))
    reply = upload(shapes_client, bearer, ("t.png", encode(image)))
    assert reply.status_code == 200 and reply.get_json()["prediction"] == "triangle"


def test_animated_gif_uses_first_frame(shapes_client, bearer):
    frames = [demo_image("shapes", "square", 8), demo_image("shapes", "circle", 9)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert upload(shapes_client, bearer, ("a.gif", data)).get_json()["prediction"] == "square"


def test_exif_orientation_is_applied(settings, bearer):
    client = predict_client(settings, "arrows")
    stored = demo_image("arrows", "left", 11)  # pixels point left...
    exif = Image.Exif()
    exif[0x0112] = 6  # ...and the camera says: rotate 90° clockwise to view → it points up
    data = encode(stored, "JPEG", exif=exif.tobytes(), quality=92)
    reply = upload(client, bearer, ("photo.jpg", data), name="arrows")
    assert reply.status_code == 200 and reply.get_json()["prediction"] == "up"


def exif_block(order, entries, count=None, header=None, tail=b""):
    """EXIF bytes: one directory of ``entries`` (tag, type, count, 4 value bytes), ``count`` as
    its declared entry count (default: the real one), ``header`` instead of the TIFF one, and
    ``tail`` after the directory (where an entry's value may point)."""
    fmt = "<" if order == "II" else ">"
    head = (header or (b"II*\0" if order == "II" else b"MM\0*")) + struct.pack(fmt + "I", 8)
    table = b"".join(struct.pack(fmt + "HHI", tag, kind, n) + value for tag, kind, n, value in entries)
    directory = struct.pack(fmt + "H", len(entries) if count is None else count) + table + bytes(4)
    return b"Exif\0\0" + head + directory + tail


def exif_cases():
    """EXIF blocks as cameras write them and as broken or hostile files hold them."""
    rng = np.random.default_rng(7)
    for order in ("II", "MM"):
        fmt = "<" if order == "II" else ">"
        for value in range(10):
            short, long = struct.pack(fmt + "H", value) + bytes(2), struct.pack(fmt + "I", value)
            yield exif_block(order, [(0x010F, 2, 4, b"Cam\0"), (0x0112, 3, 1, short)])
            yield exif_block(order, [(0x0112, 4, 1, long)])
            yield exif_block(order, [(0x0112, 1, 1, long)])  # a byte: not an orientation to Pillow
            yield exif_block(order, [(0x0112, 3, 2, short)])  # two values: the first counts
            yield exif_block(order, [(0x0112, 99, 1, short), (0x0112, 3, 1, short)])  # unknown type skipped
            yield exif_block(order, [(0x0112, 3, 1, short), (0x0112, 3, 1, struct.pack(fmt + "HH", 6, 0))])
            yield exif_block(order, [(0x0112, 3, 1, short)], count=40)  # fewer entries than declared
            yield exif_block(order, [(0x010F, 2, 4_000_000, bytes(4)), (0x0112, 3, 1, short)])  # data past the end
            # Pillow reads any number: a float or a rational that is 6 turns the picture as 6 does.
            yield exif_block(order, [(0x0112, 11, 1, struct.pack(fmt + "f", value))])
            after = 8 + 2 + 12 + 4  # where the tail starts, from the TIFF header
            rational = struct.pack(fmt + "II", value * 2, 2)
            yield exif_block(order, [(0x0112, 5, 1, struct.pack(fmt + "I", after))], tail=rational)
            yield exif_block(order, [(0x0112, 3, 1, short)], header={"II": b"II\0*", "MM": b"MM*\0"}[order])  # misspelt
            yield exif_block(order, [(0x0112, 3, 1, short)], header=b"MM\0+" if order == "MM" else b"II+\0")  # BigTIFF
            yield b"Exif\0\0" + exif_block(order, [(0x0112, 3, 1, short)])  # two prefixes (Pillow drops both)
            yield b"Exif\0\0Exif\0\0" + exif_block(order, [(0x0112, 3, 1, short)])  # three (it reads none)
        for _ in range(150):
            entries = [
                (int(rng.choice([0x0112, 0x0112, 0x010F])), int(rng.choice([1, 2, 3, 4, 7, 9, 13, 0, 40])),
                 int(rng.choice([0, 1, 1, 2, 3])), rng.bytes(4))
                for _ in range(rng.integers(0, 6))
            ]  # fmt: skip
            yield exif_block(order, entries)


def test_exif_orientation_is_read_as_pillow_reads_it():
    # The service reads the Orientation tag itself (Pillow parses every entry in Python); on
    # every block, of cameras or broken, it must turn the picture as Pillow's getexif() says.
    picture, compared = Image.new("RGB", (8, 6), "red"), 0
    for exif in exif_cases():
        for fmt in ("JPEG", "PNG", "WEBP"):
            data = encode(picture, fmt, exif=exif)
            with warnings.catch_warnings():  # Pillow's, about the broken blocks
                warnings.simplefilter("ignore")
                ours, theirs = Image.open(io.BytesIO(data)), Image.open(io.BytesIO(data))
                ours.load()
                try:
                    expected = imaging._ORIENTATION.get(theirs.getexif().get(0x0112, 1))
                except (struct.error, SyntaxError):  # little-endian BigTIFF, three prefixes: Pillow fails
                    expected = None
            assert imaging._orientation(ours) == expected, (fmt, exif.hex())
            compared += 1
    assert compared > 1000


def test_exif_orientation_from_xmp_and_png_text():
    # Without an EXIF Orientation, Pillow (and so the service) takes XMP's tiff:Orientation.
    picture = Image.new("RGB", (8, 6), "red")
    for value in (1, 3, 6, 8):
        xmp = f'<x:xmpmeta><rdf:Description tiff:Orientation="{value}"/></x:xmpmeta>'.encode()
        text = PngImagePlugin.PngInfo()
        text.add_itxt("XML:com.adobe.xmp", xmp.decode())
        raw = PngImagePlugin.PngInfo()
        block = exif_block("MM", [(0x0112, 3, 1, struct.pack(">HH", value, 0))])[6:]
        raw.add_text("Raw profile type exif", f"\nexif\n{len(block):8d}\n" + block.hex())
        for data in (encode(picture, "JPEG", xmp=xmp), encode(picture, "WEBP", xmp=xmp),
                     encode(picture, "PNG", pnginfo=text), encode(picture, "PNG", pnginfo=raw)):  # fmt: skip
            image = Image.open(io.BytesIO(data))
            image.load()
            assert imaging._orientation(image) == imaging._ORIENTATION.get(value), (value, image.format)


def test_exif_with_65535_entries_costs_no_warnings_and_little_cpu(settings, bearer):
    # Each entry claims more data than the block holds: Pillow's getexif() warned for each
    # (13 MB of raw stderr per file) and took 0.4 s of CPU per file, outside the CPU budget.
    entries = [(tag, 7, 0x7FFFFFFF, struct.pack("<I", 8)) for tag in range(1, 65535)]
    entries.append((0x0112, 3, 1, struct.pack("<HH", 6, 0)))  # the last entry: rotate 90° clockwise
    exif = exif_block("II", entries)
    stored = demo_image("arrows", "left", 11)
    files = [(f"{i}.webp", encode(stored, "WEBP", exif=exif)) for i in range(12)]
    client = predict_client(settings, "arrows")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        started = time.process_time()
        reply = upload(client, bearer, *files, name="arrows")
        spent = time.process_time() - started
    assert reply.status_code == 200, reply.get_json()
    assert {result["prediction"] for result in reply.get_json()["results"]} == {"up"}
    assert [str(w.message) for w in caught] == []
    assert spent < imaging.Limits(1).cpu_seconds  # within one request's decode budget (it was 7 s)


def key_transparency_pngs():
    """A black triangle on a transparent background, stored as near-black, in every PNG kind of
    transparency: an alpha channel, and the colour keys (tRNS) of 1-bit, grey, 16-bit grey, RGB."""
    from PIL import ImageDraw

    alpha = Image.new("RGBA", (120, 100), (40, 40, 40, 0))
    ImageDraw.Draw(alpha).polygon([(60, 10), (105, 88), (15, 88)], fill=(0, 0, 0, 255))
    grey = alpha.convert("L")
    yield "RGBA", encode(alpha)
    yield "RGB key", encode(alpha.convert("RGB"), transparency=(40, 40, 40))
    yield "L key", encode(grey, transparency=40)
    yield "I;16 key", encode(Image.fromarray(np.asarray(grey).astype(np.uint16) * 257), transparency=40 * 257)
    yield "1 key", encode(Image.fromarray(np.asarray(grey) > 0), transparency=1)
    # Kinds Pillow widens to 8 bits without the key (it matched no pixel): 4-bit grey, 16-bit RGB.
    four = np.asarray(grey) >> 4
    yield "4-bit L key", raw_png(four[:, 0::2] << 4 | four[:, 1::2], 4, 0, struct.pack(">H", 40 >> 4))
    wide = np.repeat(np.asarray(grey, np.uint16)[..., None] * 257 + 1, 3, axis=2).astype(">u2")  # not a multiple of 257
    yield "16-bit RGB key", raw_png(wide, 16, 2, struct.pack(">HHH", *[40 * 257 + 1] * 3))


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(rows, depth, colour_type, trns):
    """A PNG of ``rows`` (bytes of each row, as the format packs them) with a tRNS chunk."""
    height, width = rows.shape[0], len(rows[0].tobytes()) * 8 // depth // (3 if colour_type == 2 else 1)
    data = b"".join(b"\0" + row.tobytes() for row in rows)
    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    chunks = png_chunk(b"IHDR", header) + png_chunk(b"tRNS", trns) + png_chunk(b"IDAT", zlib.compress(data))
    return b"\x89PNG\r\n\x1a\n" + chunks + png_chunk(b"IEND", b"")


@pytest.mark.parametrize("name, data", [pytest.param(*case, id=case[0]) for case in key_transparency_pngs()])
def test_every_kind_of_png_transparency_is_composited_over_white(shapes_client, bearer, name, data):
    # Optimisers (optipng, oxipng) store all-or-nothing alpha as a colour key: it must come out
    # white as an alpha channel does, not as the stored near-black (a triangle on black).
    assert "transparency" in Image.open(io.BytesIO(data)).info or name == "RGBA"
    reply = upload(shapes_client, bearer, ("t.png", data))
    assert reply.status_code == 200 and reply.get_json()["prediction"] == "triangle", (name, reply.get_json())
    limits, spec = imaging.Limits(40_000_000), {"height": 64, "width": 64, "channels": 3}
    assert imaging.model_input(data, limits, spec, {})[0, 0].tolist() == [255.0] * 3


def rle8_bmp(width, height, commands):
    """An 8-bit grey BMP whose pixels are the RLE8 ``commands`` (bottom row first)."""
    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(commands), 2835, 2835, 256, 0)
    offset = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(commands), 0, 0, offset) + info + palette + commands


def rle8_encode(image):
    """``image`` (L) as RLE8 commands: runs of one value, an end of line per row."""
    commands = bytearray()
    for row in np.asarray(image)[::-1]:
        starts = np.flatnonzero(np.diff(row.astype(int), prepend=-1))
        for start, end in zip(starts, [*starts[1:], len(row)], strict=True):
            for at in range(start, end, 255):
                commands += bytes((min(255, end - at), row[start]))
        commands += b"\x00\x00"
    return bytes(commands + b"\x00\x01")


def test_rle_bmp_is_decoded_and_its_python_decoder_is_counted(shapes_client, bearer):
    # Pillow decodes RLE in Python: 150-225 ns a pixel (1 ms per 6,000 here), and ~200 ns per byte
    # of commands that add nothing. The estimate counted 6 ns a pixel and no byte: a 3.5 KB file
    # of 65,535 x 610 pixels, each row one pixel then an end of line, took 8-12 s of CPU.
    circle_bmp = rle8_bmp(*circle().size, rle8_encode(circle().convert("L")))
    reply = upload(shapes_client, bearer, ("circle.bmp", circle_bmp))
    assert reply.status_code == 200 and reply.get_json()["prediction"] == "circle", reply.get_json()
    padded = rle8_bmp(65535, 610, b"\x01\xc8\x00\x00" * 610 + b"\x00\x01")
    idle = rle8_bmp(2, 2, b"\x02\x10" + b"\xff\x10" * 5_000_000 + b"\x00\x00\x02\x20\x00\x01")  # 10 MB
    several = [(f"{i}.bmp", rle8_bmp(8000, 610, b"\x01\xc8\x00\x00" * 610 + b"\x00\x01")) for i in range(4)]
    for files in ([("padded.bmp", padded)], [("idle.bmp", idle)], several):
        reply = upload(shapes_client, bearer, *files)
        assert reply.status_code == 400 and "s of CPU" in reply.get_json()["error"], reply.get_json()


def lossless_jpeg(grey):
    """``grey`` (2-D uint8) as an 8-bit lossless JPEG (SOF3, predictor 1: the pixel on the left)."""
    pixels = grey.astype(np.int32)
    predicted = np.empty_like(pixels)
    predicted[0, 0], predicted[0, 1:], predicted[1:, 0] = 128, pixels[0, :-1], pixels[:-1, 0]
    predicted[1:, 1:] = pixels[1:, :-1]
    differences = (pixels - predicted).ravel().tolist()
    bits = []  # Huffman: the 17 categories as 5-bit codes, each followed by its difference's bits
    for difference in differences:
        category = abs(difference).bit_length()
        bits.append(f"{category:05b}")
        if category:
            bits.append(f"{difference if difference > 0 else difference + (1 << category) - 1:0{category}b}")
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)
    data = int(stream, 2).to_bytes(len(stream) // 8, "big").replace(b"\xff", b"\xff\x00")

    def segment(marker, payload):
        return bytes((0xFF, marker)) + struct.pack(">H", len(payload) + 2) + payload

    height, width = grey.shape
    frame = segment(0xC3, struct.pack(">BHHB", 8, height, width, 1) + bytes((1, 0x11, 0)))
    table = segment(0xC4, bytes(1) + bytes((0, 0, 0, 0, 17)) + bytes(11) + bytes(range(17)))
    scan = segment(0xDA, bytes((1, 1, 0, 1, 0, 0)))
    return b"\xff\xd8" + frame + table + scan + data + b"\xff\xd9"


def test_lossless_jpeg_is_decoded_at_full_size(shapes_client, bearer):
    # libjpeg cannot scale a lossless JPEG: drafted like any other JPEG, it was refused as corrupt.
    grey = circle().convert("L").resize((400, 400))
    data = lossless_jpeg(np.asarray(grey))
    image = Image.open(io.BytesIO(data))
    image.load()
    assert np.array_equal(np.asarray(image), np.asarray(grey))  # what Pillow makes of the file
    reply = upload(shapes_client, bearer, ("lossless.jpg", data))
    assert reply.status_code == 200 and reply.get_json()["prediction"] == "circle", reply.get_json()


JPEGTRAN = shutil.which("jpegtran")


@pytest.mark.skipif(JPEGTRAN is None, reason="jpegtran (Debian's libjpeg-turbo-progs) makes the file: ./test.sh")
def test_arithmetic_coded_jpeg_is_decoded_and_counted(shapes_client, bearer):
    # libjpeg's arithmetic decoder cannot stop and resume inside the data, and Pillow handed it
    # 64 KB at a time: every such file over 64 KB was refused as corrupt.
    picture = np.asarray(circle().resize((1024, 1024)), dtype=np.int16)
    noisy = np.clip(picture + np.random.default_rng(3).integers(-20, 21, picture.shape), 0, 255).astype(np.uint8)
    huffman = encode(Image.fromarray(noisy), "JPEG", quality=95)
    arithmetic = subprocess.run([JPEGTRAN, "-arithmetic"], input=huffman, capture_output=True, check=True).stdout
    assert len(arithmetic) > 65536
    replies = [upload(shapes_client, bearer, ("a.jpg", data)).get_json() for data in (huffman, arithmetic)]
    assert replies[1] == replies[0] and replies[0]["prediction"] == "circle"
    limits = imaging.Limits(40_000_000)
    plain, coded = (imaging.header_cost(data, limits, (64, 64)) for data in (huffman, arithmetic))
    # Its cost follows the coefficients, not the bytes: 63 large equal ones a block cost 10 us a
    # block in a small file. Every block counts (1024 x 1024, 4:2:0: 24,576 blocks).
    assert coded.cpu_seconds > plain.cpu_seconds + 24_576 * 10e-6


def test_a_webp_with_too_many_huffman_groups_is_refused_in_little_memory(shapes_client, bearer):
    """A lossless WebP whose Huffman tables alone would take 371 MiB (295 KB on the wire) is
    decoded in a child process whose memory the kernel bounds: a 400 (this process, in a 384 MiB
    cgroup, never maps them: tests/test_memory.py)."""
    bomb = webp_huffman_groups()
    cost = imaging.header_cost(bomb, imaging.Limits(40_000_000), (64, 64))
    assert cost.isolated and cost.bytes < 200 << 20
    reply = upload(shapes_client, bearer, ("groups.webp", bomb))
    assert reply.status_code == 400 and "MiB or" in reply.get_json()["error"], reply.get_json()
    fewer = webp_huffman_groups(groups=500, side=64)  # few enough to decode here: its tables counted
    small = imaging.header_cost(fewer, imaging.Limits(40_000_000), (64, 64))
    assert not small.isolated and small.bytes >= 256 * 20 << 10  # 64 x 64: at most 256 groups of 20 KiB


def nested_frames(image_chunk: bytes, side: int = 1024) -> bytes:
    """An animated WebP whose one frame (ANMF) holds another frame holding ``image_chunk``, then
    an unknown chunk: libwebp's demuxer reads the inner frame as a frame of its own."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return kind + struct.pack("<I", len(payload)) + payload + b"\0" * (len(payload) & 1)

    def frame(inside: bytes) -> bytes:  # at 0,0, the canvas's size, 100 ms
        size = (side - 1).to_bytes(3, "little")
        return chunk(b"ANMF", bytes(6) + size + size + (100).to_bytes(3, "little") + b"\0" + inside)

    vp8x = chunk(b"VP8X", b"\x02" + bytes(3) + (side - 1).to_bytes(3, "little") * 2)  # animated
    body = b"WEBP" + vp8x + chunk(b"ANIM", bytes(6)) + frame(frame(image_chunk)) + chunk(b"XYZW", bytes(4))
    return b"RIFF" + struct.pack("<I", len(body)) + body


def test_a_lossless_frame_inside_a_frame_is_found(shapes_client, bearer):
    """However its chunks nest, a WebP that libwebp reads lossless data from is counted as one:
    the Huffman-group bomb inside a frame inside a frame was decoded here, 320 MiB past its
    estimate, when a walk looked inside top-level frames only."""
    nested = nested_frames(webp_huffman_groups()[12:])
    assert imaging.header_cost(nested, imaging.Limits(40_000_000), (64, 64)).isolated
    reply = upload(shapes_client, bearer, ("nested.webp", nested))
    assert reply.status_code == 400, reply.get_json()


def test_exif_after_the_pixel_data_still_turns_the_image(shapes_client, bearer):
    """A PNG's eXIf chunk may follow its pixel data, and reaches Pillow's info only as the image
    is loaded: read after that, it still turns the image upright."""
    picture = Image.fromarray(np.random.default_rng(8).integers(0, 256, (20, 40, 3), dtype=np.uint8))
    plain = encode(picture)
    exif = Image.Exif()
    exif[0x0112] = 6
    payload = exif.tobytes()
    late = struct.pack(">I", len(payload)) + b"eXIf" + payload + struct.pack(">I", zlib.crc32(b"eXIf" + payload))
    turned = plain[:-12] + late + plain[-12:]  # before IEND, after IDAT
    limits, spec = imaging.Limits(40_000_000), {"height": 40, "width": 20, "channels": 3}
    upright = encode(picture.transpose(Image.Transpose.ROTATE_270))
    assert np.array_equal(imaging.model_input(turned, limits, spec, {}), imaging.model_input(upright, limits, spec, {}))


def test_lossless_webp_decoded_in_a_child_matches_one_decoded_here(shapes_client, bearer):
    """A lossless WebP too large to bound here is decoded in a child process: the same pixels,
    turned upright by its EXIF, so the same answer, as the same picture in PNG, in colour and grey."""
    noise = np.random.default_rng(5).integers(-12, 13, (480, 640, 3))
    picture = Image.fromarray(np.clip(np.asarray(circle().resize((640, 480)), int) + noise, 0, 255).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # turned a quarter: the child must turn it as a decode here does
    webp, png = encode(picture, "WEBP", lossless=True, exif=exif), encode(picture, exif=exif)
    limits = imaging.Limits(40_000_000)
    assert imaging.header_cost(webp, limits, (64, 64)).isolated
    for spec in ({"height": 64, "width": 48, "channels": 3}, {"height": 48, "width": 48, "channels": 1}):
        child, here = (imaging.model_input(data, limits, spec, {}) for data in (webp, png))
        assert np.array_equal(child, here), spec
    replies = [
        upload(shapes_client, bearer, (name, data)).get_json() for name, data in (("c.webp", webp), ("c.png", png))
    ]
    assert replies[0] == replies[1] and replies[0]["prediction"] == "circle"


def test_a_decoder_child_that_cannot_run_is_the_servers_fault_not_the_clients(monkeypatch, tmp_path, caplog):
    """A child that fails for its own reasons (here: a Python that cannot import the project, as in
    a broken image) is a 503, logged with what it said, not a 400 blaming a good file."""
    noise = np.random.default_rng(6).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    webp = encode(Image.fromarray(noise), "WEBP", lossless=True)
    assert imaging.header_cost(webp, imaging.Limits(40_000_000), (64, 64)).isolated
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'shared'\" >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setattr(isolated.sys, "executable", str(broken))
    with pytest.raises(ServiceUnavailable), caplog.at_level("ERROR"):
        imaging.model_input(webp, imaging.Limits(40_000_000), {"height": 64, "width": 64, "channels": 3}, {})
    assert "image decoder failed" in caplog.text and "No module named 'shared'" in caplog.text


@pytest.mark.skipif(JPEGTRAN is None, reason="jpegtran (Debian's libjpeg-turbo-progs) makes the file: ./test.sh")
def test_a_jpeg_whose_first_scan_leaves_components_out_counts_full_buffers():
    """libjpeg keeps every component's coefficients at full size when the first scan holds only
    some of them (a 470 KB 40 Mpx CMYK file took 310 MiB): the estimate counts them, as for a
    progressive file, and the same picture in one interleaved scan stays small."""
    picture = flat("CMYK", (10, 20, 30, 40), (200, 100, 50, 0))
    one_scan, plain = jpeg_one_scan(picture), encode(picture, "JPEG", quality=50)
    assert one_scan is not None
    limits = imaging.Limits(40_000_000)
    coefficients = 4 * (6324 // 8 + 1) ** 2 * 64 * 2  # four components at full size, 2 bytes each
    assert imaging.header_cost(one_scan, limits, (64, 64)).bytes >= coefficients
    assert imaging.header_cost(plain, limits, (64, 64)).bytes < 64 << 20


def png_16bit_rgb_keyed(side: int = 6324) -> bytes:
    """A 16-bit RGB PNG with a colour key (tRNS) that every pixel matches: ~40 Mpx in about a
    megabyte."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    sample = bytes((0x12, 0x34, 0x56, 0x78, 0x9A, 0xBC))
    rows = zlib.compress((b"\x04" + sample * side) * side, 1)
    header = struct.pack(">IIBBBBB", side, side, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"tRNS", sample)
        + chunk(b"IDAT", rows)
        + chunk(b"IEND", b"")
    )


def test_two_16bit_colour_pngs_are_over_the_cpu_limit_of_one_request(shapes_client, bearer):
    """A 16-bit colour PNG costs three times an 8-bit one to decode (its samples unpacked): two of
    40 Mpx with a colour key took 5.7 s of CPU, over the 4 s a request may take, and were decoded."""
    keyed = png_16bit_rgb_keyed()
    reply = upload(shapes_client, bearer, ("a.png", keyed), ("b.png", keyed))
    assert reply.status_code == 400 and "too large to decode in one request" in reply.get_json()["error"]


def test_large_photo_and_tiny_icon(shapes_client, bearer):
    photo = Image.new("RGB", (640, 480), (30, 90, 200))
    from PIL import ImageDraw

    ImageDraw.Draw(photo).rectangle([220, 140, 420, 340], fill=(250, 240, 20))
    icon = photo.resize((32, 24))
    reply = upload(shapes_client, bearer, ("p.jpg", encode(photo, "JPEG")), ("i.png", encode(icon)))
    assert [r["prediction"] for r in reply.get_json()["results"]] == ["square", "square"]


def png_header_only(width, height):
    """A valid-looking PNG that claims width x height pixels (a decompression bomb's header)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def real_bomb():
    """A real 1-bit PNG of 12000x12000 white pixels: 18 KB on the wire, 432 MB as RGB."""
    return encode(Image.new("1", (12000, 12000), 1), "PNG", optimize=True)


@pytest.mark.parametrize(
    "files, words",
    [
        ([("empty.png", b"")], "empty"),
        ([("notes.txt", b"just some text, not pixels")], "not an image"),
        ([("doc.pdf", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n")], "not an image"),
        ([("cut.jpg", encode(circle(), "JPEG")[:1500])], "truncated"),
        ([("cut.png", encode(circle(), "PNG")[:-200])], "truncated"),
        ([("bomb.png", png_header_only(60000, 60000))], "too large"),
        ([("bomb.png", real_bomb())], "too large"),
        ([("ok.png", encode(circle())), ("bad.txt", b"nope")], "'bad.txt'"),
    ],
)
def test_bad_images_get_400_naming_the_problem(shapes_client, bearer, files, words):
    reply = upload(shapes_client, bearer, *files)
    assert reply.status_code == 400
    assert words in reply.get_json()["error"]


def test_pixel_limit_is_configurable(settings, bearer):
    client = predict_client(settings, "shapes", max_image_pixels=10000)
    assert upload(client, bearer, ("big.png", encode(Image.new("RGB", (101, 100))))).status_code == 400
    assert upload(client, bearer, ("ok.png", encode(Image.new("RGB", (100, 100))))).status_code == 200


def test_missing_file_field_and_wrong_content_type(shapes_client, bearer):
    no_file = shapes_client.post(
        "/models/shapes/predict.json", data={"other": "x"}, headers=bearer, content_type="multipart/form-data"
    )
    assert no_file.status_code == 400 and "'file'" in no_file.get_json()["error"]
    assert "this body has other" in no_file.get_json()["error"]
    unclosed = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n' + encode(circle())
    reply = shapes_client.post("/models/shapes/predict.json", data=unclosed, headers=bearer,
                               content_type="multipart/form-data; boundary=b")  # fmt: skip
    assert reply.status_code == 400 and "closing boundary" in reply.get_json()["error"]
    gzipped = shapes_client.post("/models/shapes/predict.json", data={"file": (io.BytesIO(b"x"), "a.png")},
                                 headers={**bearer, "Content-Encoding": "gzip"})  # fmt: skip
    assert gzipped.status_code == 415 and "Content-Encoding" in gzipped.get_json()["error"]
    raw = shapes_client.post(
        "/models/shapes/predict.json", data=encode(circle()), headers=bearer, content_type="image/png"
    )
    assert raw.status_code == 415


def test_too_many_files(shapes_client, bearer):
    small = encode(Image.new("RGB", (8, 8)))
    reply = upload(shapes_client, bearer, *[(f"{i}.png", small) for i in range(33)])
    assert reply.status_code == 400 and "too many images: 33 (limit 32" in reply.get_json()["error"]


def test_body_over_limit_is_413(settings, bearer):
    client = predict_client(settings, "shapes", max_upload_bytes=50000)
    reply = upload(client, bearer, ("big.bmp", encode(Image.new("RGB", (200, 200)), "BMP")))
    assert reply.status_code == 413


def test_bad_input_does_not_break_the_next_request(shapes_client, bearer):
    assert upload(shapes_client, bearer, ("b.png", real_bomb())).status_code == 400
    assert upload(shapes_client, bearer, ("c.png", encode(circle()))).get_json()["prediction"] == "circle"


def test_decoder_checks_header_before_pixels():
    # The header claims 10 Gpx but the data holds 64 bytes: only a header check can say "too large".
    spec = {"height": 4, "width": 4, "channels": 3}
    with pytest.raises(BadRequest, match="too large"):
        imaging.model_input(png_header_only(100000, 100000), imaging.Limits(40_000_000), spec, {})
    pixels = imaging.model_input(encode(Image.new("RGB", (10, 10), (10, 20, 30))), imaging.Limits(100), spec, {})
    assert pixels.shape == (4, 4, 3) and pixels[0, 0].tolist() == [10, 20, 30]


# -- hostile structure: metadata floods, very long sides, invalid headers ------------------------

FLOOD_BYTES = 10 * 1024 * 1024 - 8192  # the most one upload (MAX_UPLOAD_BYTES, less its framing) holds


def metadata_floods(size):
    """Images of 8x8 pixels that carry ``size`` bytes of metadata cut in the smallest blocks their
    format has: Pillow parsed each into an object (libwebp a record) before any pixel limit, 10 MB
    of them 100-460 MB and up to 9 s of CPU; all were answered 200."""
    jpeg = encode(Image.new("RGB", (8, 8)), "JPEG")
    gif = encode(Image.new("P", (8, 8)), "GIF")
    gif_at = 13 + (3 << ((gif[10] & 7) + 1) if gif[10] & 0x80 else 0)  # after the global palette
    png = encode(Image.new("RGB", (8, 8)))
    png_at = png.index(b"IDAT") - 4
    webp = encode(Image.new("RGB", (8, 8)), "WEBP", exif=b"Exif\0\0MM\0*\0\0\0\x08\0\0")  # VP8X: extended
    assert webp[12:16] == b"VP8X"
    varied = b"".join(bytes((0xFF, 0xE0 + n % 16, 0, 4, n % 256, 1)) for n in range(16))
    flood_webp = webp[12:30] + b"XXXX\0\0\0\0" * (size // 8) + webp[30:]
    tiff = exif_block("II", [(tag, 7, 0x7FFFFFFF, bytes(4)) for tag in range(min(size // 12, 65535))])[6:]
    exif = b"".join(  # in APP1 segments of 64,000 bytes, which Pillow joins into one block
        b"\xff\xe1" + struct.pack(">H", len(piece) + 8) + b"Exif\0\0" + piece
        for piece in (tiff[at : at + 64000] for at in range(0, len(tiff), 64000))
    )
    misspelt = exif.replace(b"Exif\0\0II*\0", b"Exif\0\0II\0*", 1)  # a header Pillow takes too
    short_app1 = b"\xff\xe1\x00\x06Exif\0\0"  # "Exif" and two junk bytes: no EXIF to Pillow, whose next one counts
    return {
        "jpeg-exif-entries": jpeg[:2] + exif + jpeg[2:],
        "jpeg-exif-entries-misspelt": jpeg[:2] + misspelt + jpeg[2:],
        "jpeg-exif-entries-after-a-short-app1": jpeg[:2] + short_app1 + exif + jpeg[2:],
        "jpeg-empty-app1": jpeg[:2] + b"\xff\xe1\x00\x02" * (size // 4) + jpeg[2:],
        "jpeg-varied-appn": jpeg[:2] + varied * (size // len(varied)) + jpeg[2:],
        "jpeg-comments": jpeg[:2] + b"\xff\xfe\x00\x02" * (size // 4) + jpeg[2:],
        "jpeg-fill-bytes": jpeg[:2] + b"\xff" * size + jpeg[2:],
        "gif-comment-blocks": gif[:gif_at] + b"\x21\xfe\x01c\x00" * (size // 5) + gif[gif_at:],
        "png-private-chunks": png[:png_at] + png_chunk(b"prVt", b"") * (size // 12) + png[png_at:],
        "webp-chunks": b"RIFF" + struct.pack("<I", len(flood_webp) + 4) + b"WEBP" + flood_webp,
    }


FLOOD_WORDS = {"jpeg-fill-bytes": "bytes of padding", "gif-comment-blocks": "extension blocks",
               "png-private-chunks": "metadata chunks"}  # fmt: skip


def flood_words(name):
    if name.startswith("jpeg-exif"):
        return "EXIF has"
    return FLOOD_WORDS.get(name, "marker segments" if name.startswith("jpeg") else "chunks")


@pytest.mark.parametrize("name", list(metadata_floods(0)))
def test_metadata_floods_are_refused_before_pillow_parses_them(shapes_client, bearer, name):
    # 1 MiB of each is over every limit (a few KB would do); tests/test_memory.py sends 10 MB.
    reply = upload(shapes_client, bearer, (name, metadata_floods(1 << 20)[name]))
    assert reply.status_code == 400, reply.get_json()
    assert flood_words(name) in reply.get_json()["error"]


def gif_with_xmp(image, packet):
    """``image`` as a GIF with an XMP packet as Adobe writes it: an application extension whose
    "sub-blocks" are the packet's own bytes, then a 258-byte "magic trailer"."""
    gif = encode(image, "GIF")
    at = 13 + (3 << ((gif[10] & 7) + 1) if gif[10] & 0x80 else 0)
    trailer = b"\x01" + bytes(range(255, -1, -1)) + b"\x00"
    return gif[:at] + b"\x21\xff\x0bXMP DataXMP" + packet + trailer + gif[at:]


def test_real_metadata_is_well_within_the_limits(shapes_client, bearer):
    from PIL import ImageCms, PngImagePlugin

    image = circle().resize((300, 200))
    xmp = b'<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
    xmp += b" " * 20000 + b'</x:xmpmeta><?xpacket end="w"?>'  # the usual padding: 600 sub-blocks in a GIF
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes() + b"\0" * 3_000_000
    text = PngImagePlugin.PngInfo()
    for n in range(200):
        text.add_text(f"key{n}", "value")
    exif = Image.Exif()
    exif[0x010F] = "Camera"
    files = [
        ("xmp.gif", gif_with_xmp(image, xmp)),
        ("icc.jpg", encode(image, "JPEG", icc_profile=icc, exif=exif.tobytes(), xmp=xmp, comment=b"hi")),  # 48 APP2
        ("stereo.jpg", multi_picture(image, quality=90)),
        ("restarts.jpg", encode(image, "JPEG", progressive=True, restart_marker_blocks=1)),
        ("text.png", encode(image, "PNG", pnginfo=text, icc_profile=icc[:3000])),
        ("meta.webp", encode(image, "WEBP", exif=exif.tobytes(), xmp=xmp, icc_profile=icc[:3000])),
    ]
    reply = upload(shapes_client, bearer, *files)
    assert reply.status_code == 200, reply.get_json()
    assert [r["prediction"] for r in reply.get_json()["results"]] == ["circle"] * len(files)


def long_png(width, height):
    """A grey PNG of width x height pixels, kilobytes on the wire."""
    rows = (b"\0" + b"\x80" * width) * height
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(rows, 9))
        + png_chunk(b"IEND", b"")
    )


def test_sides_over_65535_pixels_are_refused(shapes_client, bearer):
    # Within 40 Mpx, but 1 x 39,000,000 held 430 MiB for an estimate of ~45 MiB (a pointer per row),
    # and 39,000,000 x 1 314 MiB (a band is at least one row, converted to RGB).
    for width, height in ((1, 39_000_000), (39_000_000, 1)):
        reply = upload(shapes_client, bearer, ("long.png", long_png(width, height)))
        assert reply.status_code == 400 and "limit 65535 on a side" in reply.get_json()["error"], reply.get_json()
    assert upload(shapes_client, bearer, ("ok.png", long_png(40, 65535))).status_code == 200


def test_estimate_counts_row_pointers_and_the_bands():
    image, cost = imaging.open_image(long_png(40, 65535), 40_000_000, (64, 64))
    image.close()
    assert cost.bytes >= 40 * 65535 + 65535 * 8 + 24 * imaging.BAND_PIXELS
    # A small input makes the reduce blocks, and so the bands, larger than BAND_PIXELS.
    image, small = imaging.open_image(encode(Image.new("L", (6000, 6000))), 40_000_000, (4, 4))
    image.close()
    assert small.bytes >= 6000 * 6000 + 24 * (6000 * 6000 // 12)


def test_jpeg_with_zero_sampling_factors_is_400_not_500(shapes_client, bearer):
    data = bytearray(encode(Image.new("RGB", (37, 23)), "JPEG", progressive=True))
    at = data.index(b"\xff\xc2")  # SOF2: per component an id, then its sampling factors
    for component in range(data[at + 9]):
        data[at + 11 + 3 * component] = 0
    reply = upload(shapes_client, bearer, ("zero.jpg", bytes(data)))
    assert reply.status_code == 400 and "JPEG is invalid" in reply.get_json()["error"], reply.get_json()


def test_compressed_png_text_is_bounded_when_the_file_is_opened(shapes_client, bearer):
    """zTXt and iTXt are inflated as a PNG is opened, outside the decode budget: 63 chunks of 1 KB,
    each 1 MiB of text, held 67 MB a thread (Pillow's own cap is 64 MiB an image)."""
    png = encode(circle())
    at = png.index(b"IDAT") - 4
    text = b"".join(png_chunk(b"zTXt", b"k%d\0\0" % n + zlib.compress(b"A" * (1 << 20), 9)) for n in range(8))
    reply = upload(shapes_client, bearer, ("text.png", png[:at] + text + png[at:]))
    assert reply.status_code == 400 and "text chunks" in reply.get_json()["error"], reply.get_json()
    one = png_chunk(b"zTXt", b"k\0\0" + zlib.compress(b"A" * (1 << 20), 9))  # 1 MiB of text: fine
    assert upload(shapes_client, bearer, ("one.png", png[:at] + one + png[at:])).get_json()["prediction"] == "circle"
    # One ICC profile is the standard's; more, each inflated as the file opens, are refused.
    icc = png_chunk(b"iCCP", b"p\0\0" + zlib.compress(b"\0" * (1 << 20), 9))
    reply = upload(shapes_client, bearer, ("icc.png", png[:at] + icc * 2 + png[at:]))
    assert reply.status_code == 400 and "more than one ICC profile" in reply.get_json()["error"], reply.get_json()


def test_a_long_run_of_fill_in_a_scan_is_walked_in_linear_time(shapes_client, bearer, tmp_path):
    """Fill (0xFF) before a restart marker or a stuffed 0xFF00, which libjpeg skips, once made the
    structure walk go over the rest of the run from each of its bytes, holding the GIL: 40,000 of
    them (a valid 45 KB JPEG) took 10 s of CPU. A million must not hang it."""
    data = encode(circle(), "JPEG", restart_marker_blocks=1)
    restart = data.index(b"\xff\xd0", data.index(b"\xff\xda"))
    filled = data[:restart] + b"\xff" * 1_000_000 + data[restart:]
    (tmp_path / "fill.jpg").write_bytes(filled)
    # In a process of its own: the walk holds the GIL, so a thread here could not be waited for.
    walk = "import sys; from shared import imagefiles; print(imagefiles.check(open(sys.argv[1], 'rb').read()).scans)"
    scans = subprocess.run(
        [sys.executable, "-c", walk, str(tmp_path / "fill.jpg")],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,  # quadratic, the walk took hours
    )
    assert scans.stdout.strip() == "1", scans.stderr
    reply = upload(shapes_client, bearer, ("fill.jpg", filled))
    assert reply.status_code == 200 and reply.get_json()["prediction"] == "circle", reply.get_json()


def test_fill_bytes_before_a_restart_marker_are_not_the_end_of_the_scan(shapes_client, bearer):
    """T.81 allows 0xFF fill before any marker, RSTn inside a scan included: Pillow decodes such
    a JPEG, so the structure walk must not take what follows for padding."""
    data = encode(circle().resize((1600, 1600)), "JPEG", restart_marker_blocks=1)  # 10,000 restarts
    scan = data.index(b"\xff\xda")
    restart = data.index(b"\xff\xd0", scan)
    filled = data[:restart] + b"\xff" * 3 + data[restart:]
    reply = upload(shapes_client, bearer, ("fill.jpg", filled))
    assert reply.status_code == 200 and reply.get_json()["prediction"] == "circle", reply.get_json()
