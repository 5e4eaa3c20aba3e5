"""Which function serves which path: the one routing table the local gateway uses and the
cluster's Istio VirtualService is rendered from (knative/manage.py routing, from these constants)."""

from __future__ import annotations

import re

# Exact paths of the token function: tokens, the model list (it is always deployed, so it answers
# while the models are scaled to zero) and the Open Inference Protocol's server endpoints.
TOKEN_PATHS = (
    "/",
    "/token.json",
    "/session.json",
    "/models.json",
    "/v1/models",
    "/v2",
    "/v2/health/live",
    "/v2/health/ready",
)
# Where the gateway answers with the docs page over every function's document, each at
# FUNCTION_DOCUMENT; under DOCS_ASSETS are Swagger UI's files, which every function serves.
DOCS_PAGE_PATHS = ("/docs", "/docs/")
# The root is KServe V1's server liveness, which the token function answers, but a browser gets
# the docs page there: browsers put text/html first in Accept, API clients send */* or JSON.
# Istio matches the whole Accept header with this RE2; both answers say "Vary: Accept".
ROOT = "/"
BROWSER_ACCEPT = "(?i)text/html.*"
DOCS_ASSETS = "/docs/"
FUNCTION_DOCUMENT = "/openapi/{function}.json"
# What the local gateway answers itself, besides those: its health and the merged document.
GATEWAY_PATHS = ("/healthz", "/readyz", "/openapi.json", *DOCS_PAGE_PATHS)
# Paths of one model's function; ``{model}`` is the model's name. Exact paths, and prefixes that
# end in a separator, so that a model's name never matches the start of another's (``arrow`` is
# not ``arrows``).
MODEL_PATHS = ("/models/{model}.json", "/v1/models/{model}", "/v2/models/{model}")
MODEL_PREFIXES = ("/models/{model}/", "/v1/models/{model}/", "/v1/models/{model}:", "/v2/models/{model}/")

_MODEL_PATH = re.compile(r"^/(?:models|v1/models|v2/models)/(?P<model>[a-z0-9][a-z0-9-]*)(?=[/.:]|$)")


def wants_page(path: str, accept: str) -> bool:
    """Whether the gateway answers ``path`` with the docs page for a client sending ``accept``."""
    return path in DOCS_PAGE_PATHS or (path == ROOT and re.fullmatch(BROWSER_ACCEPT, accept) is not None)


def upstream_for(path: str) -> tuple[str, str | None] | None:
    """``("token", None)``, ``("model", name)`` or None for a path no function serves (the docs
    page's paths are the gateway's own: :func:`wants_page` comes first)."""
    if path in TOKEN_PATHS:
        return "token", None
    match = _MODEL_PATH.match(path)
    if match:
        name = match.group("model")
        if path in (exact.format(model=name) for exact in MODEL_PATHS) or any(
            path.startswith(prefix.format(model=name)) for prefix in MODEL_PREFIXES
        ):
            return "model", name
    return None


def documents(functions: list[str]) -> list[str]:
    """The paths of ``functions``' OpenAPI documents, which the docs page shows."""
    return [FUNCTION_DOCUMENT.format(function=function) for function in functions]


def document_of(path: str) -> str | None:
    """The function whose OpenAPI document ``path`` names (``/openapi/<function>.json``), if any."""
    head, _, tail = FUNCTION_DOCUMENT.partition("{function}")
    name = path.removeprefix(head).removesuffix(tail)
    return name if path.startswith(head) and path.endswith(tail) and name and "/" not in name else None
