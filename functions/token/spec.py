"""OpenAPI document of the token function."""

from typing import Any

from functions.token import catalog
from shared import openapi
from shared.config import Settings
from shared.worker import DeadlineWorker

PK = "pk_" + "A" * 43
SK = "sk_" + "B" * 43
TOKEN = "Jq3v" + "x" * 39
# A key as shared.auth checks it: the prefix and 43 url-safe characters, nothing before or after.
KEY_PATTERN = "^{}_[A-Za-z0-9_-]{{43}}$"


def document(settings: Settings) -> dict[str, Any]:
    """The token function's OpenAPI 3 document."""
    # The token function's Service takes bodies up to the size the server reads before dispatch.
    max_body = min(DeadlineWorker.preread_body, settings.max_upload_bytes)
    no_store = {
        "Cache-Control": openapi.header("no-store (RFC 6749 §5.1)", "string", required=True),
        "Pragma": openapi.header("no-cache", "string", required=True),
    }
    either = {"anyOf": [{"$ref": "#/components/schemas/Error"}, {"$ref": "#/components/schemas/OAuthError"}]}
    bad_request = {
        "description": (
            "JSON keypair: malformed body or fields, or `scopes` naming a model the key may not call "
            "or that is not deployed. OAuth2 form: `invalid_request` (no or malformed grant_type, "
            "credentials in Basic and body), `unsupported_grant_type`, or `invalid_scope` (a `scope` "
            "naming a model the key may not call or that is not deployed)"
        ),
        "content": {
            "application/json": {
                "schema": either,
                "examples": {
                    "json": {"value": {"error": "field 'secret_key' is required and must be a string"}},
                    "oauth2": {
                        "value": {
                            "error": "unsupported_grant_type",
                            "error_description": "only grant_type=client_credentials is supported",
                        }
                    },
                },
            }
        },
    }
    unauthorized = {
        "description": (
            "Wrong, unknown, revoked or expired keypair: one identical answer for all. OAuth2 form: "
            "`invalid_client`, with `WWW-Authenticate: Basic` when the credentials came in HTTP Basic"
        ),
        "headers": {
            "WWW-Authenticate": {
                "description": 'Basic realm="thalamus" (HTTP Basic only)',
                "schema": {"type": "string"},
            }
        },
        "content": {
            "application/json": {
                "schema": either,
                "examples": {
                    "json": {"value": {"error": "invalid public_key or secret_key"}},
                    "oauth2": {
                        "value": {"error": "invalid_client", "error_description": "invalid client_id or client_secret"}
                    },
                },
            }
        },
    }

    def wait(description: str, message: str, code: str) -> dict[str, Any]:
        """A refusal with Retry-After, in the JSON path's shape or RFC 6749's."""
        examples = {
            "json": {"value": {"error": message}},
            "oauth2": {"value": {"error": code, "error_description": message}},
        }
        response = openapi.retry_error(description, message)
        response["content"] = {"application/json": {"schema": either, "examples": examples}}
        return response

    token_post = {
        "summary": "Trade a keypair for a bearer token",
        "description": (
            "JSON `{public_key, secret_key}` answers `{token, ttl}`; errors are `{error: message}`. "
            "A token may call the models its key may call, or fewer: those named in `scopes` (JSON) or "
            "`scope` (OAuth2, space-separated). "
            "The OAuth2 client-credentials grant (form body, credentials in the body or HTTP Basic) "
            "answers in RFC 6749 form, and its 400/401 errors are RFC 6749 §5.2 codes "
            "(`{error, error_description}`). Wrong, unknown, revoked and expired keys get the same "
            "401. A token lives `TOKEN_TTL` seconds, or until its key expires if that is sooner. "
            f"A client address with more than {settings.auth_max_failures} failures in "
            f"{settings.auth_failure_window} s gets 429, and so does an address that failed on a key "
            "that many others failed on; the key's owner keeps getting tokens."
        ),
        "tags": ["auth"],
        "security": [{}, {"basic": []}],
        "requestBody": {
            "required": True,
            "description": f"At most {max_body} bytes.",
            "content": {
                "application/json": {
                    "schema": {"$ref": "#/components/schemas/KeypairRequest"},
                    "example": {"public_key": PK, "secret_key": SK},
                },
                "application/x-www-form-urlencoded": {
                    "schema": {"$ref": "#/components/schemas/ClientCredentialsRequest"},
                    "example": {"grant_type": "client_credentials", "client_id": PK, "client_secret": SK},
                },
            },
        },
        "responses": {
            "200": {
                "description": "A bearer token",
                "headers": no_store,
                "content": {
                    "application/json": {
                        "schema": {
                            "oneOf": [
                                {"$ref": "#/components/schemas/TokenResponse"},
                                {"$ref": "#/components/schemas/OAuthTokenResponse"},
                            ]
                        },
                        "examples": {
                            "json": {
                                "value": {
                                    "token": TOKEN,
                                    "ttl": settings.token_ttl,
                                    "token_type": "Bearer",
                                    "scopes": None,
                                }
                            },
                            "oauth2": {
                                "value": {
                                    "access_token": TOKEN,
                                    "token_type": "Bearer",
                                    "expires_in": settings.token_ttl,
                                }
                            },
                        },
                    }
                },
            },
            "400": bad_request,
            "401": unauthorized,
            "405": openapi.METHOD_NOT_ALLOWED,
            "415": openapi.error(
                "Neither JSON nor a form, a JSON body sent with another Content-Type (or none), or a body with "
                "a Content-Encoding",
                "the body is JSON but Content-Type says form: send it with Content-Type: application/json",
            ),
            "429": wait(
                "Too many failed attempts. OAuth2 form: `slow_down`",
                "too many failed attempts; retry in 42 s",
                "slow_down",
            ),
            "503": wait(
                "Redis unreachable, full, or refusing for its own state. OAuth2 form: `temporarily_unavailable`",
                "Redis unreachable; retry shortly",
                "temporarily_unavailable",
            ),
        },
    }
    session_get = {
        "summary": "Describe the caller's token",
        "tags": ["auth"],
        "responses": {
            "200": {
                "description": "The token's key, scopes and remaining lifetime",
                "content": {
                    "application/json": {
                        "schema": {"$ref": "#/components/schemas/Session"},
                        "example": {"public_key": PK, "scopes": ["shapes"], "expires_in": 3542},
                    }
                },
            },
            "401": openapi.UNAUTHORIZED,
            "405": openapi.METHOD_NOT_ALLOWED,
            "429": openapi.RATE_LIMITED,
            "503": openapi.REDIS_DOWN,
        },
    }
    public_key = {"type": "string", "pattern": KEY_PATTERN.format("pk"), "example": PK}
    secret_key = {"type": "string", "pattern": KEY_PATTERN.format("sk"), "example": SK}
    scopes = {
        "type": "array",
        "items": {"type": "string"},
        "nullable": True,
        "description": "models this token may call; null = all",
    }
    asked = {
        **scopes,
        "description": "models the token may call, some of those its key may call; null or absent = the key's",
        "example": ["shapes"],
    }
    schemas = {
        "KeypairRequest": {
            "type": "object",
            "required": ["public_key", "secret_key"],
            "properties": {"public_key": public_key, "secret_key": secret_key, "scopes": asked},
        },
        "ClientCredentialsRequest": {
            "type": "object",
            "required": ["grant_type"],
            "properties": {
                "grant_type": {"type": "string", "enum": ["client_credentials"]},
                "client_id": public_key,
                "client_secret": secret_key,
                "scope": {
                    "type": "string",
                    "description": "models the token may call, space-separated, some of those its key may call; "
                    "absent or * = the key's",
                },
            },
        },
        "TokenResponse": {
            "type": "object",
            "required": ["token", "ttl"],
            "properties": {
                "token": {"type": "string"},
                "ttl": {"type": "integer"},
                "token_type": {"type": "string"},
                "scopes": scopes,
            },
        },
        "OAuthTokenResponse": {
            "type": "object",
            "required": ["access_token", "token_type", "expires_in"],
            "properties": {
                "access_token": {"type": "string"},
                "token_type": {"type": "string", "enum": ["Bearer"]},
                "expires_in": {"type": "integer"},
                "scope": {
                    "type": "string",
                    "description": "The models the token may call, space-separated, or * (asked for: the key's own, "
                    "which /session.json lists). Given when the token is limited to some models or the request "
                    "named a scope (RFC 6749 5.1).",
                },
            },
        },
        "OAuthError": {
            "type": "object",
            "description": (
                "RFC 6749 §5.2 error (OAuth2 client-credentials requests); a refusal §5.2 has no code for "
                "(429, 503) uses RFC 8628's slow_down and RFC 6749 §4.1.2.1's temporarily_unavailable"
            ),
            "required": ["error", "error_description"],
            "additionalProperties": False,
            "properties": {
                "error": {
                    "type": "string",
                    "enum": [
                        "invalid_request",
                        "invalid_client",
                        "invalid_scope",
                        "unsupported_grant_type",
                        "slow_down",
                        "temporarily_unavailable",
                    ],
                },
                "error_description": {"type": "string"},
            },
        },
        "Session": {
            "type": "object",
            "required": ["public_key", "scopes", "expires_in"],
            "properties": {"public_key": {"type": "string"}, "scopes": scopes, "expires_in": {"type": "integer"}},
        },
    }
    doc = openapi.document(
        "Thalamus token function",
        "Issue bearer tokens for API keys. Keys come from `./keys.py -g FILE`.",
        {"/token.json": {"post": token_post}, "/session.json": {"get": session_get}, **catalog.paths()},
        {**schemas, **catalog.SCHEMAS},
        max_body,
    )
    doc["components"]["securitySchemes"]["basic"] = {
        "type": "http",
        "scheme": "basic",
        "description": "client_id:client_secret (OAuth2)",
    }
    return doc
