"""The token function: trades a keypair for a bearer token and describes a token's session.

Two ways in: a JSON keypair (errors ``{"error": message}``, like every Thalamus answer), and the
OAuth2 client-credentials grant (a form body, credentials in it or in HTTP Basic), whose errors
take RFC 6749 §5.2's form, ``{"error": code, "error_description": message}``, because OAuth2
client libraries read ``error`` as a code.
"""

from __future__ import annotations

import base64
import functools
from typing import Any
from urllib.parse import unquote

import flask

from functions.token import catalog, spec
from shared import metrics
from shared.access import client_address, exchange_of
from shared.auth import AuthStore, IssuedToken
from shared.config import Settings
from shared.credentials import PUBLIC_KEY_RE
from shared.errors import (
    BadRequest,
    InvalidCredentials,
    InvalidScope,
    ServiceUnavailable,
    ThalamusError,
    TooManyRequests,
    UnsupportedMediaType,
)
from shared.http import Call, Route, Service, json_response, read_json
from shared.worker import DeadlineWorker

# RFC 6749 §5.1: token answers must not be cached.
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
# thalamus_tokens_total's outcome of an answer's status; any other 4xx is a bad request.
TOKEN_OUTCOMES = {200: "issued", 401: "invalid", 429: "limited", 500: "error", 503: "unavailable"}


class OAuthError(Exception):
    """An RFC 6749 §5.2 error: ``code`` is what OAuth2 clients match on."""

    def __init__(self, code: str, description: str, status: int = 400, headers: dict[str, str] | None = None) -> None:
        super().__init__(description)
        self.code, self.description, self.status, self.headers = code, description, status, headers or {}

    @classmethod
    def busy(cls, error: TooManyRequests | ServiceUnavailable) -> OAuthError:
        """A refusal that §5.2 has no code for, in words OAuth2 clients know, its status and
        Retry-After kept: ``slow_down`` (RFC 8628's, for a client asked to wait) for 429, and
        ``temporarily_unavailable`` (RFC 6749 §4.1.2.1's) for 503."""
        code = "slow_down" if isinstance(error, TooManyRequests) else "temporarily_unavailable"
        return cls(code, error.message, error.status, error.headers)


def create_service(settings: Settings, auth: AuthStore | None = None) -> Service:
    """The token function's service for ``settings`` (``auth`` defaults to their Redis)."""
    # The token cache answers GET /session.json and the model lists without a Redis round trip
    # (0.37 ms of a 0.99 ms request, in-process), as the predict functions answer theirs; only
    # for tokens checked again, since keeping one costs a round trip of its own.
    auth = auth or AuthStore(settings, token_cache=True, cache_on_repeat=True)
    models = catalog.Catalog(settings.model_catalog)

    def issue(call: Call, public_key: str, secret_key: str, scopes: list[str] | None) -> IssuedToken:
        """``auth.issue_token`` for the caller, noted for the access line."""
        exchange_of(call.request.environ).public_key = public_key if PUBLIC_KEY_RE.fullmatch(public_key) else None
        address = client_address(call.request.environ, settings.trusted_proxies)
        # With a catalog, a scope naming a model that is not deployed is refused (a typo, say).
        deployed = {model["name"] for model in models.models()} if settings.model_catalog else None
        return auth.issue_token(public_key, secret_key, address, scopes, deployed)

    def counted(call: Call) -> flask.Response:
        """``POST /token.json``, every answer counted by its outcome (JSON and OAuth2 alike)."""
        try:
            response = issue_token(call)
        except ThalamusError as error:
            metrics.TOKENS.labels(TOKEN_OUTCOMES.get(error.status, "bad_request")).inc()
            raise
        metrics.TOKENS.labels(TOKEN_OUTCOMES.get(response.status_code, "bad_request")).inc()
        return response

    def issue_token(call: Call) -> flask.Response:
        """JSON keypair → {token, ttl}; OAuth2 client credentials → RFC 6749 token response."""
        request = call.request
        if request.headers.get("Content-Encoding", "identity").strip().lower() != "identity":
            # A keypair is a few hundred bytes: nothing here inflates a body, so none is taken coded.
            raise UnsupportedMediaType("send the credentials without Content-Encoding")
        form = request.mimetype == "application/x-www-form-urlencoded"
        if request.mimetype != "application/json" and request.get_data(cache=True).lstrip().startswith(b"{"):
            # A JSON keypair labelled otherwise: a form by `curl -d @client.json`, text/plain by
            # fetch() with a string body. Told to set the header, not about grant types.
            said = "says form" if form else f"says {request.mimetype}" if request.mimetype else "is missing"
            raise UnsupportedMediaType(
                f"the body is JSON but Content-Type {said}: send it with Content-Type: application/json "
                "(curl: -H 'Content-Type: application/json')"
            )
        if form or _scheme(request) == "basic":
            basic = _scheme(request) == "basic"
            try:
                public_key, secret_key = _client_credentials(request)
                asked = _asked_scope(request.form.get("scope"))
                issued = issue(call, public_key, secret_key, asked)
            except OAuthError as error:
                return _oauth_error(error, basic)
            except InvalidScope as error:
                return _oauth_error(OAuthError("invalid_scope", error.message), basic)
            except (BadRequest, InvalidCredentials):  # a malformed client_id is an unknown client
                return _oauth_error(OAuthError("invalid_client", "invalid client_id or client_secret", 401), basic)
            except (TooManyRequests, ServiceUnavailable) as error:
                exchange_of(request.environ).error = error.detail
                return _oauth_error(OAuthError.busy(error), basic)
            body = {"access_token": issued.token, "token_type": "Bearer", "expires_in": issued.ttl}
            # RFC 6749 5.1: the scope granted, space-separated, so that a client gets the one it
            # asked for: "*" for "*" (the key's own, whatever they are: /session.json lists them),
            # else the models asked for, else the key's when it has some (an empty scope is none).
            if asked is None and "*" in (request.form.get("scope") or "").split(" "):
                body["scope"] = "*"
            elif issued.session.scopes is not None:  # the models asked for, or the key's
                body["scope"] = " ".join(issued.session.scopes)
            return json_response(body)
        if request.mimetype != "application/json":
            raise UnsupportedMediaType(
                "Content-Type must be application/json (keypair) or "
                "application/x-www-form-urlencoded (OAuth2 client credentials)"
            )
        body = read_json(request)
        keypair = _string_field(body, "public_key"), _string_field(body, "secret_key")
        issued = issue(call, *keypair, _scopes_field(body))
        return json_response(_keypair_answer(issued))

    def session(call: Call) -> dict[str, Any]:
        """The public key, scopes and remaining lifetime of the caller's token."""
        assert call.session is not None
        return {
            "public_key": call.session.public_key,
            "scopes": call.session.scopes,
            "expires_in": call.session.expires_in,
        }

    return Service(
        settings,
        [
            # RFC 6749's no-store (§5.1) on every answer, refusals included: never cached.
            Route("/token.json", ("POST",), counted, headers=NO_STORE),
            Route("/session.json", ("GET",), session, auth=True),
            Route("/models.json", ("GET",), models.models_json, auth=True),
            Route("/v1/models", ("GET",), models.kserve_list, auth=True),
        ],
        openapi=functools.partial(spec.document, settings),
        auth=auth,
        function="token",
        # A keypair or an OAuth2 form is well under 1 KB. Bodies up to this size are read by the
        # server before dispatch (shared/worker.py), so a slow client never holds a thread here.
        max_body=DeadlineWorker.preread_body,
    )


def _keypair_answer(issued: IssuedToken) -> dict[str, Any]:
    return {"token": issued.token, "ttl": issued.ttl, "token_type": "Bearer", "scopes": issued.session.scopes}


def _oauth_error(error: OAuthError, basic: bool) -> flask.Response:
    # RFC 6749 §5.2: a client that authenticated with Basic gets 401 and a Basic challenge.
    headers = dict(error.headers)
    if error.status == 401 and basic:
        headers["WWW-Authenticate"] = 'Basic realm="thalamus"'
    return json_response({"error": error.code, "error_description": error.description}, error.status, headers)


def _scheme(request: flask.Request) -> str:
    return request.headers.get("Authorization", "").partition(" ")[0].lower()


def _client_credentials(request: flask.Request) -> tuple[str, str]:
    """The client-credentials grant's (client_id, client_secret), or OAuthError."""
    basic = _basic_credentials(request) if _scheme(request) == "basic" else None
    if request.mimetype != "application/x-www-form-urlencoded":
        raise OAuthError("invalid_request", "send the grant as a form: Content-Type: application/x-www-form-urlencoded")
    form = request.form
    repeated = [name for name in ("grant_type", "client_id", "client_secret", "scope") if len(form.getlist(name)) > 1]
    if repeated:  # RFC 6749 3.2: a parameter sent twice is an invalid request, whichever would win
        raise OAuthError("invalid_request", f"parameter {repeated[0]} given more than once")
    grant = form.get("grant_type")
    if not grant:
        raise OAuthError("invalid_request", "grant_type is required; use grant_type=client_credentials")
    if grant != "client_credentials":
        raise OAuthError("unsupported_grant_type", "only grant_type=client_credentials is supported")
    if basic:
        if form.get("client_secret") or form.get("client_id", basic[0]) != basic[0]:
            raise OAuthError("invalid_request", "send the client credentials in HTTP Basic or in the body, not both")
        return basic
    client_id, client_secret = form.get("client_id"), form.get("client_secret")
    if not client_id or not client_secret:
        raise OAuthError(
            "invalid_client", "client authentication required: HTTP Basic, or client_id and client_secret", 401
        )
    return client_id, client_secret


def _basic_credentials(request: flask.Request) -> tuple[str, str]:
    value = request.headers.get("Authorization", "").partition(" ")[2]
    try:
        user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
    except ValueError:  # not base64 (binascii.Error), not ASCII (UnicodeEncodeError), not UTF-8
        sep = ""
    if not sep:
        raise OAuthError("invalid_client", "malformed HTTP Basic credentials", 401)
    # RFC 6749 2.3.1: client_id and client_secret are form-urlencoded inside Basic.
    return unquote(user), unquote(password)


def _asked_scope(text: str | None) -> list[str] | None:
    """The OAuth2 ``scope`` parameter (model names separated by spaces, RFC 6749 3.3; none or
    "*": the key's own)."""
    names = [name for name in (text or "").split(" ") if name]
    if not names or names == ["*"]:
        return None
    if "*" in names:
        raise OAuthError("invalid_scope", "scope '*' (every model the key may call) goes alone")
    return names


def _scopes_field(body: Any) -> list[str] | None:
    """The JSON body's optional ``scopes``: model names, or null for the key's own."""
    value = body.get("scopes")
    if value is not None and not (isinstance(value, list) and all(isinstance(name, str) for name in value)):
        raise InvalidScope("field 'scopes' must be a list of model names, or null for the key's own")
    return value


def _string_field(body: Any, name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"field {name!r} is required and must be a string")
    return value
