"""The token function: trades a keypair for a bearer token and describes a token's session."""

from __future__ import annotations

import base64
import binascii
from typing import Any
from urllib.parse import unquote

import flask

from functions.token import catalog, spec
from shared.auth import AuthStore
from shared.config import Settings
from shared.errors import BadRequest, UnsupportedMediaType
from shared.http import Call, Route, Service, client_address, read_json
from shared.worker import DeadlineWorker


def create_service(settings: Settings, auth: AuthStore | None = None) -> Service:
    """The token function's service for ``settings`` (``auth`` defaults to their Redis)."""
    auth = auth or AuthStore(settings)
    models = catalog.Catalog(settings.model_catalog)

    def issue_token(call: Call) -> dict[str, Any]:
        """JSON keypair → {token, ttl}; OAuth2 client credentials → RFC 6749 token response."""
        request = call.request
        basic = _basic_credentials(request)
        addr = client_address(request, settings.trusted_proxies)
        if request.mimetype == "application/x-www-form-urlencoded" or basic:
            form = request.form
            if form.get("grant_type") != "client_credentials":
                raise BadRequest("unsupported grant_type; use grant_type=client_credentials")
            public_key, secret_key = basic or (_string_field(form, "client_id"), _string_field(form, "client_secret"))
            issued = auth.issue_token(public_key, secret_key, addr)
            return {"access_token": issued.token, "token_type": "Bearer", "expires_in": issued.ttl}
        if request.mimetype != "application/json":
            raise UnsupportedMediaType(
                "Content-Type must be application/json (keypair) or "
                "application/x-www-form-urlencoded (OAuth2 client credentials)"
            )
        body = read_json(request)
        issued = auth.issue_token(_string_field(body, "public_key"), _string_field(body, "secret_key"), addr)
        return {"token": issued.token, "ttl": issued.ttl, "token_type": "Bearer", "scopes": issued.session.scopes}

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
            Route("/token.json", ("POST",), issue_token),
            Route("/session.json", ("GET",), session, auth=True),
            Route("/models.json", ("GET",), models.models_json, auth=True),
            Route("/v1/models", ("GET",), models.kserve_list, auth=True),
        ],
        openapi=spec.document(settings),
        auth=auth,
        function="token",
        # A keypair or an OAuth2 form is well under 1 KB. Bodies up to this size are read by the
        # server before dispatch (shared/worker.py), so a slow client never holds a thread here.
        max_body=DeadlineWorker.preread_body,
    )


def _basic_credentials(request: flask.Request) -> tuple[str, str] | None:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise BadRequest("malformed HTTP Basic credentials") from None
    if not sep:
        raise BadRequest("malformed HTTP Basic credentials")
    # RFC 6749 2.3.1: client_id and client_secret are form-urlencoded inside Basic.
    return unquote(user), unquote(password)


def _string_field(body: Any, name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"field {name!r} is required and must be a string")
    return value
