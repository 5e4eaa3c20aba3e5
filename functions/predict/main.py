"""Predict function: serves exactly one model bundle (MODEL_NAME) behind bearer tokens."""

import flask
import functions_framework
import numpy as np
import predict_spec
import runtime

from shared import config, imaging, store
from shared.auth import AuthStore
from shared.errors import BadRequest, Forbidden, NotFound, UnsupportedMediaType
from shared.http import Route, Service, bearer_token

MAX_FILES = 32  # per request; each is decoded and batched into one model call

settings = config.load()
if not settings.model_name:
    raise SystemExit("predict: MODEL_NAME is required (the model this function serves)")
try:
    model = runtime.Model(settings.model_dir)  # once per process, before serving anything
except runtime.BundleError as exc:
    raise SystemExit(f"predict: cannot load model {settings.model_name!r}: {exc}") from None
if model.name != settings.model_name:
    raise SystemExit(f"predict: {settings.model_dir} holds model {model.name!r}, not {settings.model_name!r}")
auth = AuthStore(settings, store.connect(settings))
INPUT, PREPROCESSING = model.meta["input"], model.meta["preprocessing"]


def _authorize(request: flask.Request, name: str) -> None:
    if name != model.name:
        raise NotFound(f"no such model here: {name} (this function serves {model.name})")
    session = auth.verify_token(bearer_token(request))
    if not session.allows(name):
        raise Forbidden(f"this key may not call model {name}")


def predict(request: flask.Request, name: str) -> dict:
    """Multipart ``file`` field(s) → one prediction, or ``results`` in upload order."""
    _authorize(request, name)
    if request.mimetype != "multipart/form-data":
        raise UnsupportedMediaType("send multipart/form-data with the image(s) in field 'file'")
    uploads = request.files.getlist("file")
    if not uploads:
        raise BadRequest("no file: send the image(s) in multipart field 'file'")
    if len(uploads) > MAX_FILES:
        raise BadRequest(f"too many files: {len(uploads)} (limit {MAX_FILES} per request)")
    arrays = []
    for upload in uploads:
        try:
            image = imaging.decode(upload.read(), settings.max_image_pixels,
                                   (INPUT["width"], INPUT["height"]))
        except BadRequest as exc:
            label = f"file {upload.filename!r}" if upload.filename else "file"
            raise BadRequest(f"{label}: {exc.message}") from None
        arrays.append(imaging.to_array(image, INPUT, PREPROCESSING))
    answers = [model.describe(row) for row in model.predict(np.stack(arrays))]
    if len(answers) == 1:
        return answers[0]
    return {"results": [{"file": u.filename, **a} for u, a in zip(uploads, answers, strict=False)]}


def metadata(request: flask.Request, name: str) -> dict:
    """The bundle's model.json: labels, input size, preprocessing, metrics, version."""
    _authorize(request, name)
    return model.meta


service = Service(
    settings,
    [
        Route("/models/<name>/predict.json", ("POST",), predict),
        Route("/models/<name>.json", ("GET",), metadata),
    ],
    ready=auth.ping,
    openapi=predict_spec.document(model.meta),
)


@functions_framework.http
def handle(request: flask.Request) -> flask.Response:
    """functions-framework entry point."""
    return service(request)
