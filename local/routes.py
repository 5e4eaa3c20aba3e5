"""Which function serves which path: the one routing table the local gateway uses and the
cluster's Istio VirtualService is rendered from (knative/manage.py routing, from these constants)."""

from __future__ import annotations

import re

TOKEN_PATHS = ("/token.json", "/session.json")
# Path prefixes that belong to one model's function; ``{model}`` is the model's name.
MODEL_PREFIXES = ("/models/{model}/", "/models/{model}.json", "/v1/models/{model}", "/v2/models/{model}")

_MODEL_PATH = re.compile(r"^/(?:models|v1/models|v2/models)/(?P<model>[a-z0-9][a-z0-9-]*)(?=[/.:]|$)")


def upstream_for(path: str) -> tuple[str, str | None] | None:
    """``("token", None)``, ``("model", name)`` or None for a path no function serves."""
    if path in TOKEN_PATHS:
        return "token", None
    match = _MODEL_PATH.match(path)
    if match:
        name = match.group("model")
        if any(path.startswith(prefix.format(model=name)) for prefix in MODEL_PREFIXES):
            return "model", name
    return None
