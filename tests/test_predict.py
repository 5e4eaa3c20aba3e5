"""The predict function through the test client: auth, scopes, answers, statuses."""

import io
import subprocess
import sys

import pytest

from local import ROOT
from local.helpers import demo_image, encode, free_port
from tests.conftest import predict_client, subprocess_env


def upload(client, headers, *files, name="shapes"):
    data = {"file": [(io.BytesIO(content), filename) for filename, content in files]}
    return client.post(f"/models/{name}/predict.json", data=data, headers=headers, content_type="multipart/form-data")


@pytest.fixture
def circle_png():
    return encode(demo_image("shapes", "circle", 1))


def test_one_file_gets_prediction_confidence_top(shapes_client, bearer):
    image = encode(demo_image("shapes", "triangle", 2), "JPEG", quality=90)
    reply = upload(shapes_client, bearer, ("t.jpg", image))
    assert reply.status_code == 200, reply.get_json()
    body = reply.get_json()
    assert body["prediction"] == "triangle"
    assert 0 <= body["confidence"] <= 100
    assert [t["label"] for t in body["top"]][0] == "triangle"
    assert sorted(t["label"] for t in body["top"]) == ["circle", "square", "triangle"]
    assert abs(sum(t["confidence"] for t in body["top"]) - 100) < 0.1


def test_several_files_answer_in_order(shapes_client, bearer):
    labels = ["square", "circle", "triangle", "circle"]
    files = [(f"{i}.png", encode(demo_image("shapes", label, 20 + i))) for i, label in enumerate(labels)]
    reply = upload(shapes_client, bearer, *files)
    assert reply.status_code == 200
    results = reply.get_json()["results"]
    assert [r["file"] for r in results] == [f for f, _ in files]
    assert [r["prediction"] for r in results] == labels


def test_a_nameless_file_among_several_is_named_by_its_place(shapes_client, bearer):
    """A browser's empty file input sends a part with filename="" and no bytes: the message says
    which part, where it said only "file"."""
    image = encode(demo_image("shapes", "circle", 1))
    body = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n" + image +
            b"\r\n--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"\"\r\n"
            b"Content-Type: application/octet-stream\r\n\r\n\r\n--b--\r\n")  # fmt: skip
    reply = shapes_client.post("/models/shapes/predict.json", headers=bearer, data=body,
                               content_type="multipart/form-data; boundary=b")  # fmt: skip
    assert reply.status_code == 400 and reply.get_json()["error"] == "file 2 of 2: file is empty"


def test_metadata(shapes_client, bearer):
    reply = shapes_client.get("/models/shapes.json", headers=bearer)
    assert reply.status_code == 200
    meta = reply.get_json()
    assert meta["labels"] == ["circle", "square", "triangle"]
    assert meta["input"]["height"] == 64 and meta["metrics"]["holdout_accuracy"] >= 0.95


def test_token_required(shapes_client, circle_png):
    assert upload(shapes_client, {}, ("c.png", circle_png)).status_code == 401
    assert upload(shapes_client, {"Authorization": "Bearer " + "z" * 43}, ("c.png", circle_png)).status_code == 401
    assert shapes_client.get("/models/shapes.json").status_code == 401


def test_key_scopes_are_enforced(shapes_client, auth, circle_png):
    pair = auth.create_key(["arrows"])
    token = auth.issue_token(pair.public_key, pair.secret_key, "t").token
    reply = upload(shapes_client, {"Authorization": f"Bearer {token}"}, ("c.png", circle_png))
    assert reply.status_code == 403 and "shapes" in reply.get_json()["error"]
    allowed = auth.create_key(["shapes"])
    token = auth.issue_token(allowed.public_key, allowed.secret_key, "t").token
    assert upload(shapes_client, {"Authorization": f"Bearer {token}"}, ("c.png", circle_png)).status_code == 200


def test_other_model_is_404_and_wrong_method_405(shapes_client, bearer, circle_png):
    reply = upload(shapes_client, bearer, ("c.png", circle_png), name="arrows")
    assert reply.status_code == 404 and "arrows" in reply.get_json()["error"]
    assert shapes_client.get("/models/arrows.json", headers=bearer).status_code == 404
    wrong = shapes_client.get("/models/shapes/predict.json", headers=bearer)
    assert wrong.status_code == 405 and wrong.headers["Allow"] == "POST"
    assert shapes_client.post("/models/shapes.json", headers=bearer).status_code == 405
    assert shapes_client.get("/nothing", headers=bearer).status_code == 404
    # Another model's paths are not here whatever the method (a wrong one used to get a 405).
    for method, path in [("GET", "/models/nope/predict.json"), ("POST", "/models/nope.json"),
                         ("GET", "/v1/models/nope:predict"), ("GET", "/v2/models/nope/infer")]:  # fmt: skip
        reply = shapes_client.open(path, method=method, headers=bearer)
        assert reply.status_code == 404 and "no such model here: nope" in reply.get_json()["error"], (method, path)


def test_a_file_field_sent_as_text_is_named(shapes_client, bearer):
    """curl -F file=<photo.jpg (text) instead of -F file=@photo.jpg: the part has no filename."""
    reply = shapes_client.post(
        "/models/shapes/predict.json",
        headers=bearer,
        data={"file": "not an upload"},
        content_type="multipart/form-data",
    )
    assert reply.status_code == 400 and "field 'file' is text, not a file" in reply.get_json()["error"]


def test_health_ready_and_docs(shapes_client):
    assert shapes_client.get("/healthz").status_code == 200
    assert shapes_client.get("/readyz").get_json() == {"status": "ready"}
    spec = shapes_client.get("/openapi.json").get_json()
    assert "/models/{name}/predict.json" in spec["paths"]
    assert shapes_client.get("/docs").status_code == 200


def test_redis_down_is_answered_by_the_function_which_stays_ready(own_redis, settings, circle_png):
    settings = settings.replace(redis_url=own_redis.url)
    client = predict_client(settings, "shapes")
    own_redis.stop()
    reply = upload(client, {"Authorization": "Bearer " + "t" * 43}, ("c.png", circle_png))
    assert reply.status_code == 503 and "Redis unreachable" in reply.get_json()["error"]
    assert int(reply.headers["Retry-After"]) > 0
    # Readiness is this process's: on Knative a Redis blip must not take every pod out of rotation.
    assert client.get("/readyz").get_json() == {"status": "ready"}


def test_scopes_checked_against_the_right_model(settings, auth):
    client = predict_client(settings, "arrows")
    pair = auth.create_key(["shapes"])
    token = auth.issue_token(pair.public_key, pair.secret_key, "t").token
    image = encode(demo_image("arrows", "up", 3))
    reply = upload(client, {"Authorization": f"Bearer {token}"}, ("a.png", image), name="arrows")
    assert reply.status_code == 403


def test_serving_never_imports_tensorflow(env):
    """A whole authenticated prediction (decode, inference, answer) in a fresh process, as the
    image serves it: LiteRT is loaded, TensorFlow never is."""
    script = """
import io, json, sys
import functions_framework
from local.helpers import demo_image, encode
from shared import config
from shared.auth import AuthStore
auth = AuthStore(config.load())
pair = auth.create_key()
token = auth.issue_token(pair.public_key, pair.secret_key, "t").token
app = functions_framework.create_app(target="handle", source="functions/predict/main.py")
reply = app.test_client().post("/models/shapes/predict.json", headers={"Authorization": "Bearer " + token},
    data={"file": (io.BytesIO(encode(demo_image("shapes", "circle"))), "c.png")})
auth.revoke_key(pair.public_key)
print(reply.status_code, reply.get_json()["prediction"], "tensorflow" in sys.modules, "ai_edge_litert" in sys.modules)
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=subprocess_env(MODEL_NAME="shapes", **env),
        timeout=60,
    )
    assert result.stdout.split() == ["200", "circle", "False", "True"], result.stderr


def start_predict(**setup):
    """``python -m shared.server`` for the predict function, as the image runs it, until it exits."""
    command = [
        sys.executable,
        "-m",
        "shared.server",
        str(ROOT / "functions/predict/main.py"),
        "--port",
        str(free_port()),
    ]
    return subprocess.run(command, capture_output=True, text=True, env=subprocess_env(**setup), timeout=60)


@pytest.mark.parametrize(
    "setup, reason",
    [
        ({"MODEL_NAME": ""}, "MODEL_NAME is required"),
        ({"MODEL_NAME": "nope"}, "model.json not found"),
        ({"MODEL_NAME": "shapes", "MODEL_DIR": str(ROOT / "models" / "arrows")}, "holds model 'arrows'"),
        ({"MODEL_NAME": "shapes", "MAX_IMAGE_PIXELS": "lots"}, "MAX_IMAGE_PIXELS must be an integer"),
        ({"MODEL_NAME": "shapes", "REDIS_URL": "redis://127.0.0.1:notaport/0"}, "REDIS_URL is not a usable"),
        ({"MODEL_NAME": "shapes", "REDIS_URL": "bogus://127.0.0.1/0"}, "REDIS_URL is not a usable"),
        # An option redis-py does not know was a 500 with a traceback on every request; the password stays out.
        ({"MODEL_NAME": "shapes", "REDIS_URL": "redis://:hunter22@127.0.0.1/0?Pasword=x"}, "unknown option 'Pasword'"),
        ({"MODEL_NAME": "shapes", "REDIS_URL": "redis://127.0.0.1/0?client_name=my%20app"}, "may not hold spaces"),
        ({"MODEL_NAME": "shapes", "REDIS_URL": "redis://:hunter22@[::1/0"}, "not a usable Redis URL"),
        # A password holding / ? or # unencoded: urlsplit reads the rest as the path, the query or
        # the fragment, whose messages quoted it; all before the last @ stays out.
        ({"MODEL_NAME": "shapes", "REDIS_URL": "redis://:hun/ter22@127.0.0.1:6379/0"}, "percent-encode"),
        ({"MODEL_NAME": "shapes", "REDIS_URL": "redis://u:hunter22?x@127.0.0.1/0"}, "(redis://***)"),
        ({"MODEL_NAME": "shapes", "REDIS_URL": "redis://:hunter#22@127.0.0.1/0"}, "percent-encode"),
        ({"MODEL_NAME": "shapes", "REDIS_URL": "redis://:hun@ter/22@127.0.0.1/0"}, "***@127.0.0.1/0)"),  # @ and /
        ({"MODEL_NAME": "shapes", "REDIS_URL": "redis://127.0.0.1/0?password=hun#ter22"}, "password=***#***"),
        ({"MODEL_NAME": "shapes", "REDIS_URL": "redis://127.0.0.1/0?password=hun&ter22"}, "percent-encode & and ;"),
        ({"MODEL_NAME": "shapes", "REDIS_URL": "redis://127.0.0.1/0?password=hun@ter22"}, "(redis://***)"),
        # Values redis-py takes and then fails every request with (a 500, or a 503 forever):
        ({"MODEL_NAME": "shapes", "REDIS_URL": "redis://127.0.0.1/0?socket_timeout=-1"}, "socket_timeout must be"),
        ({"MODEL_NAME": "shapes", "REDIS_URL": "redis://127.0.0.1/0?socket_timeout=0"}, "socket_timeout must be"),
        ({"MODEL_NAME": "shapes", "REDIS_URL": "redis://127.0.0.1/0?db=-1"}, "db must be a database number"),
        ({"MODEL_NAME": "shapes", "REDIS_URL": "redis://127.0.0.1/first"}, "the path names the database"),  # not db 0
        ({"MODEL_NAME": "shapes", "TOKEN_TTL": str(10**21)}, "TOKEN_TTL must be seconds, 1 to"),
    ],
)
def test_broken_configuration_stops_at_start_with_one_line(setup, reason):
    result = start_predict(**setup)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # exactly one line
    assert result.stderr.startswith("predict: ") and reason in result.stderr
    assert not any(part in result.stderr for part in ("hunter", "hun/", "ter22"))  # no piece of a password


def test_broken_bundle_stops_at_start(tmp_path):
    bundle = tmp_path / "broken"
    bundle.mkdir()
    (bundle / "model.json").write_text(
        (ROOT / "models/shapes/model.json").read_text().replace('"name": "shapes"', '"name": "broken"')
    )
    (bundle / "model.tflite").write_bytes(b"not a flatbuffer at all")
    result = start_predict(MODEL_NAME="broken", MODEL_DIR=str(bundle))
    assert result.returncode == 1
    assert result.stderr.startswith("predict: ") and "not a usable TFLite model" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
