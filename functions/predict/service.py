"""The predict function: serves exactly one model bundle behind bearer tokens."""

from __future__ import annotations

import functools
from typing import Any

from functions.predict import pipeline, spec
from functions.predict.model import Model
from functions.predict.v1 import V1
from functions.predict.v2 import V2
from shared import imaging
from shared.auth import AuthStore
from shared.config import Settings
from shared.errors import BadRequest, UnsupportedMediaType
from shared.http import Call, Route, Service


def create_service(settings: Settings, model: Model, auth: AuthStore | None = None) -> Service:
    """The predict function's service for ``model`` (``auth`` defaults to the settings' Redis)."""
    auth = auth or AuthStore(settings, token_cache=True)
    limits = imaging.Limits.from_settings(settings)  # one decode budget for the whole process

    def predict(call: Call) -> dict[str, Any]:
        """Multipart ``file`` field(s) → one prediction, or ``results`` in upload order."""
        request = call.request
        if request.mimetype != "multipart/form-data":
            raise UnsupportedMediaType("send multipart/form-data with the image(s) in field 'file'")
        if request.headers.get("Content-Encoding", "identity").strip().lower() != "identity":
            raise UnsupportedMediaType("send uploads without Content-Encoding (images are compressed already)")
        uploads = [pipeline.Upload(f.read(), f.filename) for f in request.files.getlist("file")]
        if not uploads:
            if "file" in request.form:  # a part named file, but without a filename: read as text
                raise BadRequest(
                    "field 'file' is text, not a file: its part has no filename; send the image as a file "
                    '(Content-Disposition: form-data; name="file"; filename="photo.jpg"), e.g. curl -F file=@photo.jpg'
                )
            fields = sorted({*request.files, *request.form})
            raise BadRequest(
                f"no file: send the image(s) in multipart field 'file' (this body has {', '.join(fields)})"
                if fields
                else "no file: no multipart part could be read (is the body whole, with its closing boundary?); "
                "send the image(s) in field 'file'"
            )
        batch = pipeline.decode(model, uploads, limits)
        return pipeline.encode(model, pipeline.infer(model, batch), uploads)

    def metadata(call: Call) -> dict[str, Any]:
        """The bundle's model.json: labels, input size, preprocessing, metrics, version."""
        return model.meta

    v1, v2 = V1(model, settings, limits), V2(model, settings, limits)
    return Service(
        settings,
        [
            Route("/models/<name>/predict.json", ("POST",), predict, auth=True),
            Route("/models/<name>.json", ("GET",), metadata, auth=True),
            # KServe / TF Serving V1: the model, a version of it, or a version label.
            Route("/v1/models/<name>", ("GET",), v1.status, auth=True),
            Route("/v1/models/<name>/versions/<version>", ("GET",), v1.status, auth=True),
            Route("/v1/models/<name>/labels/<label>", ("GET",), v1.status, auth=True),
            Route("/v1/models/<name>/metadata", ("GET",), v1.metadata, auth=True),
            Route("/v1/models/<name>/versions/<version>/metadata", ("GET",), v1.metadata, auth=True),
            Route("/v1/models/<name>/labels/<label>/metadata", ("GET",), v1.metadata, auth=True),
            Route("/v1/models/<name>:<verb>", ("POST",), v1.predict, auth=True),
            Route("/v1/models/<name>/versions/<version>:<verb>", ("POST",), v1.predict, auth=True),
            Route("/v1/models/<name>/labels/<label>:<verb>", ("POST",), v1.predict, auth=True),
            # Open Inference Protocol V2 (its server paths, /v2 and /v2/health/*, are every function's).
            Route("/v2/models/<name>", ("GET",), v2.metadata, auth=True),
            Route("/v2/models/<name>/versions/<version>", ("GET",), v2.metadata, auth=True),
            Route("/v2/models/<name>/ready", ("GET",), v2.ready, auth=True),
            Route("/v2/models/<name>/versions/<version>/ready", ("GET",), v2.ready, auth=True),
            Route("/v2/models/<name>/config", ("GET",), v2.config, auth=True),
            Route("/v2/models/<name>/versions/<version>/config", ("GET",), v2.config, auth=True),
            Route("/v2/models/<name>/infer", ("POST",), v2.infer, auth=True),
            Route("/v2/models/<name>/versions/<version>/infer", ("POST",), v2.infer, auth=True),
        ],
        openapi=functools.partial(
            spec.document, model.meta, model.input_name, model.output_name, settings.max_upload_bytes
        ),
        auth=auth,
        model=model.name,
        function="predict",
    )
