"""Pieces of the OpenAPI 3 documents every function serves at ``/openapi.json``.

Each document says what its function accepts and every answer it gives: an operation's own
answers, plus the ones the server gives to any request (:func:`server_answers`), each error with
its exact body (``{"error": message}``, nothing else) and the headers that always come with it
marked ``required``. tests/test_openapi.py checks real answers against the documents, and
tests/test_fuzz.py runs schemathesis, with all its checks, against them.
"""

from __future__ import annotations

import copy
from typing import Any

from shared.http import V2_SERVER

ERROR = {"$ref": "#/components/schemas/Error"}


def header(description: str, kind: str = "integer", required: bool = False) -> dict[str, Any]:
    """A response header; ``required`` when every such answer carries it."""
    return {"description": description, "schema": {"type": kind}, **({"required": True} if required else {})}


def error(description: str, example: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    """An error response: ``{"error": ...}`` with an example message (and ``headers``)."""
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": ERROR, "example": {"error": example}}},
    }
    if headers:
        response["headers"] = headers
    return response


def retry_error(description: str, example: str) -> dict[str, Any]:
    """An error response that always carries a Retry-After header (429, 503)."""
    return error(description, example, {"Retry-After": header("seconds to wait", required=True)})


UNAUTHORIZED = error(
    "Missing, invalid or expired bearer token, or its key revoked or expired",
    "invalid or expired token",
    {
        "WWW-Authenticate": header(
            'Bearer realm="thalamus", and error="invalid_token" when a token was sent (RFC 6750 §3.1)', "string", True
        )
    },
)


def insufficient_scope(model: str) -> dict[str, Any]:
    """The 403 of a valid token whose scopes exclude ``model``."""
    challenge = header('Bearer realm="thalamus", error="insufficient_scope" (RFC 6750 §3.1)', "string", True)
    return error(
        "The token's scopes exclude this model",
        f"this token may not call model {model}",
        {"WWW-Authenticate": challenge},
    )


METHOD_NOT_ALLOWED = error(
    "Wrong method for this path", "method not allowed; use POST", {"Allow": header("the methods", "string", True)}
)
REDIS_DOWN = retry_error("Redis unreachable, full, or refusing for its own state", "Redis unreachable; retry shortly")
# Routes that decode images also answer 503 when the process's decode budget stays taken.
BUSY = retry_error(
    "Redis unreachable, or the process's image-decode memory budget taken by other large images for "
    "longer than a request may wait",
    "busy decoding other large images; retry shortly",
)
# Every authenticated answer of a key with a rate (./keys.py --rate) carries these.
RATE_HEADERS = {
    name: header(text)
    for name, text in (
        ("RateLimit-Limit", "requests the key may make per window (keys with a rate only)"),
        ("RateLimit-Remaining", "requests left in the current window"),
        ("RateLimit-Reset", "seconds until the window ends"),
    )
}
RATE_LIMITED = retry_error(
    "The key's request rate is used up", "this key's rate limit (600 requests) is used up; retry in 12 s"
)
RATE_LIMITED["headers"].update({name: {**value, "required": True} for name, value in RATE_HEADERS.items()})


def server_answers(max_body: int) -> dict[str, Any]:
    """The errors the server gives to any request, whatever its operation (shared/worker.py and
    shared/http.py): a malformed request, a head or body that does not arrive in time, a body
    over ``max_body`` bytes, a request line or headers over gunicorn's limits."""
    return {
        "400": error("Malformed HTTP request (request line, headers or body framing)", "malformed request"),
        "408": error(
            "The request head or body did not arrive within REQUEST_HEADER_TIMEOUT / REQUEST_BODY_TIMEOUT",
            "request body not received in time",
        ),
        "413": error(f"Body over {max_body} bytes", f"request body too large (limit {max_body} bytes)"),
        "414": error("Request line too long (over gunicorn's limit_request_line)", "request line too long"),
        "431": error("Request headers too many or too large", "request headers too large"),
    }


def _server_get(
    summary: str,
    example: dict[str, Any],
    properties: dict[str, Any],
    errors: dict[str, Any],
    tag: str = "Open Inference Protocol (V2)",
) -> dict[str, Any]:
    schema = {"type": "object", "required": list(properties), "properties": properties}
    return {
        "get": {
            "summary": summary,
            "tags": [tag],
            "security": [],
            "responses": {
                "200": {"description": "OK", "content": {"application/json": {"schema": schema, "example": example}}},
                **errors,
            },
        }
    }


# The inference protocols' server endpoints, which every function answers (shared.http).
SERVER_PATHS = {
    "/": _server_get(
        "KServe V1 liveness: the process is up (a browser asking the gateway for / gets the docs page)",
        {"status": "alive"},
        {"status": {"type": "string", "enum": ["alive"]}},
        {},
        "KServe / TF Serving V1",
    ),
    "/v2": _server_get(
        "V2 server metadata: name, version, the protocol extensions implemented",
        V2_SERVER,
        {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "extensions": {"type": "array", "items": {"type": "string"}},
        },
        {},
    ),
    "/v2/health/live": _server_get("V2 liveness: the process is up", {"live": True}, {"live": {"type": "boolean"}}, {}),
    "/v2/health/ready": _server_get(
        "V2 readiness: this function can serve (server up, model loaded; as /readyz, not Redis)",
        {"ready": True},
        {"ready": {"type": "boolean"}},
        {},
    ),
}


def document(
    title: str, description: str, paths: dict[str, Any], schemas: dict[str, Any], max_body: int
) -> dict[str, Any]:
    """A complete OpenAPI 3.0 document: the function's ``paths`` plus health paths, the server's
    own answers (:func:`server_answers`, bodies up to ``max_body`` bytes) on every operation,
    the rate headers on the successful answers of authenticated operations, the shared Error
    schema and the Bearer and OAuth2 client-credentials security schemes."""
    health = {
        "/healthz": {
            "get": {
                "summary": "Liveness: the process is up",
                "tags": ["health"],
                "security": [],
                "responses": {
                    "200": {
                        "description": "alive",
                        "content": {
                            "application/json": {
                                "schema": {"type": "object", "properties": {"status": {"type": "string"}}},
                                "example": {"status": "ok"},
                            }
                        },
                    }
                },
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: this process can serve (server up, model loaded)",
                "description": "Does not check Redis: a Redis outage is answered by each route "
                "with 503 and Retry-After, so the platform keeps routing to the function.",
                "tags": ["health"],
                "security": [],
                "responses": {
                    "200": {
                        "description": "ready",
                        "content": {
                            "application/json": {
                                "schema": {"type": "object", "properties": {"status": {"type": "string"}}},
                                "example": {"status": "ready"},
                            }
                        },
                    },
                },
            }
        },
        **SERVER_PATHS,
    }
    every = copy.deepcopy({**paths, **health})  # the shared pieces above stay as they are
    for item in every.values():
        for operation in item.values():
            responses = operation["responses"]
            for status, answer in {**server_answers(max_body), "405": METHOD_NOT_ALLOWED}.items():
                responses.setdefault(status, answer)
            if "security" not in operation:  # the document's: a bearer token
                for status, answer in responses.items():
                    if status.startswith("2"):
                        answer["headers"] = {**RATE_HEADERS, **answer.get("headers", {})}
    return {
        "openapi": "3.0.3",
        "info": {"title": title, "version": "1.0.0", "description": description},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {"oauth2": []}],
        "paths": every,
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "additionalProperties": False,
                    "properties": {"error": {"type": "string", "description": "what went wrong"}},
                },
                **schemas,
            },
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "A token from POST /token.json"},
                "oauth2": {
                    "type": "oauth2",
                    "description": "client_id = public key, client_secret = secret key",
                    "flows": {"clientCredentials": {"tokenUrl": "/token.json", "scopes": {}}},
                },
            },
        },
    }
