"""Every answer the token function gives, errors included, is a documented response."""

import base64

from shared.config import Rate
from tests.conftest import predict_client
from tests.test_openapi import check

WRONG_SK = "sk_" + "q" * 43


def test_every_token_answer_is_documented(token_client, auth, keypair):
    spec = token_client.get("/openapi.json").get_json()
    basic = base64.b64encode(f"{keypair.public_key}:{WRONG_SK}".encode()).decode()
    grant = {"grant_type": "client_credentials"}
    form_posts = [
        {"data": {**grant, "client_id": keypair.public_key, "client_secret": keypair.secret_key}},
        {"data": {**grant, "client_id": keypair.public_key, "client_secret": WRONG_SK}},
        {"data": grant, "headers": {"Authorization": f"Basic {basic}"}},
        {"data": grant, "headers": {"Authorization": "Basic !!"}},
        {"data": {"grant_type": "password"}},
        {"data": {"client_id": keypair.public_key}},
        {"data": grant},
        {"data": '{"public_key": "pk_x"}', "content_type": "application/x-www-form-urlencoded"},
        {"json": grant, "headers": {"Authorization": f"Basic {basic}"}},
    ]
    statuses = set()
    for kwargs in form_posts:
        reply = token_client.post("/token.json", **kwargs)
        statuses.add(reply.status_code)
        check(spec, "/token.json", "post", reply)
        if reply.status_code == 401 and "headers" in kwargs:
            assert "WWW-Authenticate" in spec["paths"]["/token.json"]["post"]["responses"]["401"]["headers"]
    assert statuses == {200, 400, 401, 415}

    rated = auth.create_key(rate=Rate(1, 60))
    token = auth.issue_token(rated.public_key, rated.secret_key, "t").token
    documented = spec["paths"]["/session.json"]["get"]["responses"]
    for expected in (200, 429):
        reply = token_client.get("/session.json", headers={"Authorization": f"Bearer {token}"})
        assert reply.status_code == expected
        check(spec, "/session.json", "get", reply)
        assert set(documented[str(expected)]["headers"]) >= {
            "RateLimit-Limit",
            "RateLimit-Remaining",
            "RateLimit-Reset",
        }


def test_rate_limited_answers_are_documented_on_every_function(settings, token_client, auth):
    shapes = predict_client(settings, "shapes")
    rated = auth.create_key(rate=Rate(1, 60))
    headers = {"Authorization": f"Bearer {auth.issue_token(rated.public_key, rated.secret_key, 't').token}"}
    assert token_client.get("/session.json", headers=headers).status_code == 200  # the window's one request
    cases = [
        (token_client, "/models.json", "get", token_client.get),
        (shapes, "/models/shapes.json", "get", shapes.get),
        (shapes, "/v1/models/shapes", "get", shapes.get),
    ]
    for client, path, method, call in cases:
        spec = client.get("/openapi.json").get_json()
        reply = call(path, headers=headers)
        assert reply.status_code == 429 and reply.headers["RateLimit-Remaining"] == "0"
        check(spec, path, method, reply)
