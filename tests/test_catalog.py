"""The model list for a key (GET /models.json, KServe's GET /v1/models) on the token function,
the V2 server endpoints it answers too, and the routing table that sends them there."""

from __future__ import annotations

import json
import os

import pytest
import requests

from functions.token.service import create_service as create_token_service
from local import ROOT, routes
from local.stack import discover_models
from shared.modelcatalog import CatalogError, read, write
from tests.conftest import function_client
from tests.test_openapi import check

MODELS = ["arrows", "shapes"]


@pytest.fixture
def catalog_file(tmp_path):
    path = tmp_path / "models.json"
    write(path, [ROOT / "models" / name for name in MODELS])
    return path


@pytest.fixture
def catalog_client(settings, catalog_file):
    return function_client(create_token_service(settings.replace(model_catalog=catalog_file)))


def bearer_for(auth, scopes=None):
    pair = auth.create_key(scopes)
    return {"Authorization": f"Bearer {auth.issue_token(pair.public_key, pair.secret_key, 't').token}"}


def test_a_scoped_key_sees_exactly_its_models(catalog_client, auth):
    spec = catalog_client.get("/openapi.json").get_json()
    everything = catalog_client.get("/models.json", headers=bearer_for(auth)).get_json()["models"]
    assert [m["name"] for m in everything] == MODELS
    shapes = json.loads((ROOT / "models/shapes/model.json").read_text())
    assert everything[1] == {key: shapes[key] for key in ("name", "version", "labels", "input")}

    scoped = bearer_for(auth, ["shapes"])
    reply = catalog_client.get("/models.json", headers=scoped)
    assert [(m["name"], m["version"], m["input"]["width"]) for m in reply.get_json()["models"]] == [
        ("shapes", shapes["version"], 64)
    ]
    check(spec, "/models.json", "get", reply)
    kserve = catalog_client.get("/v1/models", headers=scoped)
    assert kserve.get_json() == {"models": ["shapes"]}
    check(spec, "/v1/models", "get", kserve)
    assert catalog_client.get("/v1/models", headers=bearer_for(auth)).get_json() == {"models": MODELS}
    # a key for a model that is not deployed sees none
    assert catalog_client.get("/models.json", headers=bearer_for(auth, ["digits"])).get_json() == {"models": []}


def test_a_token_for_a_model_not_deployed_is_refused(catalog_client, auth):
    """RFC 6749 5.2: a scope naming a model the catalog lacks (a typo, say) is invalid_scope, told
    only to a caller whose secret was right; a deployed one is granted."""
    pair = auth.create_key()  # a key for every model, deployed or not
    form = {"grant_type": "client_credentials", "client_id": pair.public_key, "client_secret": pair.secret_key}
    reply = catalog_client.post("/token.json", data={**form, "scope": "shapes nosuch"})
    assert reply.status_code == 400 and reply.get_json()["error"] == "invalid_scope"
    assert reply.get_json()["error_description"] == "no such model deployed: nosuch"
    keypair = {"public_key": pair.public_key, "secret_key": pair.secret_key, "scopes": ["nosuch"]}
    assert catalog_client.post("/token.json", json=keypair).get_json() == {"error": "no such model deployed: nosuch"}
    wrong = {**form, "client_secret": "sk_" + "A" * 43, "scope": "nosuch"}
    assert catalog_client.post("/token.json", data=wrong).get_json()["error"] == "invalid_client"
    granted = catalog_client.post("/token.json", data={**form, "scope": "shapes"})
    assert granted.status_code == 200 and granted.get_json()["scope"] == "shapes"
    assert auth.list_keys()[0].live_tokens == 1  # only the granted one was issued


def test_the_list_needs_a_token(catalog_client):
    for path in ("/models.json", "/v1/models"):
        reply = catalog_client.get(path)
        assert reply.status_code == 401 and "bearer" in reply.get_json()["error"]
        assert catalog_client.get(path, headers={"Authorization": "Bearer " + "x" * 43}).status_code == 401
        assert catalog_client.post(path).status_code == 405


def test_catalog_changes_are_picked_up_and_broken_ones_refused(settings, catalog_file, auth):
    client = function_client(create_token_service(settings.replace(model_catalog=catalog_file)))
    headers = bearer_for(auth)
    entries = json.loads(catalog_file.read_text())
    catalog_file.write_text(json.dumps(entries[:1]))
    os.utime(catalog_file, ns=(1, 1))  # a new stamp even within the clock's resolution
    assert client.get("/v1/models", headers=headers).get_json() == {"models": ["arrows"]}
    catalog_file.write_text("{broken")  # a bad update keeps the last good list
    assert client.get("/v1/models", headers=headers).get_json() == {"models": ["arrows"]}

    with pytest.raises(CatalogError, match="not valid JSON"):
        create_token_service(settings.replace(model_catalog=catalog_file))
    catalog_file.write_text(json.dumps([{"name": "shapes"}]))
    with pytest.raises(CatalogError, match="'shapes' lacks version, labels, input"):
        create_token_service(settings.replace(model_catalog=catalog_file))
    with pytest.raises(CatalogError, match="not found"):
        create_token_service(settings.replace(model_catalog=catalog_file.with_name("nope.json")))
    # without MODEL_CATALOG the token function lists no models
    bare = function_client(create_token_service(settings))
    assert bare.get("/models.json", headers=headers).get_json() == {"models": []}


def test_a_bundle_the_list_would_refuse_is_refused_where_it_is_written(tmp_path, capsys):
    """start.sh and knative/manage.py write the list with the token function's own check: a
    model.json without a version stops them there, naming it, instead of listing a null."""
    for name, change in (("noversion", {"version": None}), ("numbered", {"version": 3})):
        bundle = tmp_path / name
        bundle.mkdir()
        meta = {**json.loads((ROOT / "models/shapes/model.json").read_text()), "name": name, **change}
        (bundle / "model.json").write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))
        (bundle / "model.tflite").write_bytes((ROOT / "models/shapes/model.tflite").read_bytes())
    with pytest.raises(CatalogError, match="model 'noversion' lacks version"):
        write(tmp_path / "models.json", [tmp_path / "numbered", tmp_path / "noversion"])
    write(tmp_path / "models.json", [tmp_path / "numbered"])  # a number is a version, as the bundle loader takes it
    assert [m["version"] for m in json.loads((tmp_path / "models.json").read_text())] == ["3"]
    listed = json.loads((tmp_path / "models.json").read_text())
    for change, words in (({"version": True}, "version must be text or a number"),
                          ({"labels": ["a", 1]}, "labels must be a list of strings"),
                          ({"name": "Shapes_V2"}, "is not one: lowercase"),
                          ({"name": "token"}, "not 'token'")):  # fmt: skip
        (tmp_path / "models.json").write_text(json.dumps([{**listed[0], **change}]))
        with pytest.raises(CatalogError, match=words):
            read(tmp_path / "models.json")
    (tmp_path / "models.json").write_text(json.dumps(listed * 2))
    with pytest.raises(CatalogError, match="'numbered' is listed more than once"):
        read(tmp_path / "models.json")

    (tmp_path / "numbered").rename(tmp_path / "Numbered_V2")  # no route or key scope could name it
    assert discover_models(tmp_path) == ["noversion"]
    assert "not serving models/Numbered_V2" in capsys.readouterr().err


def test_a_broken_catalog_stops_the_token_function_with_one_line(serve_function, tmp_path):
    bad = tmp_path / "models.json"
    bad.write_text("[1]")
    with pytest.raises(RuntimeError, match="exited with 1"):
        serve_function("token", MODEL_CATALOG=str(bad))


def test_token_function_answers_the_protocols_server_endpoints(token_client):
    spec = token_client.get("/openapi.json").get_json()
    for path, body in (
        ("/", {"status": "alive"}),  # KServe V1's server liveness
        ("/v2", {"name": "thalamus"}),
        ("/v2/health/live", {"live": True}),
        ("/v2/health/ready", {"ready": True}),
    ):
        reply = token_client.get(path)  # no token: health checks and tritonclient ask without one
        assert reply.status_code == 200 and body.items() <= reply.get_json().items()
        check(spec, path, "get", reply)


def test_catalog_and_health_over_http(serve_function, catalog_file, auth):
    base = serve_function("token", MODEL_CATALOG=str(catalog_file))
    reply = requests.get(f"{base}/models.json", headers=bearer_for(auth, ["arrows"]), timeout=10)
    assert [m["name"] for m in reply.json()["models"]] == ["arrows"]
    assert requests.get(f"{base}/v2/health/ready", timeout=10).json() == {"ready": True}


# -- routing: the gateway's table and the Istio routing rendered from it --------------------------


@pytest.mark.parametrize(
    "path, target",
    [
        ("/", ("token", None)),
        ("/models.json", ("token", None)),
        ("/v1/models", ("token", None)),
        ("/v2", ("token", None)),
        ("/v2/health/live", ("token", None)),
        ("/v2/health/ready", ("token", None)),
        ("/v1/models/shapes", ("model", "shapes")),
        ("/v1/models/shapes:predict", ("model", "shapes")),
        ("/v1/models/shapes/metadata", ("model", "shapes")),
        ("/v1/models/shapes/versions/1:predict", ("model", "shapes")),
        ("/v1/models/shapes/labels/latest:predict", ("model", "shapes")),
        ("/v2/models/shapes", ("model", "shapes")),
        ("/v2/models/shapes/infer", ("model", "shapes")),
        ("/v2/models/shapes/versions/1/infer", ("model", "shapes")),
        ("/models/shapes.json", ("model", "shapes")),
        ("/models/shapes/predict.json", ("model", "shapes")),
        ("/v1/models/arrow", ("model", "arrow")),
        ("/v1/models/arrow:predict", ("model", "arrow")),
        ("/v1/modelsx", None),
        ("/v2/models", None),
        ("/v2/healthz", None),
        ("/models/shapes.jsonx", None),
        ("/v1/models/shapes.json", None),
    ],
)
def test_upstream_for_matches_model_names_exactly(path, target):
    assert routes.upstream_for(path) == target


@pytest.mark.slow
def test_the_stack_lists_its_bundles_for_a_key(running_stack, tmp_path):
    """./start.sh hands the token function a catalog of models/; the gateway routes the list there."""
    assert running_stack.keys("-g", str(tmp_path / "k.json"), "--models", "shapes").returncode == 0
    pair = json.loads((tmp_path / "k.json").read_text())
    token = requests.post(f"{running_stack.gateway}/token.json", json=pair, timeout=30).json()["token"]
    headers = {"Authorization": f"Bearer {token}"}
    listed = requests.get(f"{running_stack.gateway}/models.json", headers=headers, timeout=10).json()["models"]
    assert [(m["name"], m["input"]["height"]) for m in listed] == [("shapes", 64)]
    assert requests.get(f"{running_stack.gateway}/v1/models", headers=headers, timeout=10).json() == {
        "models": ["shapes"]
    }
    assert requests.get(f"{running_stack.gateway}/v1/models/arrows", headers=headers, timeout=10).status_code == 403
    assert requests.get(f"{running_stack.gateway}/v1/models/arrow", headers=headers, timeout=10).status_code == 404
