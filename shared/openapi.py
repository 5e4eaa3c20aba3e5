"""Pieces of the OpenAPI 3 documents every function serves at ``/openapi.json``."""

from __future__ import annotations

from typing import Any

ERROR = {"$ref": "#/components/schemas/Error"}


def error(description: str, example: str) -> dict[str, Any]:
    """An error response: ``{"error": ...}`` with an example message."""
    return {
        "description": description,
        "content": {"application/json": {"schema": ERROR, "example": {"error": example}}},
    }


def retry_error(description: str, example: str) -> dict[str, Any]:
    """An error response that carries a Retry-After header (429, 503)."""
    response = error(description, example)
    response["headers"] = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
    return response


UNAUTHORIZED = error("Missing, invalid or expired bearer token", "invalid or expired token")
NOT_FOUND = error("Unknown path or model", "no such path: /nope")
METHOD_NOT_ALLOWED = error("Wrong method for this path", "method not allowed; use POST")
REDIS_DOWN = retry_error("Redis unreachable", "Redis unreachable at redis://127.0.0.1:6379/0")
# Every authenticated answer of a key with a rate (./keys.py --rate) carries these.
RATE_HEADERS = {
    name: {"description": text, "schema": {"type": "integer"}}
    for name, text in (
        ("RateLimit-Limit", "requests the key may make per window (keys with a rate only)"),
        ("RateLimit-Remaining", "requests left in the current window"),
        ("RateLimit-Reset", "seconds until the window ends"),
    )
}
RATE_LIMITED = retry_error(
    "The key's request rate is used up", "this key's rate limit (600 requests) is used up; retry in 12 s"
)
RATE_LIMITED["headers"].update(RATE_HEADERS)


def _v2_get(
    summary: str, example: dict[str, Any], properties: dict[str, Any], errors: dict[str, Any]
) -> dict[str, Any]:
    schema = {"type": "object", "required": list(properties), "properties": properties}
    return {
        "get": {
            "summary": summary,
            "tags": ["Open Inference Protocol (V2)"],
            "security": [],
            "responses": {
                "200": {"description": "OK", "content": {"application/json": {"schema": schema, "example": example}}},
                **errors,
            },
        }
    }


# The Open Inference Protocol's server endpoints, which every function answers (shared.http).
V2_SERVER_PATHS = {
    "/v2": _v2_get(
        "V2 server metadata: name, version, the protocol extensions implemented",
        {
            "name": "thalamus",
            "version": "0.1.0",
            "extensions": ["binary_tensor_data", "classification", "model_configuration"],
        },
        {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "extensions": {"type": "array", "items": {"type": "string"}},
        },
        {},
    ),
    "/v2/health/live": _v2_get("V2 liveness: the process is up", {"live": True}, {"live": {"type": "boolean"}}, {}),
    "/v2/health/ready": _v2_get(
        "V2 readiness: this function can serve (server up, model loaded; as /readyz, not Redis)",
        {"ready": True},
        {"ready": {"type": "boolean"}},
        {},
    ),
}


def document(title: str, description: str, paths: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any]:
    """A complete OpenAPI 3.0 document: the function's ``paths`` plus health and docs paths,
    the shared Error schema and the Bearer and OAuth2 client-credentials security schemes."""
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
        **V2_SERVER_PATHS,
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": title, "version": "1.0.0", "description": description},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {"oauth2": []}],
        "paths": {**paths, **health},
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
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
