"""The admin and client flow over real HTTP: keys.py + a functions-framework process, and the
OAuth2 client libraries people use against it."""

import json
import time

import pytest
import requests
from authlib.integrations.requests_client import OAuth2Session as AuthlibSession
from authlib.integrations.requests_client import OAuthError
from oauthlib.oauth2 import BackendApplicationClient, InvalidClientError
from requests_oauthlib import OAuth2Session

from tests.conftest import subprocess_env
from tests.test_keys import keys


def test_keys_token_session_revoke_purge(env, serve_function, tmp_path, raw_redis):
    run = lambda *args: keys(*args, env=subprocess_env(**env))  # noqa: E731
    base = serve_function("token")
    key_file = tmp_path / "client.json"
    assert run("-g", str(key_file)).returncode == 0
    pair = json.loads(key_file.read_text())

    reply = requests.post(f"{base}/token.json", json=pair, timeout=10)
    assert reply.status_code == 200
    token = reply.json()["token"]
    auth = {"Authorization": f"Bearer {token}"}
    session = requests.get(f"{base}/session.json", headers=auth, timeout=10)
    assert session.status_code == 200 and session.json()["public_key"] == pair["public_key"]

    assert run("-r", pair["public_key"]).returncode == 0
    after = requests.get(f"{base}/session.json", headers=auth, timeout=10)
    assert after.status_code == 401 and after.json()["error"]

    # The function adds its usage counts to Redis once a second: let that land before the purge,
    # or it would write them after it.
    deadline = time.monotonic() + 10
    while not raw_redis.exists(env["THALAMUS_PREFIX"] + "last-used") and time.monotonic() < deadline:
        time.sleep(0.1)
    raw_redis.set("foreign:e2e", "stays")
    try:
        run("-g", str(tmp_path / "second.json"))
        assert run("-p", "--yes").returncode == 0
        assert raw_redis.get("foreign:e2e") == "stays"
        # Everything under the prefix is gone; the purge's own audit event starts a new stream,
        # beside the purge's time (usage still held for the purged keys is dropped against it).
        left = sorted(raw_redis.scan_iter(env["THALAMUS_PREFIX"] + "*"))
        assert left == [env["THALAMUS_PREFIX"] + "audit", env["THALAMUS_PREFIX"] + "purged"]
    finally:
        raw_redis.delete("foreign:e2e")


def test_oversized_upload_is_refused_without_reading_it(serve_function):
    base = serve_function("token", MAX_UPLOAD_BYTES="1000")

    def endless():
        yield b"{"
        for _ in range(100_000):  # 6.5 GB if the server read it all
            yield b" " * 65536

    reply = requests.post(
        f"{base}/token.json", data=endless(), timeout=20, headers={"Content-Type": "application/json"}
    )
    assert reply.status_code == 413 and "too large" in reply.json()["error"], reply.text


@pytest.fixture
def oauth_server(serve_function, keypair, monkeypatch):
    """The token function over HTTP, a keypair, and the flag requests-oauthlib needs for http://."""
    monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")  # authlib accepts loopback http by itself
    return serve_function("token") + "/token.json", keypair


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
def test_authlib_client_credentials(oauth_server, method):
    url, pair = oauth_server
    client = AuthlibSession(pair.public_key, pair.secret_key, token_endpoint_auth_method=method)
    token = client.fetch_token(url, grant_type="client_credentials")
    assert token["token_type"] == "Bearer" and token["expires_in"] == 3600
    session = client.get(url.replace("token.json", "session.json"), timeout=10)  # sends the bearer token
    assert session.status_code == 200 and session.json()["public_key"] == pair.public_key

    wrong = AuthlibSession(pair.public_key, "sk_" + "w" * 43, token_endpoint_auth_method=method)
    with pytest.raises(OAuthError) as err:
        wrong.fetch_token(url, grant_type="client_credentials")
    assert err.value.error == "invalid_client" and err.value.description


@pytest.mark.parametrize("in_body", [False, True], ids=["basic", "body"])
def test_requests_oauthlib_client_credentials(oauth_server, in_body):
    url, pair = oauth_server
    client = OAuth2Session(client=BackendApplicationClient(client_id=pair.public_key))
    token = client.fetch_token(url, client_id=pair.public_key, client_secret=pair.secret_key, include_client_id=in_body)
    assert token["token_type"] == "Bearer" and token["expires_in"] == 3600
    session = client.get(url.replace("token.json", "session.json"), timeout=10)
    assert session.status_code == 200 and session.json()["public_key"] == pair.public_key

    with pytest.raises(InvalidClientError) as err:
        OAuth2Session(client=BackendApplicationClient(client_id=pair.public_key)).fetch_token(
            url, client_id=pair.public_key, client_secret="sk_" + "w" * 43, include_client_id=in_body
        )
    assert err.value.status_code == 401 and "invalid client_id" in err.value.description


def test_oauth_clients_asking_for_a_scope_get_exactly_it(oauth_server, auth):
    """Both libraries, asking for some of the key's models: requests-oauthlib raises when the
    scope granted differs from the one asked for (the default, OAUTHLIB_RELAX_TOKEN_SCOPE unset),
    so the token must carry exactly that scope, and it may call nothing else."""
    url, _ = oauth_server
    pair = auth.create_key(["arrows", "shapes"])
    base = url.removesuffix("token.json")
    oauthlib_client = OAuth2Session(client=BackendApplicationClient(client_id=pair.public_key, scope=["shapes"]))
    token = oauthlib_client.fetch_token(url, client_id=pair.public_key, client_secret=pair.secret_key)
    assert token["scope"] == ["shapes"]
    assert oauthlib_client.get(base + "session.json", timeout=10).json()["scopes"] == ["shapes"]
    every = OAuth2Session(client=BackendApplicationClient(client_id=pair.public_key, scope=["*"]))  # the key's own
    assert every.fetch_token(url, client_id=pair.public_key, client_secret=pair.secret_key)["scope"] == ["*"]
    assert every.get(base + "session.json", timeout=10).json()["scopes"] == ["arrows", "shapes"]
    authlib_client = AuthlibSession(pair.public_key, pair.secret_key, scope="arrows")
    assert authlib_client.fetch_token(url, grant_type="client_credentials")["scope"] == "arrows"
    assert authlib_client.get(base + "session.json", timeout=10).json()["scopes"] == ["arrows"]
    beyond = AuthlibSession(pair.public_key, pair.secret_key, scope="digits")
    with pytest.raises(OAuthError) as err:
        beyond.fetch_token(url, grant_type="client_credentials")
    assert err.value.error == "invalid_scope"


def test_oauth_clients_told_to_wait_get_a_code_they_know(serve_function, keypair):
    """A limited address gets RFC 6749's error shape with a code, not a sentence, in ``error``:
    clients match on it (authlib raises OAuthError(error=...)), with 429 and Retry-After kept."""
    url = serve_function("token", AUTH_MAX_FAILURES="2") + "/token.json"
    for _ in range(2):
        with pytest.raises(OAuthError) as err:
            AuthlibSession(keypair.public_key, "sk_" + "w" * 43).fetch_token(url, grant_type="client_credentials")
        assert err.value.error == "invalid_client"
    with pytest.raises(OAuthError) as err:
        AuthlibSession(keypair.public_key, keypair.secret_key).fetch_token(url, grant_type="client_credentials")
    assert err.value.error == "slow_down" and "retry in" in err.value.description
    form = {"grant_type": "client_credentials", "client_id": keypair.public_key, "client_secret": keypair.secret_key}
    reply = requests.post(url, data=form, timeout=10)
    assert reply.status_code == 429 and int(reply.headers["Retry-After"]) > 0
    assert reply.json()["error"] == "slow_down" and reply.headers["Cache-Control"] == "no-store"


def test_curl_style_json_as_form_is_told_the_header(oauth_server):
    url, pair = oauth_server
    body = json.dumps({"public_key": pair.public_key, "secret_key": pair.secret_key})
    reply = requests.post(url, data=body, headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=10)
    assert reply.status_code == 415 and "Content-Type: application/json" in reply.json()["error"]
