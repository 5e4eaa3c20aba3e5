"""shared/multipart.py: multipart bodies split in memory, as werkzeug's parser reads them."""

import io
import re

import flask
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from werkzeug.datastructures import MultiDict
from werkzeug.formparser import MultiPartParser

from local.helpers import demo_image, encode
from shared.errors import BadRequest
from shared.http import Request
from shared.multipart import split


def part(name: str, content: bytes, filename: str | None = None, newline: bytes = b"\r\n") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
    head = f"Content-Disposition: {disposition}".encode()
    if filename is not None:
        head += newline + b"Content-Type: application/octet-stream"
    return head + newline + newline + content


def body(
    parts: list[bytes], boundary: bytes, newline: bytes = b"\r\n", preamble: bytes = b"", epilogue: bytes = b""
) -> bytes:
    delimiter = b"--" + boundary
    start = preamble + newline if preamble else b""
    middle = b"".join(delimiter + newline + p + newline for p in parts)
    return start + middle + delimiter + b"--" + newline + epilogue


def as_lists(form: MultiDict, files: MultiDict):
    """What a handler sees: every key's values in the order sent."""
    read = [(name, f.filename, f.read(), f.content_type) for name, f in files.items(multi=True)]
    return list(form.items(multi=True)), read


def werkzeug_reads(data: bytes, boundary: bytes):
    return as_lists(*MultiPartParser().parse(io.BytesIO(data), boundary, len(data)))


def splits(data: bytes, boundary: bytes):
    fields, files = split(data, boundary)
    return as_lists(MultiDict(fields), MultiDict(files))


# Contents that look like delimiters: what a short boundary meets inside binary data.
CONTENTS = st.lists(
    st.sampled_from(
        [b"\r\n", b"\n", b"--", b"b", b"\r\n--b", b"\n--bx", b"--b--", b"\r\n\r\n", b"x", b"\x00\xff", b" \t"]
    ),
    max_size=12,
).map(b"".join)
NAMES = st.text("abcxyz_-é ", min_size=1, max_size=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(
    parts=st.lists(st.tuples(NAMES, CONTENTS, st.none() | NAMES), min_size=1, max_size=5),
    newline=st.sampled_from([b"\r\n", b"\n"]),
    boundary=st.sampled_from([b"b", b"XyZ", b"----WebKitFormBoundary7MA4YWxkTrZu0gW"]),
    preamble=st.sampled_from([b"", b"ignored preamble", b"--b not a delimiter"]),
    epilogue=st.sampled_from([b"", b"trailing words", b"\r\n--b\r\n"]),
)
def test_reads_every_body_as_werkzeug_does(parts, newline, boundary, preamble, epilogue):
    # A sender picks a boundary that no delimiter line inside a part holds (RFC 2046 5.1.1); the
    # boundary's text itself may be there, as in binary data.
    delimiter_line = re.compile(rb"\n--" + boundary + rb"(--|[ \t]*(\r?\n|$))")
    assume(not any(delimiter_line.search(b"\n" + content + newline) for _, content, _ in parts))
    data = body([part(n, c, f, newline) for n, c, f in parts], boundary, newline, preamble, epilogue)
    assert splits(data, boundary) == werkzeug_reads(data, boundary)


def test_a_file_holding_the_boundary_text_arrives_whole():
    content = b"\x89PNG\r\n--bx\r\n--b \x00\n--bb--x" * 3  # '--b' inside, but never as a delimiter line
    fields, files = split(body([part("file", content, "a.png"), part("note", b"hi")], b"b"), b"b")
    assert [(name, f.filename, f.read()) for name, f in files] == [("file", "a.png", content)]
    assert fields == [("note", "hi")]


@pytest.mark.parametrize(
    "data, why",
    [
        (b"", "no delimiter"),
        (b'--b\r\nContent-Disposition: form-data; name="f"\r\n\r\nno end', "unclosed"),
        (b'--b\r\nContent-Disposition: form-data; name="f"\r\nno blank line\r\n--b--\r\n', "no blank line"),
        (b'--b\r\nContent-Disposition: form-data; name="f"; filename="a.png"\r\n\r\nPART\r\n--b', "cut short"),
        (b"--b", "a delimiter and nothing else"),
    ],
)
def test_a_broken_body_is_a_value_error(data, why):
    if why == "a delimiter and nothing else":  # werkzeug reads an empty form here; so does split
        assert split(data, b"b") == ([], [])
        return
    with pytest.raises(ValueError):
        split(data, b"b")


@pytest.mark.parametrize(
    "headers, words",
    [(b"X-A: 1\r\n" * 17, "over 16 header lines"), (b"X-A: " + b"a" * 9000 + b"\r\n", "headers are over 8 KiB")],
)
def test_a_part_over_the_header_bounds_is_a_bad_request_saying_so(headers, words):
    # Not "no part could be read": the part is whole, its headers are too many or too long.
    data = b"--b\r\n" + headers + b'Content-Disposition: form-data; name="f"\r\n\r\nv\r\n--b--'
    with pytest.raises(BadRequest, match=words):
        split(data, b"b")


def test_werkzeugs_limits_say_which():
    many = body([part(f"f{i}", b"v") for i in range(11)], b"b")
    assert len(split(many, b"b", max_parts=11)[0]) == 11
    with pytest.raises(BadRequest, match=r"too many parts \(limit 10,"):
        split(many, b"b", max_parts=10)
    large = body([part("text", b"x" * 101), part("file", b"y" * 1000, "big.bin")], b"b")
    with pytest.raises(BadRequest, match="field 'text' too large"):
        split(large, b"b", max_field_bytes=100)
    assert len(split(body([part("file", b"y" * 1000, "big.bin")], b"b"), b"b", max_field_bytes=100)[1]) == 1


def test_part_headers_are_bounded_per_body():
    long_name = "n" * 6000  # 6 KB of header per part, under the 8 KiB of one part
    parts = [part(f"{long_name}{i}", b"v") for i in range(11)]  # 66 KB of headers in all
    assert len(split(body(parts[:10], b"b"), b"b")[0]) == 10
    with pytest.raises(BadRequest, match="part headers over 64 KiB"):
        split(body(parts, b"b"), b"b")
    fields = [part(f"field{i}", b"v") for i in range(1000)]  # werkzeug's most parts, short headers
    assert len(split(body(fields, b"b"), b"b", max_parts=1000)[0]) == 1000


def test_a_form_that_cannot_be_split_leaves_the_body_readable():
    app = flask.Flask("t")
    app.request_class = Request
    data = body([part("file", b"image bytes", "a.png")], b"b")
    with app.test_request_context("/", method="POST", data=data, content_type="multipart/form-data"):
        assert not flask.request.files and not flask.request.form  # no boundary: no form
        assert flask.request.get_data() == data


def test_a_body_made_of_near_delimiters_is_answered(shapes_client, bearer):
    # 6 MiB of "\r\n--bz": the boundary b is everywhere, never ending a line. Each is checked once.
    hostile = b"--b\r\n" + part("file", b"\r\n--bz" * (8 << 17), "a.png") + b"\r\n--b--\r\n"
    reply = shapes_client.post("/models/shapes/predict.json", data=hostile, headers=bearer,
                               content_type="multipart/form-data; boundary=b")  # fmt: skip
    assert reply.status_code == 400 and "a.png" in reply.get_json()["error"]


def test_lf_only_bodies_and_a_preamble_are_predicted(shapes_client, bearer):
    png = encode(demo_image("shapes", "triangle", 2))
    data = body([part("file", png, "t.png", b"\n")], b"XyZ", b"\n", preamble=b"This is a multipart message.")
    reply = shapes_client.post("/models/shapes/predict.json", data=data, headers=bearer,
                               content_type="multipart/form-data; boundary=XyZ")  # fmt: skip
    assert reply.status_code == 200 and reply.get_json()["prediction"] == "triangle"


def test_a_large_text_field_is_400(shapes_client, bearer):
    data = {"file": (io.BytesIO(encode(demo_image("shapes", "circle", 1))), "c.png"), "note": "x" * 600_000}
    reply = shapes_client.post(
        "/models/shapes/predict.json", data=data, headers=bearer, content_type="multipart/form-data"
    )
    assert reply.status_code == 400 and "field 'note' too large" in reply.get_json()["error"]


@pytest.mark.parametrize(
    "head, what",
    [
        (b"Content-Type: image/png", "part 1 has no Content-Disposition"),
        (b'Content-Disposition: form-data; filename="a.png"', "part 1 has no name in its Content-Disposition"),
        (b'Content-Disposition: form-data; name=""; filename="a.png"', "part 1 has no name in its Content-Disposition"),
    ],
    ids=["no Content-Disposition", "no name", "an empty name"],
)
def test_a_part_without_a_name_is_400_saying_so(shapes_client, bearer, head, what):
    # RFC 7578 4.2: every part names its field. werkzeug reads a nameless part as the field "",
    # which left the answer saying "(this body has )".
    png = encode(demo_image("shapes", "circle", 1))
    data = body([head + b"\r\n\r\n" + png], b"b")
    reply = shapes_client.post("/models/shapes/predict.json", data=data, headers=bearer,
                               content_type="multipart/form-data; boundary=b")  # fmt: skip
    assert reply.status_code == 400, reply.get_json()
    assert what in reply.get_json()["error"] and 'name="file"' in reply.get_json()["error"]
    second = body([part("file", png, "a.png"), head + b"\r\n\r\n" + png], b"b")
    with pytest.raises(BadRequest, match="part 2 has no"):
        split(second, b"b")
