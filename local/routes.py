"""Which function serves which path: the one routing table the local gateway uses and the
cluster's Istio VirtualService (knative/routing/) is rendered from."""

from __future__ import annotations

import re

# Exact paths of the token function: tokens, the model list (it is always deployed, so it answers
# while the models are scaled to zero) and the Open Inference Protocol's server endpoints.
TOKEN_PATHS = (
    "/token.json",
    "/session.json",
    "/models.json",
    "/v1/models",
    "/v2",
    "/v2/health/live",
    "/v2/health/ready",
)
# Paths of one model's function; ``{model}`` is the model's name. Exact paths, and prefixes that
# end in a separator, so that a model's name never matches the start of another's (``arrow`` is
# not ``arrows``).
MODEL_PATHS = ("/models/{model}.json", "/v1/models/{model}", "/v2/models/{model}")
MODEL_PREFIXES = ("/models/{model}/", "/v1/models/{model}/", "/v1/models/{model}:", "/v2/models/{model}/")

_MODEL_PATH = re.compile(r"^/(?:models|v1/models|v2/models)/(?P<model>[a-z0-9][a-z0-9-]*)(?=[/.:]|$)")


def upstream_for(path: str) -> tuple[str, str | None] | None:
    """``("token", None)``, ``("model", name)`` or None for a path no function serves."""
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


NAMESPACE = "thalamus"
HOST = "thalamus.example.com"


def render_virtualservice(models: list[str]) -> str:
    """The Istio VirtualService (YAML) that routes this table's paths on one host, for ``models``."""

    def route(paths: list[tuple[str, str]], service: str) -> str:
        matches = "".join(f'        - uri:\n            {kind}: "{p}"\n' for kind, p in paths)  # quoted: ":" ends some
        return (
            f"    - match:\n{matches}"
            f"      rewrite:\n        authority: {service}.{NAMESPACE}.svc.cluster.local\n"
            f"      route:\n        - destination:\n"
            f"            host: knative-local-gateway.istio-system.svc.cluster.local\n"
            f"          weight: 100\n"
        )

    http = route([("exact", p) for p in TOKEN_PATHS], "thalamus-token")
    for name in models:
        exact = [("exact", p.format(model=name)) for p in MODEL_PATHS]
        http += route(exact + [("prefix", p.format(model=name)) for p in MODEL_PREFIXES], f"thalamus-{name}")
    return (
        "# Single-host routing (optional): rendered by knative/manage.py from local/routes.py,\n"
        "# the table the local gateway uses. Apply with: kubectl apply -k knative/routing\n"
        "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\n"
        f"metadata:\n  name: thalamus\n  namespace: {NAMESPACE}\n"
        f"spec:\n  gateways:\n    - knative-serving/knative-ingress-gateway\n  hosts:\n    - {HOST}\n"
        f"  http:\n{http}"
    )
