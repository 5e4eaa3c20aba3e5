"""The OpenAPI documents are valid OpenAPI 3, and what the functions really answer conforms."""

import io
import re

import pytest
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate

from local.helpers import DEMO_MODELS, demo_image, encode
from tests.conftest import predict_client


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


def check(spec, path, method, reply):
    """The reply's status is documented for path+method and its JSON body fits the schema."""
    operation = None
    for template, item in spec["paths"].items():
        pattern = re.sub(r"\\\{[^/]+\\\}", "[^/]+", re.escape(template))  # {name} → one segment
        if re.fullmatch(pattern, path) and method in item:
            operation = item[method]
    assert operation, f"{method.upper()} {path} is not documented"
    status = str(reply.status_code)
    assert status in operation["responses"], f"{method.upper()} {path} → {status} is not documented"
    content = operation["responses"][status].get("content", {}).get("application/json")
    assert content, f"{method.upper()} {path} → {status} has no JSON schema"
    errors = list(OAS30Validator(resolve(content["schema"], spec)).iter_errors(reply.get_json()))
    assert not errors, f"{method.upper()} {path} → {status}: {errors[0].message}"


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


def test_token_answers_conform(token_client, token_spec, keypair):
    good = {"public_key": keypair.public_key, "secret_key": keypair.secret_key}
    wrong = {**good, "secret_key": "sk_" + "q" * 43}
    cases = [
        ("/token.json", "post", lambda: token_client.post("/token.json", json=good)),
        (
            "/token.json",
            "post",
            lambda: token_client.post(
                "/token.json",
                data={
                    "grant_type": "client_credentials",
                    "client_id": keypair.public_key,
                    "client_secret": keypair.secret_key,
                },
            ),
        ),
        ("/token.json", "post", lambda: token_client.post("/token.json", json={"public_key": 1})),
        ("/token.json", "post", lambda: token_client.post("/token.json", json=wrong)),
        ("/token.json", "post", lambda: token_client.post("/token.json", data="x", content_type="text/plain")),
        (
            "/token.json",
            "post",
            lambda: token_client.post("/token.json", data=b"x" * (10 * 2**20 + 1), content_type="application/json"),
        ),
        ("/session.json", "get", lambda: token_client.get("/session.json")),
        ("/healthz", "get", lambda: token_client.get("/healthz")),
        ("/readyz", "get", lambda: token_client.get("/readyz")),
    ]
    for path, method, call in cases:
        check(token_spec, path, method, call())
    token = token_client.post("/token.json", json=good).get_json()["token"]
    check(
        token_spec,
        "/session.json",
        "get",
        token_client.get("/session.json", headers={"Authorization": f"Bearer {token}"}),
    )
    for _ in range(11):
        reply = token_client.post("/token.json", json={**good, "secret_key": "sk_" + "w" * 43})
    assert reply.status_code == 429
    check(token_spec, "/token.json", "post", reply)


def test_predict_answers_conform(shapes_client, bearer, auth):
    spec = shapes_client.get("/openapi.json").get_json()
    image = encode(demo_image("shapes", "circle"))

    def post(files, headers=bearer, name="shapes"):
        return shapes_client.post(
            f"/models/{name}/predict.json",
            headers=headers,
            content_type="multipart/form-data",
            data={"file": [(io.BytesIO(content), f"{i}.png") for i, content in enumerate(files)]},
        )

    scoped = auth.create_key(["arrows"])
    scoped_token = auth.issue_token(scoped.public_key, scoped.secret_key, "t").token
    cases = [
        ("/models/shapes/predict.json", "post", post([image])),
        ("/models/shapes/predict.json", "post", post([image, image])),
        ("/models/shapes/predict.json", "post", post([b"not an image"])),
        ("/models/shapes/predict.json", "post", post([image], headers={})),
        ("/models/shapes/predict.json", "post", post([image], headers={"Authorization": f"Bearer {scoped_token}"})),
        ("/models/other/predict.json", "post", post([image], name="other")),
        (
            "/models/shapes/predict.json",
            "post",
            shapes_client.post("/models/shapes/predict.json", headers=bearer, data=image, content_type="image/png"),
        ),
        ("/models/shapes/predict.json", "get", shapes_client.get("/models/shapes/predict.json", headers=bearer)),
        ("/models/shapes.json", "get", shapes_client.get("/models/shapes.json", headers=bearer)),
        ("/models/shapes.json", "get", shapes_client.get("/models/shapes.json")),
    ]
    for path, method, reply in cases:
        if reply.status_code == 405:
            assert "post" in spec["paths"]["/models/{name}/predict.json"]
            check(spec, path, "post", reply)
        else:
            check(spec, path, method, reply)
