"""The cluster's single-host routing: the Istio VirtualService rendered from the routing table
the local gateway uses (local/routes.py), so both send every path to the same function.
``knative/manage.py routing`` writes it to knative/routing/virtualservice.yaml."""

from __future__ import annotations

import json
import re
from typing import Any

from local import routes
from shared import docs
from shared.errors import MethodNotAllowed

NAMESPACE = "thalamus"
LOCAL_GATEWAY = "knative-local-gateway.istio-system.svc.cluster.local"


def _literal(text: str) -> str:
    """``text`` matched literally by an RE2 pattern."""
    return re.sub(r"([.^$*+?()\[\]{}|\\])", r"\\\1", text)


def model_regex(prefix: str, model: str) -> str:
    """An RE2 pattern for ``prefix`` (a routes.MODEL_PREFIXES entry, ending in a separator) and
    anything after it: the model's name is matched whole, /v1/models/arrow never reaches arrows."""
    return _literal(prefix.format(model=model)) + ".*"


def _forward(name: str, matches: list[dict[str, Any]], function: str, uri: str | None = None) -> dict[str, Any]:
    rewrite = {"authority": f"thalamus-{function}.{NAMESPACE}.svc.cluster.local"}
    if uri:
        rewrite["uri"] = uri
    return {
        "name": name,
        "match": matches,
        "rewrite": rewrite,
        "route": [{"destination": {"host": LOCAL_GATEWAY, "port": {"number": 80}}}],
        # Never replay a request: a POST /token.json counts failures, an upload is not idempotent.
        "retries": {"attempts": 0},
    }


def _answer(
    name: str, matches: list[dict[str, Any]], status: int, body: str, content_type: str, **headers: str
) -> dict[str, Any]:
    rule: dict[str, Any] = {"name": name, "match": matches} if matches else {"name": name}
    rule["directResponse"] = {"status": status, "body": {"string": body}}
    rule["headers"] = {"response": {"set": {"content-type": content_type, **headers}}}
    return rule


def virtualservice(names: list[str], host: str) -> dict[str, Any]:
    """The Istio VirtualService routing local/routes.py's paths, on ``host``, to ``names``' Services."""
    # As the local gateway: /docs over every function's document, each at routes.FUNCTION_DOCUMENT,
    # and the root too for a browser; first, as the root is otherwise the token function's.
    functions = ["token", *names]
    page = docs.page(routes.documents(functions)).get_data(as_text=True)
    root: dict[str, Any] = {"uri": {"exact": routes.ROOT}, "headers": {"accept": {"regex": routes.BROWSER_ACCEPT}}}
    pages = [root, *({"uri": {"exact": path}} for path in routes.DOCS_PAGE_PATHS)]
    reads = {"method": {"regex": "GET|HEAD"}}
    http = [_answer("docs", [{**match, **reads} for match in pages], 200, page, "text/html", vary="Accept")]
    refused = MethodNotAllowed(["GET", "HEAD"])  # another method on the page's paths, as the gateway answers it
    http.append(_answer("docs-methods", pages[1:], refused.status, json.dumps({"error": refused.message}),
                        "application/json", allow=refused.headers["Allow"]))  # fmt: skip
    http.append(_forward("token", [{"uri": {"exact": path}} for path in routes.TOKEN_PATHS], "token"))
    for model in names:
        exact = [{"uri": {"exact": path.format(model=model)}} for path in routes.MODEL_PATHS]
        regexes = [{"uri": {"regex": model_regex(prefix, model)}} for prefix in routes.MODEL_PREFIXES]
        http.append(_forward(f"model-{model}", exact + regexes, model))
    for function, document in zip(functions, routes.documents(functions), strict=True):
        http.append(_forward(f"openapi-{function}", [{"uri": {"exact": document}}], function, "/openapi.json"))
    http.append(_forward("docs-assets", [{"uri": {"prefix": routes.DOCS_ASSETS}}], "token"))
    http.append(_answer("not-found", [], 404, json.dumps({"error": "no such path"}), "application/json"))
    return {
        "apiVersion": "networking.istio.io/v1beta1",
        "kind": "VirtualService",
        "metadata": {"name": "thalamus", "namespace": NAMESPACE},
        "spec": {"gateways": [f"{NAMESPACE}/thalamus"], "hosts": [host], "http": http},
    }


def to_yaml(value: object, indent: int = 0) -> str:
    """Block YAML for dicts, lists and scalars (the serving venv has no PyYAML)."""
    pad = "  " * indent
    if isinstance(value, dict):
        out = ""
        for key, item in value.items():
            nested = isinstance(item, dict | list) and item
            out += f"{pad}{key}:\n{to_yaml(item, indent + 1)}" if nested else f"{pad}{key}: {_scalar(item)}\n"
        return out
    assert isinstance(value, list)
    out = ""
    for item in value:
        if isinstance(item, dict | list) and item:
            out += f"{pad}- {to_yaml(item, indent + 1)[len(pad) + 2 :]}"
        else:
            out += f"{pad}- {_scalar(item)}\n"
    return out


def _scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    plain = re.fullmatch(r"[A-Za-z_/][A-Za-z0-9_./-]*", text) and text not in ("true", "false", "null", "yes", "no")
    return text if plain else json.dumps(text)
