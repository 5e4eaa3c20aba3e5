"""Token function: trades a keypair for a bearer token and describes a token's session."""

import base64
import binascii
from urllib.parse import unquote

import flask
import functions_framework
import token_spec

from shared import config, store
from shared.auth import AuthStore
from shared.errors import BadRequest, UnsupportedMediaType
from shared.http import Route, Service, bearer_token, client_address, read_json

settings = config.load()
auth = AuthStore(settings, store.connect(settings))


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


def _string_field(body: dict, name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"field {name!r} is required and must be a string")
    return value


def issue_token(request: flask.Request) -> dict:
    """JSON keypair → {token, ttl}; OAuth2 client credentials → RFC 6749 token response."""
    basic = _basic_credentials(request)
    addr = client_address(request, settings.trusted_proxies)
    if request.mimetype == "application/x-www-form-urlencoded" or basic:
        form = request.form
        if form.get("grant_type") != "client_credentials":
            raise BadRequest("unsupported grant_type; use grant_type=client_credentials")
        public_key, secret_key = basic or (
            _string_field(form, "client_id"), _string_field(form, "client_secret"))
        issued = auth.issue_token(public_key, secret_key, addr)
        return {"access_token": issued.token, "token_type": "Bearer", "expires_in": issued.ttl}
    if request.mimetype != "application/json":
        raise UnsupportedMediaType(
            "Content-Type must be application/json (keypair) or "
            "application/x-www-form-urlencoded (OAuth2 client credentials)")
    body = read_json(request)
    issued = auth.issue_token(_string_field(body, "public_key"), _string_field(body, "secret_key"), addr)
    return {"token": issued.token, "ttl": issued.ttl, "token_type": "Bearer",
            "scopes": issued.session.scopes}


def session(request: flask.Request) -> dict:
    """The public key, scopes and remaining lifetime of the caller's token."""
    current = auth.verify_token(bearer_token(request))
    return {"public_key": current.public_key, "scopes": current.scopes,
            "expires_in": current.expires_in}


service = Service(
    settings,
    [
        Route("/token.json", ("POST",), issue_token),
        Route("/session.json", ("GET",), session),
    ],
    ready=auth.ping,
    openapi=token_spec.document(settings),
)


@functions_framework.http
def handle(request: flask.Request) -> flask.Response:
    """functions-framework entry point."""
    return service(request)
