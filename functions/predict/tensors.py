"""Tensors in and out of the inference protocols (V1 and V2): the raw request body, numeric
tensors checked against the model's input, base64 images, and V2's binary BYTES layout.

A numeric tensor never goes through :func:`pipeline.decode`: it is already shaped for the model.
Float tensors are the model's input as it is; integer tensors (V2 ``UINT8``) are raw pixels,
scaled as the bundle's preprocessing says (the same code uploads go through).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import math
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import flask
import numpy as np

from functions.predict import pipeline
from functions.predict.model import Model
from shared import imaging, jsonbody
from shared.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

GZIP_MAGIC = b"\x1f\x8b"  # how every gzip member begins (RFC 1952)
# A gzip body may be several members one after the other (``cat a.gz b.gz``); each costs a
# decompressor, so there is a bound (bgzip's 64 KiB members make 160 of a 10 MiB body).
MAX_GZIP_MEMBERS = 1024
# After the first member (given the whole body, as a body of one member is read in one call),
# compressed input is fed in pieces of this size: what zlib copies at the end of each member
# (the input left over) stays small however many members follow.
INFLATE_CHUNK = 64 * 1024


def read_body(request: flask.Request, limit: int) -> bytes:
    """The request body whatever its Content-Type (tritonclient sends none, ``curl -d`` sends a
    form type), inflated when ``Content-Encoding`` is gzip or deflate: at most ``limit`` bytes
    after inflating too (more → PayloadTooLarge), so a small bomb cannot fill the memory. A gzip
    body may hold several members (RFC 1952), read one after the other under the same limit;
    bytes after the end that are not another member are a BadRequest; a multipart upload, sent
    here instead of to the multipart route, an UnsupportedMediaType saying where it goes."""
    if request.mimetype == "multipart/form-data":
        raise UnsupportedMediaType(
            "this endpoint takes a JSON body (V2: JSON with binary data); send a multipart upload to "
            "/models/<name>/predict.json"
        )
    body = request.get_data(cache=False)
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or none")
    wbits = zlib.MAX_WBITS | 16 if encoding == "gzip" else zlib.MAX_WBITS
    view, at, pieces, size, step = memoryview(body), 0, [], 0, len(body)
    for _member in range(MAX_GZIP_MEMBERS):
        inflater = zlib.decompressobj(wbits)
        while not inflater.eof and at < len(view):
            chunk = view[at : at + step]
            try:
                data = inflater.decompress(chunk, limit + 1 - size)  # never 0 (no limit): size <= limit
            except zlib.error:
                raise BadRequest(f"body is not valid {encoding} data") from None
            size += len(data)
            if size > limit:
                raise PayloadTooLarge(limit, f"request body after {encoding} decompression")
            pieces.append(data)
            at += len(chunk) - len(inflater.unused_data)  # below the limit, zlib took all it was given
        if not inflater.eof:
            raise BadRequest(f"{encoding} body is truncated")
        if at == len(view):
            return pieces[0] if len(pieces) == 1 else b"".join(pieces)
        if encoding != "gzip" or view[at : at + 2] != GZIP_MAGIC:
            raise BadRequest(f"{len(view) - at} bytes follow the end of the {encoding} data (not another gzip member)")
        step = INFLATE_CHUNK
    raise BadRequest(f"gzip body of more than {MAX_GZIP_MEMBERS} members")


@contextmanager
def parsed(text: bytes | memoryview, what: str, limits: imaging.Limits, advice: str = "") -> Iterator[Any]:
    """``text`` parsed as JSON, its estimated memory held in the process's JSON budget while the
    block runs (the document, and what is made from it, live that long: a caller leaves the block
    with the batch alone, before it waits for the model): together, the threads of one process
    hold no more parsed JSON than the budget, however many they are. A
    document that could never fit is a BadRequest before parsing, as is one that is not JSON
    (its message followed by ``advice``); one that does not fit beside the others within a few
    seconds is a 503 with Retry-After."""
    data = text if isinstance(text, bytes) else bytes(text)
    try:
        cost = jsonbody.checked_cost(data, what, limits.json_budget.total)
    except BadRequest as exc:
        raise BadRequest(f"{exc.message}{advice}") from None
    with limits.json_budget.reserve(cost, busy="busy parsing other large JSON requests"):
        try:
            doc = jsonbody.parse(data, what)
        except BadRequest as exc:
            raise BadRequest(f"{exc.message}{advice}") from None
        yield doc


def check_batch_size(count: int, what: str) -> None:
    """BadRequest when a request holds no example or more than the per-request limit."""
    if count < 1:
        raise BadRequest(f"no {what} in the request")
    if count > pipeline.MAX_FILES:
        raise BadRequest(f"too many {what}: {count} (limit {pipeline.MAX_FILES} per request)")


def input_shape(model: Model) -> list[int]:
    """The model's input shape without the batch dimension: [height, width, channels]."""
    spec = model.meta["input"]
    return [spec["height"], spec["width"], spec["channels"]]


def dense(value: Any, where: str) -> np.ndarray:
    """Nested JSON lists of numbers → an array; BadRequest for ragged lists, strings, booleans
    or nulls. The leaves' types are looked at first, in C (itertools and map, no Python loop):
    numpy would quietly turn ``"1.5"`` and ``true`` into numbers, and one long string among
    numbers into an array of that many such strings (a 45 KB body asked for 953 MiB)."""
    kinds = _leaf_types(value)
    if bool in kinds:
        raise BadRequest(f"{where}: values must be numbers, not true or false")
    if not kinds <= {int, float, list}:
        raise BadRequest(f"{where}: values must be numbers, in a rectangular nested list")
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        raise BadRequest(f"{where}: not a rectangular (dense) nested list of numbers") from None
    if array.dtype == object:
        try:  # integers past 64 bits (among floats too): numbers, as 1e20 is
            array = array.astype(np.float64)
        except (OverflowError, TypeError, ValueError):
            raise BadRequest(f"{where}: a number beyond the range of floating point") from None
    if array.dtype.kind not in "iuf":
        raise BadRequest(f"{where}: values must be numbers, in a rectangular nested list")
    return array


def _leaf_types(value: Any) -> set[type]:
    """The types of the leaves of ``value``, nested lists as deep as its first elements go (a
    list among them: ragged, or empty; numpy tells which)."""
    depth, first = 0, value
    while isinstance(first, list) and first:
        depth, first = depth + 1, first[0]
    leaves: Any = [value]
    for _ in range(depth):
        leaves = itertools.chain.from_iterable(leaves)
    try:
        return set(map(type, leaves))
    except TypeError:  # a number where a list should be: ragged
        return {list}


def model_input(array: np.ndarray, model: Model, where: str, *, pixels: bool = False) -> np.ndarray:
    """A numeric batch (n, height, width, channels) as the model's float32 input, checked: the
    shape, finite values, and for ``pixels`` (integer data) the 0..255 range, then scaled as the
    bundle's preprocessing says."""
    want = input_shape(model)
    if array.ndim != 4 or list(array.shape[1:]) != want:
        raise BadRequest(
            f"{where}: shape {list(array.shape)} does not fit the model's input [-1, {', '.join(map(str, want))}]"
        )
    check_batch_size(array.shape[0], "instances")
    if pixels:
        if array.size and (array.min() < 0 or array.max() > 255):
            raise BadRequest(f"{where}: pixel values must be within 0..255")
        return imaging.scale(array, model.meta["preprocessing"])
    with np.errstate(over="ignore", invalid="ignore"):  # overflow becomes inf, refused below
        batch = array.astype(np.float32, copy=False)
    if not np.isfinite(batch).all():
        raise BadRequest(f"{where}: values must be finite numbers (no NaN or Infinity, nothing beyond float32)")
    return batch


def b64_image(value: Any, where: str) -> pipeline.Upload:
    """A base64 string holding an image file, as an upload named ``where`` (for messages)."""
    if not isinstance(value, str):
        raise BadRequest(f"{where}: an image must be a string of base64")
    # Wrapped base64 (the base64 command's default) is still base64, and so is base64 without its
    # "=" padding (Go's RawStdEncoding, some JavaScript encoders), which TF Serving takes too.
    text = value.replace("\n", "").replace("\r", "") if "\n" in value else value
    text += "=" * (-len(text) % 4) if len(text) % 4 != 1 else ""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"{where}: bad base64 ({exc})") from None
    return pipeline.Upload(data, where)


def flatten(value: Any) -> Iterator[Any]:
    """The leaves of nested lists, row-major (without recursion: the nesting is the client's)."""
    stack = [iter([value])]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            yield item
        else:
            stack.pop()


def element_count(shape: list[int]) -> int:
    return math.prod(shape)


# -- V2's binary BYTES layout: each element is a 4-byte little-endian length, then its bytes ----


def pack_bytes(items: list[bytes]) -> bytes:
    """BYTES elements in the binary tensor data layout."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def unpack_bytes(data: memoryview, where: str, count: int) -> list[bytes]:
    """The ``count`` BYTES elements of a binary section; BadRequest when a length overruns it,
    or when it holds more or fewer elements (more: found at the first one too many, before the
    rest is unpacked)."""
    items: list[bytes] = []
    offset = 0
    while offset < len(data):
        if len(items) == count:
            raise BadRequest(f"{where}: binary data holds more than {count} BYTES elements, its shape needs {count}")
        if offset + 4 > len(data):
            raise BadRequest(f"{where}: binary BYTES data ends inside an element's 4-byte length")
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + length > len(data):
            raise BadRequest(f"{where}: binary BYTES element of {length} bytes runs past its binary_data_size")
        items.append(bytes(data[offset : offset + length]))
        offset += length
    if len(items) != count:
        raise BadRequest(f"{where}: binary data holds {len(items)} BYTES elements, its shape needs {count}")
    return items
