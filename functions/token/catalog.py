"""The models a key may call: ``GET /models.json`` and KServe's ``GET /v1/models``.

The list lives with the token function, which is always deployed, so it answers while the
predict functions are scaled to zero: ``MODEL_CATALOG`` names a JSON file (its format:
:mod:`shared.modelcatalog`), read at start (a broken one stops the function) and again whenever
it changes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from shared import openapi
from shared.http import Call
from shared.modelcatalog import FIELDS, CatalogError, read

log = logging.getLogger("thalamus")


class Catalog:
    """The deployed models, from the file ``path`` (None: no models are listed)."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._stamp: tuple[int, int] | None = None
        self._models: list[dict[str, Any]] = []
        if path is not None:
            self._stamp = self._stat()
            self._models = read(path)

    def _stat(self) -> tuple[int, int] | None:
        assert self._path is not None
        try:
            info = os.stat(self._path)
        except OSError:
            return None
        return info.st_mtime_ns, info.st_size

    def models(self) -> list[dict[str, Any]]:
        """Every model, re-read when the file changed (a ConfigMap update swaps it in place);
        a broken update is logged and the last good list kept."""
        if self._path is not None and (stamp := self._stat()) != self._stamp:
            self._stamp = stamp
            try:
                self._models = read(self._path)
            except CatalogError as exc:
                log.warning("keeping the previous model catalog: %s", exc)
        return self._models

    def allowed(self, call: Call) -> list[dict[str, Any]]:
        """The models the caller's key may call."""
        assert call.session is not None
        return [model for model in self.models() if call.session.allows(model["name"])]

    def models_json(self, call: Call) -> dict[str, Any]:
        """``GET /models.json``: name, version, labels and input size of each model the key may call."""
        return {"models": self.allowed(call)}

    def kserve_list(self, call: Call) -> dict[str, Any]:
        """``GET /v1/models``: KServe's list, the names of the models the key may call."""
        return {"models": [model["name"] for model in self.allowed(call)]}


def paths() -> dict[str, Any]:
    """The catalog's operations for the token function's OpenAPI document."""
    common = {
        "401": openapi.UNAUTHORIZED,
        "405": openapi.METHOD_NOT_ALLOWED,
        "429": openapi.RATE_LIMITED,
        "503": openapi.REDIS_DOWN,
    }
    example = {
        "name": "shapes",
        "version": "20261126111257",
        "labels": ["circle", "square", "triangle"],
        "input": {"height": 64, "width": 64, "channels": 3, "dtype": "float32"},
    }
    return {
        "/models.json": {
            "get": {
                "summary": "The models this key may call, with version, labels and input size",
                "tags": ["models"],
                "responses": {
                    "200": {
                        "description": "The deployed models the key may call (all of them for a key without scopes)",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/ModelList"},
                                "example": {"models": [example]},
                            }
                        },
                    },
                    **common,
                },
            }
        },
        "/v1/models": {
            "get": {
                "summary": "KServe V1: the names of the models this key may call",
                "tags": ["models"],
                "responses": {
                    "200": {
                        "description": "KServe's list models answer",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["models"],
                                    "properties": {"models": {"type": "array", "items": {"type": "string"}}},
                                },
                                "example": {"models": ["arrows", "shapes"]},
                            }
                        },
                    },
                    **common,
                },
            }
        },
    }


SCHEMAS = {
    "ModelList": {
        "type": "object",
        "required": ["models"],
        "properties": {
            "models": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": list(FIELDS),
                    "properties": {
                        "name": {"type": "string"},
                        "version": {"type": "string"},
                        "labels": {"type": "array", "items": {"type": "string"}},
                        "input": {
                            "type": "object",
                            "properties": {
                                "height": {"type": "integer"},
                                "width": {"type": "integer"},
                                "channels": {"type": "integer"},
                                "dtype": {"type": "string"},
                            },
                        },
                    },
                },
            }
        },
    }
}
