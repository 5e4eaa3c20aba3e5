"""KServe / TensorFlow Serving V1 REST protocol for the one model a predict function serves.

- ``GET /v1/models/<name>[/versions/<v>|/labels/<l>]``: KServe's ``{"name", "ready"}`` and TF
  Serving's ``model_version_status`` in one object;
- ``GET …/metadata``: TF Serving's signature map (input ``keras_tensor``, output ``output_0``);
- ``POST …:predict``: ``{"instances": [...]}`` (row form) or ``{"inputs": ...}`` (columnar), each
  example a numeric tensor shaped for the model or an image file as ``{"b64": "..."}``; answers
  ``{"predictions": [[p, …], …]}`` / ``{"outputs": [[p, …], …]}`` as TF Serving does for a
  one-output classifier. ``"signature_name": "serving_labels"`` adds the label:
  ``{"predictions": [{"probabilities": [...], "label": "circle"}, …]}``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from functions.predict import pipeline, tensors
from functions.predict.model import Model
from shared import imaging
from shared.config import Settings
from shared.errors import BadRequest, NotFound, shown
from shared.http import Call

DEFAULT = "serving_default"
LABELS = "serving_labels"  # the same model, answering each example's label next to its probabilities
VERSION_LABELS = ("latest",)  # the one version a function serves is its latest


class V1:
    """The V1 handlers for ``model``, with the settings' limits on bodies and image pixels."""

    def __init__(self, model: Model, settings: Settings, limits: imaging.Limits) -> None:
        self.model = model
        self.limits = limits
        self.max_body = settings.max_upload_bytes
        self.version = str(model.meta["version"])

    def _resolve(self, call: Call) -> None:
        """404 unless the path's version or label (if any) names the version this function serves."""
        name = self.model.name
        if "version" in call.args and call.args["version"] != self.version:
            raise NotFound(f"Could not find version {call.args['version']} of model {name} (serving {self.version})")
        if "label" in call.args and call.args["label"] not in VERSION_LABELS:
            raise NotFound(
                f"model {name} has no version labelled {call.args['label']!r} (labels: {', '.join(VERSION_LABELS)})"
            )

    def status(self, call: Call) -> dict[str, Any]:
        """KServe's model readiness and TF Serving's model status, in one object."""
        self._resolve(call)
        state = {"version": self.version, "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        return {"name": self.model.name, "ready": True, "model_version_status": [state]}

    def metadata(self, call: Call) -> dict[str, Any]:
        """TF Serving's GetModelMetadata answer: the signatures with names, dtypes and shapes."""
        self._resolve(call)
        model = self.model
        shape = [-1, *tensors.input_shape(model)]
        inputs = {model.input_name: _tensor_info(model.input_tensor, "DT_FLOAT", shape)}
        probabilities = _tensor_info(model.output_tensor, "DT_FLOAT", [-1, len(model.labels)])

        def signature(outputs: dict[str, Any]) -> dict[str, Any]:
            return {"inputs": inputs, "outputs": outputs, "method_name": "tensorflow/serving/predict", "defaults": {}}

        signatures = {
            DEFAULT: signature({model.output_name: probabilities}),
            LABELS: signature({"probabilities": probabilities, "label": _tensor_info("label", "DT_STRING", [-1])}),
        }
        return {
            "model_spec": {"name": model.name, "signature_name": "", "version": self.version},
            "metadata": {"signature_def": {"signature_def": signatures}},
        }

    def predict(self, call: Call) -> dict[str, Any]:
        """Row (``instances``) or columnar (``inputs``) examples → predictions in the same form."""
        self._resolve(call)
        if call.args["verb"] != "predict":
            raise BadRequest(f"':{call.args['verb']}' is not served here; use ':predict'")
        body = tensors.read_body(call.request, self.max_body)
        batch, key, signature = self._read(body)
        # Out of the JSON budget by now: a request waiting for an interpreter holds only its batch.
        probabilities = pipeline.infer(self.model, batch)
        if signature == DEFAULT:
            return {key: probabilities.tolist()}
        labels = [self.model.labels[i] for i in probabilities.argmax(axis=1)]
        if key == "predictions":
            return {
                key: [{"probabilities": p, "label": x} for p, x in zip(probabilities.tolist(), labels, strict=True)]
            }
        return {key: {"probabilities": probabilities.tolist(), "label": labels}}

    def _read(self, body: bytes) -> tuple[np.ndarray, str, str]:
        """The request's batch, the answer's key (its form) and the signature; the parsed document
        is gone when this returns."""
        with tensors.parsed(body, "body", self.limits) as doc:
            return self._examples(doc)

    def _examples(self, doc: Any) -> tuple[np.ndarray, str, str]:
        if not isinstance(doc, dict):
            raise BadRequest("body must be a JSON object with 'instances' or 'inputs'")
        signature = doc.get("signature_name", "")
        if not isinstance(signature, str):
            raise BadRequest("signature_name must be a string")
        signature = signature or DEFAULT
        if signature not in (DEFAULT, LABELS):
            raise BadRequest(f"signature_name {shown(signature)} not found; use {DEFAULT!r} or {LABELS!r}")
        if "instances" in doc and "inputs" in doc:
            raise BadRequest("send only one of 'instances' (row form) or 'inputs' (columnar form)")
        if "instances" in doc:
            batch, key = self._rows(doc["instances"]), "predictions"
        elif "inputs" in doc:
            batch, key = self._columns(doc["inputs"]), "outputs"
        else:
            raise BadRequest("missing 'instances' (one item per example) or 'inputs' (columnar form)")
        return batch, key, signature

    def _rows(self, instances: Any) -> np.ndarray:
        if not isinstance(instances, list):
            raise BadRequest("'instances' must be a list, one item per example")
        tensors.check_batch_size(len(instances), "instances")
        items = [self._unwrap(item, f"instances[{i}]") for i, item in enumerate(instances)]
        return self._batch(items, "instances")

    def _columns(self, inputs: Any) -> np.ndarray:
        value = self._unwrap(inputs, "inputs")
        if _is_b64(value):
            value = [value]
        if isinstance(value, list) and value and isinstance(value[0], dict):
            tensors.check_batch_size(len(value), "instances")
            return self._batch(value, "inputs")
        return tensors.model_input(tensors.dense(value, "inputs"), self.model, "inputs")

    def _unwrap(self, item: Any, where: str) -> Any:
        """A named example ``{"keras_tensor": value}`` → value; anything else as it is."""
        if not isinstance(item, dict) or _is_b64(item):
            return item
        if set(item) != {self.model.input_name}:
            raise BadRequest(
                f'{where}: an object must be an image {{"b64": ...}} or name the input '
                f"{self.model.input_name!r} alone (got keys {shown(sorted(item))})"
            )
        return item[self.model.input_name]

    def _batch(self, items: list[Any], where: str) -> np.ndarray:
        """Examples that are all images (decoded like uploads) or all tensors → the model's batch."""
        images = [_is_b64(item) for item in items]
        if all(images):
            uploads = [tensors.b64_image(item["b64"], f"{where}[{i}]") for i, item in enumerate(items)]
            return pipeline.decode(self.model, uploads, self.limits)
        if any(images) or any(isinstance(item, dict) for item in items):
            raise BadRequest(f'{where}: examples must be all images {{"b64": ...}} or all numeric tensors')
        return tensors.model_input(tensors.dense(items, where), self.model, where)


def _is_b64(item: Any) -> bool:
    return isinstance(item, dict) and set(item) == {"b64"}


def _tensor_info(name: str, dtype: str, shape: list[int]) -> dict[str, Any]:
    dims = [{"size": str(size), "name": ""} for size in shape]
    return {"dtype": dtype, "tensor_shape": {"dim": dims, "unknown_rank": False}, "name": name}
