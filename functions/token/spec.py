"""OpenAPI document of the token function."""

from typing import Any

from functions.token import catalog
from shared import openapi
from shared.config import Settings

PK = "pk_" + "A" * 43
SK = "sk_" + "B" * 43
TOKEN = "Jq3v" + "x" * 39


def document(settings: Settings) -> dict[str, Any]:
    """The token function's OpenAPI 3 document."""
    bad_request = openapi.error(
        "Malformed body, fields or grant type", "field 'secret_key' is required and must be a string"
    )
    token_post = {
        "summary": "Trade a keypair for a bearer token",
        "description": (
            "JSON `{public_key, secret_key}` answers `{token, ttl}`. The OAuth2 "
            "client-credentials grant (form body, credentials in the body or HTTP Basic) "
            "answers in RFC 6749 form. Wrong, unknown and revoked keys get the same 401; "
            f"more than {settings.auth_max_failures} failures in {settings.auth_failure_window} s "
            "for one key or one address get 429."
        ),
        "tags": ["auth"],
        "security": [{}, {"basic": []}],
        "requestBody": {
            "required": True,
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
            "401": openapi.error("Wrong, unknown or revoked keypair", "invalid public_key or secret_key"),
            "405": openapi.METHOD_NOT_ALLOWED,
            "413": openapi.error("Body too large", "request body too large (limit 16384 bytes)"),
            "415": openapi.error("Neither JSON nor a form", "send Content-Type: application/json"),
            "429": openapi.retry_error("Too many failed attempts", "too many failed attempts; retry in 42 s"),
            "503": openapi.REDIS_DOWN,
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
            "503": openapi.REDIS_DOWN,
        },
    }
    key = {"type": "string", "minLength": 46, "maxLength": 46}
    scopes = {
        "type": "array",
        "items": {"type": "string"},
        "nullable": True,
        "description": "models this key may call; null = all",
    }
    schemas = {
        "KeypairRequest": {
            "type": "object",
            "required": ["public_key", "secret_key"],
            "properties": {"public_key": {**key, "pattern": "^pk_"}, "secret_key": {**key, "pattern": "^sk_"}},
        },
        "ClientCredentialsRequest": {
            "type": "object",
            "required": ["grant_type"],
            "properties": {
                "grant_type": {"type": "string", "enum": ["client_credentials"]},
                "client_id": key,
                "client_secret": key,
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
    )
    doc["components"]["securitySchemes"]["basic"] = {
        "type": "http",
        "scheme": "basic",
        "description": "client_id:client_secret (OAuth2)",
    }
    return doc
