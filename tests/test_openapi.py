"""The OpenAPI documents are valid OpenAPI 3, and what the functions really answer conforms."""

import base64
import io
import json
import re
from typing import Any

import pytest
import requests
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate
from requests.structures import CaseInsensitiveDict

from functions.token.service import create_service as create_token_service
from local.helpers import DEMO_MODELS, demo_image, encode
from shared import imaging
from shared.config import Rate
from tests.conftest import function_client, predict_client
from tests.test_hostile import exchange, request

JSON = {"Content-Type": "application/json"}


def resolve(node, spec):
    """``node`` with every local $ref replaced by what it points at."""
    if isinstance(node, dict):
        if "$ref" in node:
            target = spec
            for part in node["$ref"].lstrip("#/").split("/"):
                target = target[part]
            return resolve(target, spec)
        return {key: resolve(value, spec) for key, value in node.items()}
    if isinstance(node, list):
        return [resolve(value, spec) for value in node]
    return node


def parts(reply) -> tuple[int, CaseInsensitiveDict, Any]:
    """Status, headers and JSON body of a test client's, requests' or a raw (status, headers,
    body) answer."""
    if isinstance(reply, tuple):
        status, headers, body = reply
        return status, CaseInsensitiveDict(headers), json.loads(body)
    if isinstance(reply, requests.Response):
        return reply.status_code, CaseInsensitiveDict(reply.headers), reply.json()
    return reply.status_code, CaseInsensitiveDict(dict(reply.headers)), reply.get_json()


def check(spec, path, method, reply) -> str:
    """The reply's status is documented for path+method, its JSON body fits the schema and the
    documented headers are there (all the required ones; the others valid when present).
    Returns the status, as the document spells it."""
    status_code, headers, body = parts(reply)
    operation = None
    for template, item in spec["paths"].items():
        pattern = re.sub(r"\\\{[^/]+\\\}", "[^/]+", re.escape(template))  # {name} → one segment
        if re.fullmatch(pattern, path) and method in item:
            operation = item[method]
    assert operation, f"{method.upper()} {path} is not documented"
    status = str(status_code)
    assert status in operation["responses"], f"{method.upper()} {path} → {status} is not documented"
    answer = operation["responses"][status]
    content = answer.get("content", {}).get("application/json")
    assert content, f"{method.upper()} {path} → {status} has no JSON schema"
    assert headers.get("Content-Type", "").startswith("application/json"), headers
    errors = list(OAS30Validator(resolve(content["schema"], spec)).iter_errors(body))
    assert not errors, f"{method.upper()} {path} → {status}: {errors[0].message}"
    for name, header in answer.get("headers", {}).items():
        value = headers.get(name)
        assert value is not None or not header.get("required"), f"{method.upper()} {path} → {status}: no {name}"
        if value is not None and header["schema"]["type"] == "integer":
            assert re.fullmatch(r"[0-9]+", value), f"{name}: {value!r}"
    return status


def example(spec, path, method, status):
    """The documented example body of an answer."""
    return spec["paths"][path][method]["responses"][status]["content"]["application/json"]["example"]


def documented_statuses(spec) -> set[str]:
    return {status for item in spec["paths"].values() for op in item.values() for status in op["responses"]}


@pytest.fixture
def token_spec(token_client):
    return token_client.get("/openapi.json").get_json()


def test_token_document_is_valid_openapi(token_spec):
    validate(token_spec)
    schemes = token_spec["components"]["securitySchemes"]
    assert schemes["bearer"]["scheme"] == "bearer"
    assert schemes["oauth2"]["flows"]["clientCredentials"]["tokenUrl"] == "/token.json"


@pytest.mark.parametrize("model", DEMO_MODELS)
def test_predict_documents_are_valid_openapi(settings, model):
    spec = predict_client(settings, model).get("/openapi.json").get_json()
    validate(spec)
    assert f"Thalamus model {model}" == spec["info"]["title"]


class Seen:
    """Answers checked against ``spec`` (see :func:`check`), and the statuses they had."""

    def __init__(self, spec):
        self.spec, self.statuses = spec, set()

    def __call__(self, path, method, reply):
        """``method`` is the documented operation's: a 405 is checked against the path's operation."""
        self.statuses.add(check(self.spec, path, method, reply))
        return reply

    def assert_every_documented_status(self):
        assert documented_statuses(self.spec) - self.statuses == set(), "documented, never answered"


def server_answers(see, port, path, method, slow):
    """What the server itself answers, whatever the operation: a malformed request (400), a
    request line or headers over the limits (414, 431), and for ``slow`` (a POST path and its
    headers; its body never comes) 408 at the deadline, REQUEST_*_TIMEOUT=1."""
    verb = method.upper()
    see(path, method, exchange(port, request(verb, path, "Content-Length: 2", "Content-Length: 3", body=b"{}")))
    see(path, method, exchange(port, request(verb, path + "?" + "a" * 9000)))
    see(path, method, exchange(port, request(verb, path, *[f"X-H{i}: v" for i in range(200)])))
    reply = see(slow[0], "post", exchange(port, request("POST", *slow, body=b"{")))
    assert reply[0] == 408


def test_every_documented_status_of_the_token_function(
    serve_function, token_client, token_spec, keypair, auth, settings, own_redis
):
    """A real answer for every status the token document lists, each conforming."""
    base = serve_function("token", REQUEST_HEADER_TIMEOUT="1", REQUEST_BODY_TIMEOUT="1")
    see = Seen(token_spec)
    good = {"public_key": keypair.public_key, "secret_key": keypair.secret_key}
    form = {"grant_type": "client_credentials", "client_id": keypair.public_key, "client_secret": keypair.secret_key}
    token = see("/token.json", "post", token_client.post("/token.json", json=good)).get_json()["token"]
    see("/token.json", "post", token_client.post("/token.json", data=form))
    bearer = {"Authorization": f"Bearer {token}"}
    for path in ("/session.json", "/models.json", "/v1/models", "/healthz", "/readyz", "/v2", "/v2/health/live"):
        see(path, "get", token_client.get(path, headers=bearer))
    see("/token.json", "post", token_client.post("/token.json", json={"public_key": 1}))  # 400
    see("/token.json", "post", token_client.post("/token.json", data={**form, "grant_type": "password"}))  # OAuth2 400
    see("/token.json", "post", token_client.post("/token.json", json={**good, "secret_key": "sk_" + "q" * 43}))  # 401
    basic = {"Authorization": "Basic " + base64.b64encode(f"{keypair.public_key}:sk_{'q' * 43}".encode()).decode()}
    reply = see("/token.json", "post", token_client.post("/token.json", data={"grant_type": "client_credentials"},
                                                         headers=basic))  # fmt: skip
    assert reply.status_code == 401 and reply.headers["WWW-Authenticate"].startswith("Basic")
    see("/session.json", "get", token_client.get("/session.json"))  # 401 with WWW-Authenticate: Bearer
    see("/token.json", "post", token_client.get("/token.json"))  # 405 with Allow
    see("/healthz", "get", token_client.post("/healthz"))
    huge = requests.post(base + "/token.json", data=b"{" * 16385, headers=JSON, timeout=10)
    assert see("/token.json", "post", huge).json() == example(token_spec, "/token.json", "post", "413")
    see("/token.json", "post", token_client.post("/token.json", data="x", content_type="text/plain"))  # 415
    slow = ("/token.json", "Content-Type: application/json", "Content-Length: 500")  # read before dispatch
    server_answers(see, int(base.rsplit(":", 1)[1]), "/session.json", "get", slow)
    for _ in range(settings.auth_max_failures + 1):
        reply = token_client.post("/token.json", json={**good, "secret_key": "sk_" + "w" * 43})
    assert reply.status_code == 429
    see("/token.json", "post", reply)
    rated = auth.create_key(rate=Rate(1, 60))
    rated_bearer = {"Authorization": "Bearer " + auth.issue_token(rated.public_key, rated.secret_key, "t").token}
    reply = see("/session.json", "get", token_client.get("/session.json", headers=rated_bearer))
    assert reply.status_code == 200 and reply.headers["RateLimit-Remaining"] == "0"
    reply = see("/session.json", "get", token_client.get("/session.json", headers=rated_bearer))
    assert reply.status_code == 429  # with Retry-After and the RateLimit headers, which are required
    down = function_client(create_token_service(settings.replace(redis_url=own_redis.url)))
    own_redis.stop()
    see("/token.json", "post", down.post("/token.json", json=good))  # 503
    see("/session.json", "get", down.get("/session.json", headers=bearer))
    see.assert_every_documented_status()


def test_every_documented_status_of_a_predict_function(
    serve_function, shapes_client, bearer, auth, settings, own_redis, monkeypatch
):
    """A real answer for every status a predict document lists, each conforming."""
    base = serve_function("predict", MODEL_NAME="shapes", REQUEST_HEADER_TIMEOUT="1", REQUEST_BODY_TIMEOUT="1")
    see = Seen(shapes_client.get("/openapi.json").get_json())
    image = encode(demo_image("shapes", "circle"))

    def post(files, headers=bearer, name="shapes", client=shapes_client):
        return client.post(
            f"/models/{name}/predict.json",
            headers=headers,
            content_type="multipart/form-data",
            data={"file": [(io.BytesIO(content), f"{i}.png") for i, content in enumerate(files)]},
        )

    predict = "/models/shapes/predict.json"
    see(predict, "post", post([image]))
    see(predict, "post", post([image, image]))
    for path in ("/models/shapes.json", "/v1/models/shapes", "/v2/models/shapes/ready", "/v2/health/ready"):
        see(path, "get", shapes_client.get(path, headers=bearer))
    v2 = {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(image).decode()]}]}
    see("/v2/models/shapes/infer", "post", shapes_client.post("/v2/models/shapes/infer", json=v2, headers=bearer))
    see(predict, "post", post([b"not an image"]))  # 400
    see(predict, "post", post([image] * 33))
    see(predict, "post", post([image], headers={}))  # 401
    scoped = auth.create_key(["arrows"])
    scoped_bearer = {"Authorization": "Bearer " + auth.issue_token(scoped.public_key, scoped.secret_key, "t").token}
    see(predict, "post", post([image], headers=scoped_bearer))  # 403
    see(predict, "post", post([image], name="other"))  # 404
    see("/v1/models/shapes/versions/1", "get", shapes_client.get("/v1/models/shapes/versions/1", headers=bearer))
    see(predict, "post", shapes_client.get(predict, headers=bearer))  # 405
    reply = see("/v1/models/shapes:predict", "post", shapes_client.get("/v1/models/shapes:predict", headers=bearer))
    assert reply.headers["Allow"] == "POST"  # not the GET of /v1/models/<name>: a name holds no ':'
    small = predict_client(settings, "shapes", max_upload_bytes=1000)
    reply = see(predict, "post", post([image] * 3, client=small))
    assert reply.get_json() == example(
        small.get("/openapi.json").get_json(), "/models/{name}/predict.json", "post", "413"
    )
    see(predict, "post", shapes_client.post(predict, headers=bearer, data=image, content_type="image/png"))  # 415
    slow = (predict, f"Authorization: {bearer['Authorization']}", "Content-Length: 100000")  # read by the service
    server_answers(see, int(base.rsplit(":", 1)[1]), "/models/shapes.json", "get", slow)
    rated = auth.create_key(rate=Rate(1, 60))
    rated_bearer = {"Authorization": "Bearer " + auth.issue_token(rated.public_key, rated.secret_key, "t").token}
    see(predict, "post", post([image], headers=rated_bearer))
    assert see(predict, "post", post([image], headers=rated_bearer)).status_code == 429
    # 503: the decode budget taken by other requests for longer than a request waits (here: at
    # all), and Redis down.
    budget = Taken(1 << 30)
    monkeypatch.setattr(imaging.Limits, "from_settings", classmethod(lambda cls, s: cls(s.max_image_pixels, budget)))
    with budget.reserve(budget.total):
        reply = see(predict, "post", post([image], client=predict_client(settings, "shapes")))
    assert reply.status_code == 503 and "busy" in reply.get_json()["error"]
    down = predict_client(settings.replace(redis_url=own_redis.url), "shapes")
    own_redis.stop()
    reply = see(predict, "post", post([image], client=down))
    assert reply.status_code == 503 and "Redis" in reply.get_json()["error"]
    see.assert_every_documented_status()


class Taken(imaging.DecodeBudget):
    """A decode budget on which a request waits no time for its turn."""

    def reserve(self, nbytes, wait=0.0):
        return super().reserve(nbytes, 0.0)
