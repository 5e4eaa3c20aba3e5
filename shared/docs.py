"""Swagger UI served from the files of the ``swagger-ui-bundle`` wheel: no CDN, works offline."""

from __future__ import annotations

import html
import json
import mimetypes

import flask

from shared.errors import NotFound

# The only files /docs/<asset> serves (no path from the request ever reaches the filesystem).
ASSETS = frozenset(
    {
        "swagger-ui.css",
        "swagger-ui-bundle.js",
        "swagger-ui-standalone-preset.js",
        "oauth2-redirect.html",
        "favicon-32x32.png",
        "favicon-16x16.png",
    }
)

_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>{title}</title>
  <link rel="stylesheet" href="/docs/swagger-ui.css">
  <link rel="icon" type="image/png" href="/docs/favicon-32x32.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/docs/swagger-ui-bundle.js"></script>
<script src="/docs/swagger-ui-standalone-preset.js"></script>
<script>
window.ui = SwaggerUIBundle({{
  {source},
  dom_id: "#swagger-ui",
  deepLinking: true,
  persistAuthorization: true,
  oauth2RedirectUrl: window.location.origin + "/docs/oauth2-redirect.html",
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
  layout: "StandaloneLayout"
}});
</script>
</body>
</html>
"""


def page(spec_urls: list[str], title: str = "Thalamus API") -> flask.Response:
    """The Swagger UI page for one spec URL, or a selector over several."""
    if len(spec_urls) == 1:
        source = f"url: {json.dumps(spec_urls[0])}"
    else:
        named = [{"url": url, "name": url.rsplit("/", 1)[-1].removesuffix(".json")} for url in spec_urls]
        source = f"urls: {json.dumps(named)}"
    body = _PAGE.format(title=html.escape(title), source=source)
    return flask.Response(body, mimetype="text/html")


def asset(name: str) -> flask.Response:
    """One Swagger UI file from the wheel, cacheable for a day."""
    if name not in ASSETS:
        raise NotFound(f"no such docs file: {name}")
    from swagger_ui_bundle import swagger_ui_path  # imported here: only /docs needs it

    data = (swagger_ui_path / name).read_bytes()
    mimetype = mimetypes.guess_type(name)[0] or "application/octet-stream"
    response = flask.Response(data, mimetype=mimetype)
    response.headers["Cache-Control"] = "public, max-age=86400"
    return response
