"""Open Inference Protocol V2: tritonclient over real HTTP (a predict function, and the whole
stack's gateway), the same answers as multipart and V1, and every bad request's 4xx."""

from __future__ import annotations

import base64
import gc
import gzip
import json
import struct
import sys
import threading
import time
import zlib

import numpy as np
import pytest
import requests
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from functions.predict import pipeline, tensors
from functions.predict.model import load_model
from functions.predict.service import create_service as create_predict_service
from local import ROOT
from local.helpers import demo_image, encode
from shared import imaging, jsonbody
from shared.config import Settings
from shared.errors import BadRequest
from tests.conftest import demo_model, function_client, predict_client
from tests.test_openapi import check

MODEL = "shapes"
HEADER = "Inference-Header-Content-Length"


def expected(images: list[bytes]) -> np.ndarray:
    """The probabilities the pipeline gives in-process: what every protocol must answer."""
    model = demo_model(MODEL)
    return pipeline.infer(
        model, pipeline.decode(model, [pipeline.Upload(i) for i in images], imaging.Limits(40_000_000))
    )


def tensor(images: list[bytes]) -> np.ndarray:
    model = demo_model(MODEL)
    return pipeline.decode(model, [pipeline.Upload(i) for i in images], imaging.Limits(40_000_000))


@pytest.fixture
def pngs() -> list[bytes]:
    return [encode(demo_image(MODEL, label, 7)) for label in ("circle", "square", "triangle")]


@pytest.fixture
def client(serve_function):
    base = serve_function("predict", MODEL_NAME=MODEL)
    connection = triton.InferenceServerClient(url=base.removeprefix("http://"))
    connection.base = base  # for plain requests next to tritonclient
    yield connection
    connection.close()


def fresh(headers: dict[str, str]) -> dict[str, str]:
    # tritonclient writes Inference-Header-Content-Length into the dict it is given: a fresh one per call.
    return dict(headers)


# -- tritonclient over real HTTP -------------------------------------------------------------------


def test_server_and_model_metadata_and_readiness(client, bearer, auth):
    assert client.is_server_live() and client.is_server_ready()  # no token needed
    server = client.get_server_metadata()
    assert server["name"] == "thalamus"
    assert {"binary_tensor_data", "classification", "model_configuration"} <= set(server["extensions"])

    meta = client.get_model_metadata(MODEL, headers=fresh(bearer))
    assert meta["inputs"] == [{"name": "keras_tensor", "datatype": "FP32", "shape": [-1, 64, 64, 3]}]
    assert meta["outputs"] == [{"name": "output_0", "datatype": "FP32", "shape": [-1, 3]}]
    version = meta["versions"][0]
    assert client.get_model_metadata(MODEL, version, headers=fresh(bearer))["name"] == MODEL
    config = client.get_model_config(MODEL, headers=fresh(bearer))
    assert config["max_batch_size"] == pipeline.MAX_FILES and config["input"][0]["format"] == "FORMAT_NHWC"

    assert client.is_model_ready(MODEL, headers=fresh(bearer))
    assert client.is_model_ready(MODEL, version, headers=fresh(bearer))
    assert not client.is_model_ready(MODEL, "1", headers=fresh(bearer))
    assert not client.is_model_ready("arrows", headers=fresh(bearer))
    assert not client.is_model_ready(MODEL)  # no token

    with pytest.raises(InferenceServerException) as missing:
        client.get_model_metadata(MODEL)
    assert missing.value.status() == "401" and "bearer" in missing.value.message()
    scoped = auth.create_key(["arrows"])
    token = auth.issue_token(scoped.public_key, scoped.secret_key, "t").token
    with pytest.raises(InferenceServerException) as forbidden:
        client.get_model_metadata(MODEL, headers={"Authorization": f"Bearer {token}"})
    assert forbidden.value.status() == "403" and MODEL in forbidden.value.message()
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata(MODEL, "7", headers=fresh(bearer))
    assert unknown.value.status() == "404" and "version 7" in unknown.value.message()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_fp32_tensor(client, bearer, pngs, binary):
    batch = tensor(pngs)
    given = triton.InferInput("keras_tensor", list(batch.shape), "FP32")
    given.set_data_from_numpy(batch, binary_data=binary)
    wanted = triton.InferRequestedOutput("output_0", binary_data=binary)
    result = client.infer(MODEL, [given], outputs=[wanted], request_id="r-1", headers=fresh(bearer))
    np.testing.assert_allclose(result.as_numpy("output_0"), expected(pngs), atol=1e-6)
    assert result.get_response()["id"] == "r-1"
    assert result.get_response()["model_version"] == demo_model(MODEL).meta["version"]
    # outputs=None: every output, binary (tritonclient asks binary_data_output)
    everything = client.infer(MODEL, [given], headers=fresh(bearer))
    np.testing.assert_allclose(everything.as_numpy("output_0"), expected(pngs), atol=1e-6)


def test_fp16_json_numbers_are_read_as_fp16_like_binary_fp16(shapes_client, bearer, pngs):
    # Numbers FP16 cannot hold exactly: in JSON they must mean what the same tensor sent as binary
    # FP16 means, so the encoding a client picks never changes the answer.
    batch = tensor(pngs) * 0.999 + 0.000123
    spec = {"name": "keras_tensor", "datatype": "FP16", "shape": list(batch.shape)}
    as_json = json.dumps({"inputs": [{**spec, "data": batch.reshape(-1).tolist()}]}).encode()
    half = batch.astype(np.float16).tobytes()
    as_binary = binary({"inputs": [{**spec, "parameters": {"binary_data_size": len(half)}}]}, half)
    answers = []
    for body, headers in ((as_json, {}), as_binary):
        reply = shapes_client.post(f"/v2/models/{MODEL}/infer", headers={**bearer, **headers}, data=body)
        assert reply.status_code == 200, reply.get_json()
        answers.append(reply.get_json()["outputs"][0]["data"])
    assert answers[0] == answers[1]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_bytes_images_with_classification(client, bearer, pngs, binary):
    # JSON BYTES are strings: there, image files travel as base64
    images = np.array(pngs if binary else [base64.b64encode(png) for png in pngs], dtype=object)
    given = triton.InferInput("keras_tensor", [len(pngs)], "BYTES")
    given.set_data_from_numpy(images, binary_data=binary)
    top2 = triton.InferRequestedOutput("output_0", binary_data=binary, class_count=2)
    result = client.infer(MODEL, [given], outputs=[top2], headers=fresh(bearer))
    table = result.as_numpy("output_0")
    assert table.shape == (3, 2)
    probabilities, labels = expected(pngs), demo_model(MODEL).labels
    # binary BYTES come back as bytes, JSON ones as str (what Triton's image_client relies on)
    assert all(isinstance(entry, bytes if binary else str) for entry in table.ravel())
    for row, entries in zip(probabilities, table, strict=True):
        order = np.argsort(-row)
        text = [e.decode() if isinstance(e, bytes) else e for e in entries]
        assert text == [f"{row[i]:f}:{i}:{labels[i]}" for i in order[:2]]
    assert [str(e.decode() if binary else e).split(":")[2] for e in table[:, 0]] == ["circle", "square", "triangle"]


def test_infer_gzip_and_deflate_requests(client, bearer, pngs):
    batch = tensor(pngs[:1])
    for algorithm in ("gzip", "deflate"):
        given = triton.InferInput("keras_tensor", list(batch.shape), "FP32")
        given.set_data_from_numpy(batch)
        result = client.infer(MODEL, [given], headers=fresh(bearer), request_compression_algorithm=algorithm)
        np.testing.assert_allclose(result.as_numpy("output_0"), expected(pngs[:1]), atol=1e-6)


def test_tritonclient_sees_bad_requests_as_errors_naming_the_problem(client, bearer):
    wrong = triton.InferInput("keras_tensor", [1, 32, 32, 3], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(InferenceServerException) as shape:
        client.infer(MODEL, [wrong], headers=fresh(bearer))
    assert shape.value.status() == "400" and "[1, 32, 32, 3]" in shape.value.message()
    right = triton.InferInput("keras_tensor", [1, 64, 64, 3], "FP32")
    right.set_data_from_numpy(np.zeros((1, 64, 64, 3), np.float32))
    with pytest.raises(InferenceServerException) as output:
        client.infer(MODEL, [right], outputs=[triton.InferRequestedOutput("probs")], headers=fresh(bearer))
    assert output.value.status() == "400" and "'probs'" in output.value.message()
    with pytest.raises(InferenceServerException) as unknown:
        client.infer("arrows", [right], headers=fresh(bearer))
    assert unknown.value.status() == "404"


def test_same_image_same_answer_through_multipart_v1_and_v2(client, bearer, pngs):
    """One image, four ways in: the same label and (to 1e-6) the same probabilities."""
    base, png = client.base, pngs[2]
    want = expected([png])[0]
    multipart = requests.post(
        f"{base}/models/{MODEL}/predict.json", headers=bearer, files={"file": ("t.png", png)}, timeout=30
    ).json()
    v1 = requests.post(
        f"{base}/v1/models/{MODEL}:predict",
        headers=bearer,
        data=json.dumps({"instances": [{"b64": base64.b64encode(png).decode()}]}),
        timeout=30,
    ).json()["predictions"][0]
    v2_json = requests.post(
        f"{base}/v2/models/{MODEL}/infer",
        headers=bearer,
        data=json.dumps(
            {
                "inputs": [
                    {
                        "name": "keras_tensor",
                        "datatype": "BYTES",
                        "shape": [1],
                        "data": [base64.b64encode(png).decode()],
                    }
                ]
            }
        ),
        timeout=30,
    ).json()["outputs"][0]["data"]
    given = triton.InferInput("keras_tensor", [1], "BYTES")
    given.set_data_from_numpy(np.array([png], dtype=object))
    v2_binary = client.infer(MODEL, [given], headers=fresh(bearer)).as_numpy("output_0")[0]
    for answer in (v1, v2_json, v2_binary):
        np.testing.assert_allclose(answer, want, atol=1e-6)
    labels = demo_model(MODEL).labels
    assert multipart["prediction"] == labels[int(np.argmax(want))] == "triangle"
    assert multipart["confidence"] == round(float(max(want)) * 100, 2)
    assert {t["label"]: t["confidence"] for t in multipart["top"]} == {
        label: round(float(p) * 100, 2) for label, p in zip(labels, want, strict=True)
    }


def test_uint8_pixels_are_scaled_like_uploads(shapes_client, bearer, pngs):
    pixels = tensor(pngs).astype(np.uint8)  # the demo models take pixel values as they are
    body = {"inputs": [{"name": "x", "datatype": "UINT8", "shape": list(pixels.shape), "data": pixels.tolist()}]}
    reply = shapes_client.post(f"/v2/models/{MODEL}/infer", headers=bearer, data=json.dumps(body))
    assert reply.status_code == 200, reply.get_json()
    np.testing.assert_allclose(np.reshape(reply.get_json()["outputs"][0]["data"], (3, 3)), expected(pngs), atol=1e-6)


# -- bad requests: each gets its 4xx and a message naming the problem ------------------------------


def fp32(shape: list[int], data: object = None, **extra: object) -> dict:
    spec = {"name": "keras_tensor", "datatype": "FP32", "shape": shape, **extra}
    if data is not None:
        spec["data"] = data
    return spec


ZEROS = [0.0] * (64 * 64 * 3)
PIXELS = 64 * 64 * 3 * 4


def binary(header: dict, payload: bytes, length: int | None = None) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + payload, {HEADER: str(len(head) if length is None else length)}


BAD = {
    "not JSON": (b'{"inputs": [', {}, 400, "not valid JSON"),
    "empty body": (b"", {}, 400, "empty"),
    "not an object": (b"[]", {}, 400, "JSON object"),
    "missing inputs": (b"{}", {}, 400, "missing 'inputs'"),
    "two inputs": ({"inputs": [fp32([1, 64, 64, 3], ZEROS)] * 2}, {}, 400, "takes 1 input"),
    "input without a name": ({"inputs": [{"datatype": "FP32", "shape": [1], "data": [1]}]}, {}, 400, "missing 'name'"),
    "missing shape": ({"inputs": [{"name": "x", "datatype": "FP32", "data": ZEROS}]}, {}, 400, "'shape'"),
    "negative shape": ({"inputs": [fp32([-1, 64, 64, 3], ZEROS)]}, {}, 400, "'shape'"),
    "wrong datatype": ({"inputs": [{**fp32([1, 64, 64, 3], ZEROS), "datatype": "INT32"}]}, {}, 400, "'INT32'"),
    "missing datatype": ({"inputs": [{"name": "x", "shape": [1, 64, 64, 3], "data": ZEROS}]}, {}, 400, "datatype"),
    "wrong shape": ({"inputs": [fp32([1, 64, 64, 1], ZEROS)]}, {}, 400, "shape [1, 64, 64, 1] does not fit"),
    "data length vs shape": ({"inputs": [fp32([1, 64, 64, 3], [0.0] * 10)]}, {}, 400, "data holds 10 values"),
    "missing data": ({"inputs": [fp32([1, 64, 64, 3])]}, {}, 400, "needs 'data'"),
    "strings as numbers": ({"inputs": [fp32([1, 64, 64, 3], ["1"] * (64 * 64 * 3))]}, {}, 400, "must be numbers"),
    "a boolean among FP32 numbers": (
        {"inputs": [fp32([1, 64, 64, 3], [True] + [0] * (64 * 64 * 3 - 1))]},
        {},
        400,
        "input 'keras_tensor' data: values must be numbers, not true or false",
    ),
    "a boolean among nested FP32 numbers": (
        {"inputs": [fp32([1, 64, 64, 3], [[[[0.5, 0.5, False]] * 64] * 64])]},
        {},
        400,
        "not true or false",
    ),
    "a boolean among UINT8 pixels": (
        {"inputs": [{**fp32([1, 64, 64, 3], [0] * (64 * 64 * 3 - 1) + [True]), "datatype": "UINT8"}]},
        {},
        400,
        "not true or false",
    ),
    "an integer of 5000 digits": (b'{"inputs": [' + b"9" * 5000 + b"]}", {}, 400, "inference request: number too long"),
    "ragged data": ({"inputs": [fp32([1, 64, 64, 3], [[0.0, 0.0], [0.0]])]}, {}, 400, "rectangular"),
    "NaN": ({"inputs": [fp32([1, 64, 64, 3], [float("nan")] * (64 * 64 * 3))]}, {}, 400, "finite"),
    "UINT8 fractions": (
        {"inputs": [{**fp32([1, 64, 64, 3], [0.5] * (64 * 64 * 3)), "datatype": "UINT8"}]},
        {},
        400,
        "whole numbers",
    ),
    "UINT8 over 255": (
        {"inputs": [{**fp32([1, 64, 64, 3], [300] * (64 * 64 * 3)), "datatype": "UINT8"}]},
        {},
        400,
        "0..255",
    ),
    "bad base64": (
        {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["not base64!"]}]},
        {},
        400,
        "bad base64",
    ),
    "undecodable image bytes": (
        {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(b"hello").decode()]}]},
        {},
        400,
        "not an image",
    ),
    "BYTES shape": (
        {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1, 2], "data": ["", ""]}]},
        {},
        400,
        "[n]",
    ),
    "too many images": (
        {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [33], "data": ["aGk="] * 33}]},
        {},
        400,
        "too many images: 33 (limit 32",
    ),
    "too many tensors": ({"inputs": [fp32([33, 64, 64, 3], [])]}, {}, 400, "too many examples: 33 (limit 32"),
    "unknown output": (
        {"inputs": [fp32([1, 64, 64, 3], ZEROS)], "outputs": [{"name": "probabilities"}]},
        {},
        400,
        "unexpected inference output 'probabilities'",
    ),
    "bad classification": (
        {
            "inputs": [fp32([1, 64, 64, 3], ZEROS)],
            "outputs": [{"name": "output_0", "parameters": {"classification": "3"}}],
        },
        {},
        400,
        "'classification'",
    ),
    "output requested twice": (
        {"inputs": [fp32([1, 64, 64, 3], ZEROS)], "outputs": [{"name": "output_0"}] * 2},
        {},
        400,
        "'output_0' requested twice",
    ),
    "values the model overflows on": (
        {"inputs": [fp32([1, 64, 64, 3], np.random.default_rng(0).choice([3.4e38, -3.4e38], 64 * 64 * 3).tolist())]},
        {},
        400,
        "not a number for these inputs",
    ),
    "id not a string": ({"id": 7, "inputs": [fp32([1, 64, 64, 3], ZEROS)]}, {}, 400, "'id'"),
    # Otherwise valid requests: a wrong type is refused, not read as "absent" (null is absent).
    "parameters a list": ({"inputs": [fp32([1, 64, 64, 3], ZEROS)], "parameters": []}, {}, 400, "must be an object"),
    "input parameters false": ({"inputs": [fp32([1, 64, 64, 3], ZEROS, parameters=False)]}, {}, 400, "an object"),
    "outputs 0": ({"inputs": [fp32([1, 64, 64, 3], ZEROS)], "outputs": 0}, {}, 400, "'outputs' must be a list"),
    "shared memory": (
        {"inputs": [fp32([1, 64, 64, 3], ZEROS, parameters={"shared_memory_region": "r"})]},
        {},
        400,
        "shared memory",
    ),
    "binary header length beyond the body": (
        *binary({"inputs": [fp32([1, 64, 64, 3], parameters={"binary_data_size": PIXELS})]}, b"\0" * 16, 10_000),
        400,
        f"{HEADER} 10000 is beyond the body",
    ),
    "binary header length not a number": (b"{}", {HEADER: "ten"}, 400, "whole number"),
    **{
        f"binary header length {text!r}": (b"{}", {HEADER: text}, 400, "whole number")
        for text in ("+2", "2_0", "\u0662", "-2", "0" * 5000 + "2")
    },
    "FP16 beyond its range": (
        {"inputs": [{**fp32([1, 64, 64, 3], [70000.0] * (64 * 64 * 3)), "datatype": "FP16"}]},
        {},
        400,
        "FP16 values must lie within ±65504",
    ),
    "raw binary request": (b"\0" * PIXELS, {HEADER: "0"}, 400, "raw binary"),
    "binary_data_size beyond the data": (
        *binary({"inputs": [fp32([1, 64, 64, 3], parameters={"binary_data_size": PIXELS})]}, b"\0" * 16),
        400,
        f"binary_data_size {PIXELS} is beyond the 16 bytes",
    ),
    "binary_data_size vs shape": (
        *binary({"inputs": [fp32([1, 64, 64, 3], parameters={"binary_data_size": 16})]}, b"\0" * 16),
        400,
        "does not match shape",
    ),
    "binary bytes left over": (
        *binary({"inputs": [fp32([1, 64, 64, 3], parameters={"binary_data_size": PIXELS})]}, b"\0" * (PIXELS + 3)),
        400,
        "3 bytes of binary data left over",
    ),
    "binary data nobody claims": (*binary({"inputs": [fp32([1, 64, 64, 3], ZEROS)]}, b"\0" * 8), 400, "no input has"),
    "binary BYTES elements beyond the shape": (
        # a million empty elements for shape [1]: refused at the second, not after unpacking them all
        *binary(
            {
                "inputs": [
                    {"name": "x", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 4_000_000}}
                ]
            },
            b"\0" * 4_000_000,
        ),
        400,
        "binary data holds more than 1 BYTES elements, its shape needs 1",
    ),
    "binary BYTES elements short of the shape": (
        *binary(
            {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [3], "parameters": {"binary_data_size": 8}}]},
            b"\0" * 8,
        ),
        400,
        "binary data holds 2 BYTES elements, its shape needs 3",
    ),
    "JSON BYTES elements beyond the shape": (
        {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [2], "data": ["aGk="] * 100_000}]},
        {},
        400,
        "data holds more than 2 elements, shape [2] needs 2",
    ),
    "BYTES element overruns": (
        *binary(
            {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 8}}]},
            struct.pack("<I", 100) + b"abcd",
        ),
        400,
        "runs past",
    ),
    "stale header (reused headers dict)": (
        json.dumps({"inputs": [fp32([1, 64, 64, 3], ZEROS)]}).encode(),
        {HEADER: "40"},
        400,
        "fresh dict",
    ),
    "unsupported Content-Encoding": (b"{}", {"Content-Encoding": "br"}, 415, "'br' is not supported"),
    "corrupt gzip": (b"not gzip at all", {"Content-Encoding": "gzip"}, 400, "not valid gzip"),
    "truncated gzip": (gzip.compress(b'{"inputs": []}')[:-12], {"Content-Encoding": "gzip"}, 400, "truncated"),
    "truncated second gzip member": (
        gzip.compress(b'{"inputs": ') + gzip.compress(b"[]}")[:-12],
        {"Content-Encoding": "gzip"},
        400,
        "truncated",
    ),
    "gzip then garbage": (
        gzip.compress(json.dumps({"inputs": [fp32([1, 64, 64, 3], ZEROS)]}).encode()) + b"garbage",
        {"Content-Encoding": "gzip"},
        400,
        "7 bytes follow the end of the gzip data",
    ),
    "an id too long to echo": (
        {"id": "i" * 1025, "inputs": [fp32([1, 64, 64, 3], ZEROS)]},
        {},
        400,
        "'id' is over 1024",
    ),
    "deflate then more": (
        zlib.compress(json.dumps({"inputs": [fp32([1, 64, 64, 3], ZEROS)]}).encode()) + zlib.compress(b"{}"),
        {"Content-Encoding": "deflate"},
        400,
        "bytes follow the end of the deflate data",
    ),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_request(shapes_client, bearer, case):
    body, headers, status, message = BAD[case]
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    reply = shapes_client.post(f"/v2/models/{MODEL}/infer", headers={**bearer, **headers}, data=data)
    assert reply.status_code == status, reply.get_json()
    assert message in reply.get_json()["error"]
    assert "sys." not in reply.get_json()["error"]  # never Python's advice to its programmer
    check(shapes_client.get("/openapi.json").get_json(), f"/v2/models/{MODEL}/infer", "post", reply)


def test_booleans_in_parameters_and_gzip_members_are_read_as_before(shapes_client, bearer, pngs):
    # tritonclient's JSON requests hold true/false as parameters: only a tensor may not.
    batch = tensor(pngs)
    spec = fp32(list(batch.shape), batch.tolist(), parameters={"binary_data": False})
    body = {
        "id": "[true, false]",
        "inputs": [spec],
        "outputs": [{"name": "output_0", "parameters": {"binary_data": False}}],
        "parameters": {"binary_data_output": True},
    }
    text = json.dumps(body).encode()
    reply = shapes_client.post(f"/v2/models/{MODEL}/infer", headers=bearer, data=text)
    assert reply.status_code == 200, reply.get_json()
    np.testing.assert_allclose(np.reshape(reply.get_json()["outputs"][0]["data"], (3, 3)), expected(pngs), atol=1e-6)
    # the same request as three gzip members (cat a.gz b.gz c.gz): the same answer
    members = b"".join(gzip.compress(text[i : i + 50_000]) for i in range(0, len(text), 50_000))
    gzipped = shapes_client.post(
        f"/v2/models/{MODEL}/infer", headers={**bearer, "Content-Encoding": "gzip"}, data=members
    )
    assert gzipped.status_code == 200, gzipped.get_json()
    assert gzipped.get_json() == reply.get_json()


def test_null_optional_fields_are_absent_ones(shapes_client, bearer):
    # KServe's own server (pydantic, Optional[...]) reads null as absent; so does this one, and
    # its OpenAPI document says they are nullable.
    body = {"id": None, "parameters": None, "outputs": None, "inputs": [fp32([1, 64, 64, 3], ZEROS, parameters=None)]}
    reply = shapes_client.post(f"/v2/models/{MODEL}/infer", headers=bearer, json=body)
    assert reply.status_code == 200 and "id" not in reply.get_json()
    check(shapes_client.get("/openapi.json").get_json(), f"/v2/models/{MODEL}/infer", "post", reply)


def test_bodies_are_bounded_on_the_wire_and_after_inflating(settings, bearer):
    client = predict_client(settings, MODEL, max_upload_bytes=200_000)
    body = json.dumps({"inputs": [fp32([1, 64, 64, 3], ZEROS)]}).encode()  # about 50 kB of JSON
    assert len(body) < 200_000
    bomb = json.dumps({"inputs": [fp32([1, 64, 64, 3], [0.0] * 64 * 64 * 3 * 4)]}).encode()  # inflates over the limit
    for encoding, packed in (("gzip", gzip.compress(bomb)), ("deflate", zlib.compress(bomb))):
        assert len(packed) < 10_000
        reply = client.post(f"/v2/models/{MODEL}/infer", headers={**bearer, "Content-Encoding": encoding}, data=packed)
        assert reply.status_code == 413, reply.get_json()
        assert f"after {encoding} decompression too large (limit 200000 bytes)" in reply.get_json()["error"]
        small = client.post(
            f"/v2/models/{MODEL}/infer",
            headers={**bearer, "Content-Encoding": encoding},
            data=gzip.compress(body) if encoding == "gzip" else zlib.compress(body),
        )
        assert small.status_code == 200, small.get_json()
    # cut in gzip members that are each under the limit, it is as large as it was whole
    half = len(bomb) // 2
    members = gzip.compress(bomb[:half]) + gzip.compress(bomb[half:])
    reply = client.post(f"/v2/models/{MODEL}/infer", headers={**bearer, "Content-Encoding": "gzip"}, data=members)
    assert reply.status_code == 413, reply.get_json()
    assert "after gzip decompression too large (limit 200000 bytes)" in reply.get_json()["error"]
    huge = client.post(f"/v2/models/{MODEL}/infer", headers=bearer, data=bomb)
    assert huge.status_code == 413 and "too large" in huge.get_json()["error"]


def test_auth_model_and_version_errors(shapes_client, bearer, auth):
    body = json.dumps({"inputs": [fp32([1, 64, 64, 3], ZEROS)]})
    spec = shapes_client.get("/openapi.json").get_json()
    scoped = auth.create_key(["arrows"])
    other = {"Authorization": f"Bearer {auth.issue_token(scoped.public_key, scoped.secret_key, 't').token}"}
    cases = [
        (f"/v2/models/{MODEL}/infer", {}, 401, "bearer"),
        (f"/v2/models/{MODEL}/infer", other, 403, MODEL),
        ("/v2/models/arrows/infer", bearer, 404, "arrows"),
        (f"/v2/models/{MODEL}/versions/1/infer", bearer, 404, "no version 1"),
    ]
    for path, headers, status, message in cases:
        reply = shapes_client.post(path, headers=headers, data=body)
        assert reply.status_code == status and message in reply.get_json()["error"], (path, reply.get_json())
        check(spec, path, "post", reply)
    for path in (f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/ready", f"/v2/models/{MODEL}/config"):
        assert shapes_client.get(path).status_code == 401
        assert shapes_client.get(path, headers=other).status_code == 403
        reply = shapes_client.get(path, headers=bearer)
        assert reply.status_code == 200
        check(spec, path, "get", reply)
    for path in ("/v2", "/v2/health/live", "/v2/health/ready"):
        reply = shapes_client.get(path)
        assert reply.status_code == 200
        check(spec, path, "get", reply)


# -- through the whole local stack -----------------------------------------------------------------


@pytest.mark.slow
def test_tritonclient_through_the_gateway(running_stack, tmp_path, pngs):
    assert running_stack.keys("-g", str(tmp_path / "k.json")).returncode == 0
    pair = json.loads((tmp_path / "k.json").read_text())
    token = requests.post(f"{running_stack.gateway}/token.json", json=pair, timeout=30).json()["token"]
    bearer = {"Authorization": f"Bearer {token}"}
    client = triton.InferenceServerClient(url=running_stack.gateway.removeprefix("http://"))
    try:
        # the server endpoints reach the token function; the models their own functions
        assert client.is_server_live() and client.is_server_ready()
        assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
        for model, shape in (("shapes", [64, 64, 3]), ("arrows", [48, 48, 1])):
            assert client.is_model_ready(model, headers=fresh(bearer))
            assert client.get_model_metadata(model, headers=fresh(bearer))["inputs"][0]["shape"] == [-1, *shape]
            given = triton.InferInput("keras_tensor", [1, *shape], "FP32")
            given.set_data_from_numpy(np.full((1, *shape), 128, np.float32))
            assert client.infer(model, [given], headers=fresh(bearer)).as_numpy("output_0").shape[0] == 1
        assert not client.is_model_ready("shape", headers=fresh(bearer))  # no prefix match onto shapes
        images = triton.InferInput("keras_tensor", [3], "BYTES")
        images.set_data_from_numpy(np.array(pngs, dtype=object))
        top = triton.InferRequestedOutput("output_0", class_count=1)
        result = client.infer(MODEL, [images], outputs=[top], headers=fresh(bearer))
        assert [e.decode().split(":")[2] for e in result.as_numpy("output_0").ravel()] == [
            "circle",
            "square",
            "triangle",
        ]
        batch = tensor(pngs)
        floats = triton.InferInput("keras_tensor", list(batch.shape), "FP32")
        floats.set_data_from_numpy(batch)
        answer = client.infer(MODEL, [floats], headers=fresh(bearer), request_compression_algorithm="gzip")
        np.testing.assert_allclose(answer.as_numpy("output_0"), expected(pngs), atol=1e-6)
    finally:
        client.close()


def test_parsing_pauses_the_garbage_collector_and_always_resumes_it():
    """JSON documents are parsed with the cyclic collector off (it walked every list json.loads
    made, again and again: 2x slower for a document of many lists), and back on afterwards,
    whether the document parsed or not."""
    assert gc.isenabled()
    collections = []

    def count(phase: str, info: dict) -> None:
        if phase == "start":
            collections.append(info["generation"])

    document = json.dumps({"data": [[]] * 100_000}).encode()
    gc.callbacks.append(count)
    try:
        assert len(jsonbody.parse(document)["data"]) == 100_000
        paused = len(collections)
        collections.clear()
        assert len(json.loads(document)["data"]) == 100_000
        unpaused = len(collections)
    finally:
        gc.callbacks.remove(count)
    assert paused <= 1 < 20 < unpaused  # paused: at most the one after it; else one per ~700 lists
    for bad in (b"{", b"[" * 100_000, b'{"a": 1' + b"1" * 5000 + b"}"):
        with pytest.raises(BadRequest):
            jsonbody.parse(bad)
        assert gc.isenabled()


def parse_together(start: threading.Barrier) -> None:
    start.wait()
    for _ in range(50):
        jsonbody.parse(b'{"instances": [[1, 2, 3], [4, 5, 6]]}')


def test_concurrent_parses_never_leave_the_garbage_collector_off():
    """The collector is one for the process: threads parsing at once must not leave it off (a
    "was it on? off, then back on if it was" per call did, in 4 % of such trials)."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # a GIL hand-off between any two steps
    try:
        for _ in range(200):
            start = threading.Barrier(8)
            threads = [threading.Thread(target=parse_together, args=(start,)) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert gc.isenabled()
    finally:
        sys.setswitchinterval(interval)
        gc.enable()


def test_parsed_json_is_held_in_one_budget_per_process():
    """Together, the threads of one process hold no more parsed JSON than its budget: a second
    large document waits until the first is done with (bounded per request only, THREADS of them
    at once took THREADS times as much, and a 384 MiB replica with 4 threads was OOM-killed); a
    document larger than the whole budget is a 400 before it is parsed."""
    document = json.dumps({"data": [[1.5]] * 50_000}).encode()
    cost = jsonbody.json_cost(document)
    limits = imaging.Limits(40_000_000, json_budget=imaging.DecodeBudget(cost * 3 // 2))
    events = []

    def second() -> None:
        with tensors.parsed(document, "body", limits) as doc:
            events.append(("second", len(doc["data"])))

    with tensors.parsed(document, "body", limits) as doc:
        waiting = threading.Thread(target=second)
        waiting.start()
        time.sleep(0.3)
        assert events == []  # the two do not fit together
        events.append(("first", len(doc["data"])))
    waiting.join(10)
    assert events == [("first", 50_000), ("second", 50_000)]
    small = imaging.Limits(40_000_000, json_budget=imaging.DecodeBudget(cost - 1))
    with pytest.raises(BadRequest, match=r"MiB of memory to parse"), tensors.parsed(document, "body", small):
        pass


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_a_request_waiting_for_the_model_holds_none_of_the_json_budget(settings, bearer, protocol):
    """A JSON document is parsed within the process's JSON budget, but once its batch is made the
    request needs it no more: waiting for an interpreter, it must not keep others from parsing
    theirs. It did: with the model busy, a second document waited for the first's share of the
    budget, then got a 503 "busy parsing other large JSON requests" while nothing was parsing."""
    bundle = ROOT / "models" / MODEL
    model = load_model(Settings(model_name=MODEL, model_dir=bundle, model_interpreters=1))
    data = np.zeros((2, 64, 64, 3)).tolist()
    if protocol == "v1":
        path, document = f"/v1/models/{MODEL}:predict", {"instances": data}
    else:
        path, document = f"/v2/models/{MODEL}/infer", {"inputs": [fp32([2, 64, 64, 3], data)]}
    body = json.dumps(document).encode()
    cost = jsonbody.json_cost(body)
    assert cost >= 1 << 19  # so that a budget of whole MiB can hold one such document but not two
    mebibytes = -(-2 * cost // (1 << 20))  # the JSON budget is half the decode budget
    service = create_predict_service(settings.replace(model_name=MODEL, model_dir=bundle, decode_memory_mb=mebibytes),
                                     model)  # fmt: skip
    client = function_client(service)
    statuses = []

    def ask() -> None:
        statuses.append(client.post(path, headers=bearer, data=body).status_code)

    askers = [threading.Thread(target=ask) for _ in range(2)]
    with model.borrowed():  # the model busy with another request meanwhile
        for asker in askers:
            asker.start()
        deadline = time.monotonic() + 10
        while model.waiting < 2 and time.monotonic() < deadline and not statuses:
            time.sleep(0.01)
        assert model.waiting == 2, statuses  # both parsed, both waiting for the model
    for asker in askers:
        asker.join(10)
    assert statuses == [200, 200]
