"""KServe / TF Serving V1: a plain HTTP client following TF Serving's documented REST examples
(real HTTP), every request form, and every bad request's 4xx."""

from __future__ import annotations

import base64
import gzip
import io
import json

import numpy as np
import pytest
import requests
from PIL import Image

from local.helpers import demo_image, encode
from tests.conftest import demo_model, predict_client
from tests.test_openapi import check
from tests.test_v2 import expected, tensor

MODEL = "shapes"


@pytest.fixture
def pngs() -> list[bytes]:
    return [encode(demo_image(MODEL, label, 11)) for label in ("square", "triangle")]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def base(serve_function) -> str:
    return serve_function("predict", MODEL_NAME=MODEL)


def test_tf_serving_python_example(base, bearer, pngs):
    """api_rest.md's Python example: numeric instances, signature_name, a JSON content type."""
    data = json.dumps({"signature_name": "serving_default", "instances": tensor(pngs).tolist()})
    headers = {"content-type": "application/json", **bearer}
    json_response = requests.post(f"{base}/v1/models/{MODEL}:predict", data=data, headers=headers, timeout=30)
    predictions = json.loads(json_response.text)["predictions"]
    np.testing.assert_allclose(predictions, expected(pngs), atol=1e-6)
    assert [demo_model(MODEL).labels[int(np.argmax(p))] for p in predictions] == ["square", "triangle"]


def test_curl_style_b64_instances_and_every_form(base, bearer, pngs):
    """``curl -d`` sends a form Content-Type; tritonclient none: the body is JSON all the same."""
    url, want = f"{base}/v1/models/{MODEL}:predict", expected(pngs)
    images = [{"b64": b64(png)} for png in pngs]
    assert any(image["b64"].endswith("=") for image in images)  # for the unpadded form below
    forms = {
        "instances b64": ({"instances": images}, "predictions"),
        "instances named b64": ({"instances": [{"keras_tensor": image} for image in images]}, "predictions"),
        "instances tensors": ({"instances": tensor(pngs).tolist()}, "predictions"),
        "inputs tensors": ({"inputs": tensor(pngs).tolist()}, "outputs"),
        "inputs named tensors": ({"inputs": {"keras_tensor": tensor(pngs).tolist()}}, "outputs"),
        "inputs b64": ({"inputs": images}, "outputs"),
        "inputs named b64": ({"inputs": {"keras_tensor": images}}, "outputs"),
        # without its "=" padding (Go's RawStdEncoding), as TF Serving takes it
        "unpadded b64": ({"instances": [{"b64": image["b64"].rstrip("=")} for image in images]}, "predictions"),
    }
    for form, (body, key) in forms.items():
        for content_type in ("application/x-www-form-urlencoded", None):
            headers = {**bearer, **({"Content-Type": content_type} if content_type else {})}
            reply = requests.post(url, data=json.dumps(body), headers=headers, timeout=30)
            assert reply.status_code == 200, (form, reply.text)
            assert list(reply.json()) == [key], form
            np.testing.assert_allclose(reply.json()[key], want, atol=1e-6, err_msg=form)
    gzipped = requests.post(
        url, data=gzip.compress(json.dumps({"instances": images}).encode()),
        headers={**bearer, "Content-Encoding": "gzip"}, timeout=30,
    )  # fmt: skip
    np.testing.assert_allclose(gzipped.json()["predictions"], want, atol=1e-6)


def test_labels_signature(base, bearer, pngs):
    url, want = f"{base}/v1/models/{MODEL}:predict", expected(pngs)
    images = [{"b64": b64(png)} for png in pngs]
    rows = requests.post(
        url, json={"signature_name": "serving_labels", "instances": images}, headers=bearer, timeout=30
    ).json()["predictions"]
    assert [row["label"] for row in rows] == ["square", "triangle"]
    np.testing.assert_allclose([row["probabilities"] for row in rows], want, atol=1e-6)
    columns = requests.post(
        url, json={"signature_name": "serving_labels", "inputs": images}, headers=bearer, timeout=30
    ).json()["outputs"]
    assert columns["label"] == ["square", "triangle"]
    np.testing.assert_allclose(columns["probabilities"], want, atol=1e-6)


def test_status_metadata_and_version_paths(base, bearer, pngs):
    version = demo_model(MODEL).meta["version"]
    status = requests.get(f"{base}/v1/models/{MODEL}", headers=bearer, timeout=10).json()
    assert status["name"] == MODEL and status["ready"] is True
    assert status["model_version_status"] == [
        {"version": version, "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
    ]
    for path in (f"/versions/{version}", "/labels/latest"):
        assert requests.get(f"{base}/v1/models/{MODEL}{path}", headers=bearer, timeout=10).json() == status
    metadata = requests.get(f"{base}/v1/models/{MODEL}/metadata", headers=bearer, timeout=10).json()
    assert metadata["model_spec"] == {"name": MODEL, "signature_name": "", "version": version}
    signatures = metadata["metadata"]["signature_def"]["signature_def"]
    default = signatures["serving_default"]
    assert [d["size"] for d in default["inputs"]["keras_tensor"]["tensor_shape"]["dim"]] == ["-1", "64", "64", "3"]
    assert default["outputs"]["output_0"]["dtype"] == "DT_FLOAT"
    assert set(signatures["serving_labels"]["outputs"]) == {"probabilities", "label"}
    body = json.dumps({"instances": [{"b64": b64(pngs[0])}]})
    for path in (f"/versions/{version}", "/labels/latest"):
        reply = requests.post(f"{base}/v1/models/{MODEL}{path}:predict", data=body, headers=bearer, timeout=30)
        np.testing.assert_allclose(reply.json()["predictions"], expected(pngs[:1]), atol=1e-6)
    for path, message in (("/versions/1", "version 1"), ("/labels/canary", "'canary'")):
        for suffix, method in (("", "GET"), ("/metadata", "GET"), (":predict", "POST")):
            reply = requests.request(
                method, f"{base}/v1/models/{MODEL}{path}{suffix}", data=body, headers=bearer, timeout=30
            )
            assert reply.status_code == 404 and message in reply.json()["error"], (path, suffix)


ONE = [[[0.0] * 3] * 64] * 64  # one 64x64x3 tensor


BAD = {
    "empty body": (b"", 400, "empty"),
    "not JSON": (b"{instances", 400, "not valid JSON"),
    "deeply nested": (b"[" * 100_000, 400, "nested too deeply"),
    "not an object": ([1, 2], 400, "JSON object"),
    "missing fields": ({"signature_name": "serving_default"}, 400, "missing 'instances'"),
    "both forms": ({"instances": [ONE], "inputs": [ONE]}, 400, "only one of"),
    "instances not a list": ({"instances": {"a": 1}}, 400, "'instances' must be a list"),
    "no instances": ({"instances": []}, 400, "no instances"),
    "too many instances": ({"instances": [ONE] * 33}, 400, "too many instances: 33 (limit 32"),
    "too many columnar": ({"inputs": [ONE] * 33}, 400, "too many instances: 33 (limit 32"),
    "wrong shape": (
        {"instances": [[1.0, 2.0, 3.0]]},
        400,
        "shape [1, 3] does not fit the model's input [-1, 64, 64, 3]",
    ),
    "wrong columnar shape": ({"inputs": ONE}, 400, "shape [64, 64, 3] does not fit"),
    "strings": ({"instances": [[[["1"] * 3] * 64] * 64]}, 400, "must be numbers"),
    "booleans": ({"instances": [[[[True] * 3] * 64] * 64]}, 400, "must be numbers"),
    # numpy reads true as 1 among numbers: refused all the same, not predicted
    "a boolean among numbers": (
        {"instances": [[[[True, 0.0, 0.0]] + [[0.0] * 3] * 63] + [[[0.0] * 3] * 64] * 63]},
        400,
        "instances: values must be numbers, not true or false",
    ),
    "a boolean among columnar numbers": ({"inputs": [[[[0, 0, False]] * 64] * 64]}, 400, "not true or false"),
    # json.loads reads UTF-16 and UTF-32 too, where "true" is not the bytes b"true"
    "a boolean among numbers in UTF-16": (
        json.dumps({"instances": [[[[True, 0.0, 0.0]] + [[0.0] * 3] * 63] + [[[0.0] * 3] * 64] * 63]}).encode("utf-16"),
        400,
        "not true or false",
    ),
    "a named example with a boolean": (
        {"instances": [{"keras_tensor": [[[0.0, 1.0, 2.0]] * 64] * 63 + [[[0.0, 1.0, False]] * 64]}]},
        400,
        "not true or false",
    ),
    "an integer of 5000 digits": (b'{"instances": [' + b"1" * 5000 + b"]}", 400, "body: number too long"),
    "an integer beyond float64": ({"instances": [[[[10**400] * 3] * 64] * 64]}, 400, "beyond the range"),
    "ragged": ({"instances": [ONE, [[0.0]]]}, 400, "rectangular"),
    "NaN": (json.dumps({"instances": [[[[float("nan")] * 3] * 64] * 64]}).encode(), 400, "finite"),
    "beyond float32": ({"instances": [[[[1e39] * 3] * 64] * 64]}, 400, "finite"),
    "bad base64": ({"instances": [{"b64": "%%%"}]}, 400, "instances[0]: bad base64"),
    # numpy made an array of 100,000 such strings: 373 GiB asked for (a 500), or the OOM killer
    "a long string among numbers": ({"instances": [["a" * 1_000_000] + [1] * 100_000]}, 400, "must be numbers"),
    "a number string": ({"instances": [[[["1.5"] * 3] * 64] * 64]}, 400, "must be numbers"),
    "a string deep in a ragged list": ({"instances": [[1, ["a" * 1000] * 100]] * 10}, 400, "rectangular"),
    "b64 not a string": ({"instances": [{"b64": 5}]}, 400, "must be a string of base64"),
    "undecodable image bytes": ({"instances": [{"b64": b64(b"GIF89a garbage")}]}, 400, "instances[0]"),
    "images and tensors mixed": ({"instances": [{"b64": b64(b"x")}, ONE]}, 400, "all images"),
    "unknown input name": ({"instances": [{"image_bytes": {"b64": "aGk="}}]}, 400, "'keras_tensor'"),
    "unknown signature": ({"signature_name": "predict_images", "instances": [ONE]}, 400, "'predict_images' not found"),
    "signature not a string": ({"signature_name": {}, "instances": [ONE]}, 400, "signature_name must be a string"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_request(shapes_client, bearer, case):
    body, status, message = BAD[case]
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    reply = shapes_client.post(f"/v1/models/{MODEL}:predict", headers=bearer, data=data)
    assert reply.status_code == status, reply.get_json()
    assert message in reply.get_json()["error"]
    assert "sys." not in reply.get_json()["error"]  # never Python's advice to its programmer
    check(shapes_client.get("/openapi.json").get_json(), f"/v1/models/{MODEL}:predict", "post", reply)


def test_integers_past_64_bits_are_numbers_as_their_floats_are(shapes_client, bearer):
    # numpy makes an object array of 10**20 (past int64 and uint64): it was "values must be numbers".
    path, answers = f"/v1/models/{MODEL}:predict", []
    for big in (10**20, 1e20, 2**64, 2.0**64):
        instance = [[[big, 0.5, 0]] + [[0, 0, 0]] * 63] + [[[0, 0, 0]] * 64] * 63  # among floats too
        reply = shapes_client.post(path, headers=bearer, data=json.dumps({"instances": [instance]}).encode())
        answers.append((reply.status_code, reply.get_json()))
    assert answers[0] == answers[1] and answers[2] == answers[3], answers
    assert answers[0][0] == 200


def test_booleans_outside_the_tensors_and_words_in_strings_change_nothing(shapes_client, bearer, pngs):
    # "true" in a string after "[" makes the cheap test look at the values: none is a boolean.
    body = {"signature_name": "serving_default", "note": "[true, false]", "instances": tensor(pngs).tolist()}
    reply = shapes_client.post(f"/v1/models/{MODEL}:predict", headers=bearer, json=body)
    assert reply.status_code == 200, reply.get_json()
    np.testing.assert_allclose(reply.get_json()["predictions"], expected(pngs), atol=1e-6)


def test_a_gzip_body_of_several_members_is_read_whole(settings, shapes_client, bearer, pngs):
    # RFC 1952: a gzip file may be several members one after the other (cat a.gz b.gz).
    text = json.dumps({"instances": [{"b64": b64(png)} for png in pngs]}).encode()
    members = gzip.compress(text[:100]) + gzip.compress(text[100:-10]) + gzip.compress(text[-10:])
    headers = {**bearer, "Content-Encoding": "gzip"}
    reply = shapes_client.post(f"/v1/models/{MODEL}:predict", headers=headers, data=members)
    assert reply.status_code == 200, reply.get_json()
    np.testing.assert_allclose(reply.get_json()["predictions"], expected(pngs), atol=1e-6)
    # ...under one limit: a bomb cut in members (each under it) is as large as it was whole
    small = predict_client(settings, MODEL, max_upload_bytes=100_000)
    bomb = json.dumps({"instances": [ONE] * 3}).encode()  # ~150 kB
    third = len(bomb) // 3
    parts = [bomb[:third], bomb[third : 2 * third], bomb[2 * third :]]
    reply = small.post(f"/v1/models/{MODEL}:predict", headers=headers, data=b"".join(map(gzip.compress, parts)))
    assert reply.status_code == 413 and "after gzip decompression" in reply.get_json()["error"]
    # bytes after the last member that are not a member: refused, not ignored
    for tail, size in ((b"garbage", 7), (b"\0" * 8, 8), (b"\x1f", 1)):
        reply = shapes_client.post(f"/v1/models/{MODEL}:predict", headers=headers, data=gzip.compress(text) + tail)
        assert reply.status_code == 400, (tail, reply.get_json())
        assert f"{size} bytes follow the end of the gzip data" in reply.get_json()["error"]


def test_auth_model_verb_and_size_errors(settings, shapes_client, bearer, auth):
    body = json.dumps({"instances": [ONE]})
    spec = shapes_client.get("/openapi.json").get_json()
    scoped = auth.create_key(["arrows"])
    other = {"Authorization": f"Bearer {auth.issue_token(scoped.public_key, scoped.secret_key, 't').token}"}
    cases = [
        (f"/v1/models/{MODEL}:predict", {}, 401, "bearer"),
        (f"/v1/models/{MODEL}:predict", other, 403, MODEL),
        ("/v1/models/arrows:predict", bearer, 404, "arrows"),
        (f"/v1/models/{MODEL}:classify", bearer, 400, "':classify' is not served here"),
    ]
    for path, headers, status, message in cases:
        reply = shapes_client.post(path, headers=headers, data=body)
        assert reply.status_code == status and message in reply.get_json()["error"], (path, reply.get_json())
        if status != 400:
            check(spec, path, "post", reply)
    for path in (f"/v1/models/{MODEL}", f"/v1/models/{MODEL}/metadata"):
        assert shapes_client.get(path).status_code == 401
        assert shapes_client.get(path, headers=other).status_code == 403
        check(spec, path, "get", shapes_client.get(path, headers=bearer))
    small = predict_client(settings, MODEL, max_upload_bytes=100_000)
    bomb = gzip.compress(json.dumps({"instances": [ONE] * 3}).encode())
    reply = small.post(f"/v1/models/{MODEL}:predict", headers={**bearer, "Content-Encoding": "gzip"}, data=bomb)
    assert reply.status_code == 413 and "after gzip decompression" in reply.get_json()["error"]
    check(spec, f"/v1/models/{MODEL}:predict", "post", reply)


@pytest.mark.parametrize("filler", [b"{}", b"[]", b'{"a":0.5}', b'"ab"'])
def test_json_that_would_swell_in_memory_is_refused_before_parsing(shapes_client, bearer, filler):
    # ~10 KB of gzip inflating to ~10 MB of tiny values: millions of Python objects, 10 to 30 times
    # the text. Refused from an estimate made before parsing.
    text = b'{"instances": [' + b",".join([filler] * (8_000_000 // (len(filler) + 1))) + b"]}"
    headers = {**bearer, "Content-Encoding": "gzip"}
    reply = shapes_client.post(f"/v1/models/{MODEL}:predict", headers=headers, data=gzip.compress(text))
    assert reply.status_code == 400
    assert "body would take ~" in reply.get_json()["error"] and "fewer examples" in reply.get_json()["error"]
    v2 = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [' + text[15:-2] + b"]}]}"
    reply = shapes_client.post(f"/v2/models/{MODEL}/infer", headers=headers, data=gzip.compress(v2))
    assert reply.status_code == 400 and "inference request would take ~" in reply.get_json()["error"]


def test_a_large_image_in_json_is_decoded_like_an_upload(settings, bearer):
    # An image that needs most of the decode budget: as b64 in JSON it gets the same answer as
    # uploaded (the JSON around it holds nothing back from the budget).
    client = predict_client(settings, MODEL, decode_memory_mb=64)
    photo = io.BytesIO()
    Image.new("RGB", (3800, 3800), (200, 30, 30)).save(photo, "PNG")
    upload = client.post(
        f"/models/{MODEL}/predict.json", headers=bearer, data={"file": (io.BytesIO(photo.getvalue()), "a.png")}
    )
    assert upload.status_code == 200
    body = {"instances": [{"b64": base64.b64encode(photo.getvalue()).decode()}]}
    reply = client.post(f"/v1/models/{MODEL}:predict", headers=bearer, json=body)
    assert reply.status_code == 200, reply.get_json()


def test_a_multipart_upload_sent_to_v1_or_v2_says_where_it_goes(shapes_client, bearer, pngs):
    """The upload form sent to a JSON protocol's endpoint: a 415 naming the multipart route, not
    "not valid JSON ('utf-8' codec can't decode byte 0x89…)"."""
    for path in (f"/v1/models/{MODEL}:predict", f"/v2/models/{MODEL}/infer"):
        reply = shapes_client.post(path, headers=bearer, data={"file": (io.BytesIO(pngs[0]), "c.png")})
        assert reply.status_code == 415 and "/models/<name>/predict.json" in reply.get_json()["error"], path
        check(shapes_client.get("/openapi.json").get_json(), path, "post", reply)
