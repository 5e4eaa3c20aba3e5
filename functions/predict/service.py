"""The predict function: serves exactly one model bundle behind bearer tokens."""

from __future__ import annotations

from typing import Any

from functions.predict import pipeline, spec
from functions.predict.model import Model
from shared.auth import AuthStore
from shared.config import Settings
from shared.errors import BadRequest, UnsupportedMediaType
from shared.http import Call, Route, Service


def create_service(settings: Settings, model: Model, auth: AuthStore | None = None) -> Service:
    """The predict function's service for ``model`` (``auth`` defaults to the settings' Redis)."""
    auth = auth or AuthStore(settings)

    def predict(call: Call) -> dict[str, Any]:
        """Multipart ``file`` field(s) → one prediction, or ``results`` in upload order."""
        request = call.request
        if request.mimetype != "multipart/form-data":
            raise UnsupportedMediaType("send multipart/form-data with the image(s) in field 'file'")
        uploads = [pipeline.Upload(f.read(), f.filename) for f in request.files.getlist("file")]
        if not uploads:
            raise BadRequest("no file: send the image(s) in multipart field 'file'")
        batch = pipeline.decode(model, uploads, settings.max_image_pixels)
        return pipeline.encode(model, pipeline.infer(model, batch), uploads)

    def metadata(call: Call) -> dict[str, Any]:
        """The bundle's model.json: labels, input size, preprocessing, metrics, version."""
        return model.meta

    return Service(
        settings,
        [
            Route("/models/<name>/predict.json", ("POST",), predict, auth=True),
            Route("/models/<name>.json", ("GET",), metadata, auth=True),
        ],
        openapi=spec.document(model.meta),
        auth=auth,
        model=model.name,
    )
