"""Open Inference Protocol (V2: KServe V2, Triton's HTTP API) for the one model a predict function
serves, with Triton's binary tensor data and classification extensions.

``GET /v2/models/<name>[/versions/<v>]`` (metadata), ``…/ready``, ``…/config`` (Triton's model
configuration) and ``POST …/infer``. The input is one of:

- ``FP32`` (also ``FP16``, ``FP64``) of shape ``[n, height, width, channels]``: the model's input;
- ``UINT8`` of that shape: raw pixels, scaled as the bundle's preprocessing says;
- ``BYTES`` of shape ``[n]`` or ``[n, 1]``: image files (base64 strings in JSON, raw bytes in
  binary data), decoded like uploads.

The server endpoints (``/v2``, ``/v2/health/*``) are every function's (:mod:`shared.http`).
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

import flask
import numpy as np

from functions.predict import pipeline, tensors
from functions.predict.model import Model
from shared import imaging
from shared.config import Settings
from shared.errors import BadRequest, NotFound, clipped, shown
from shared.http import Call

HEADER_LENGTH = "Inference-Header-Content-Length"
FLOATS: dict[str, np.dtype[Any]] = {"FP32": np.dtype("<f4"), "FP16": np.dtype("<f2"), "FP64": np.dtype("<f8")}
PIXELS: dict[str, np.dtype[Any]] = {"UINT8": np.dtype("u1")}
PLATFORM = "litert_tflite"


# The longest request id echoed in an answer (Triton sets none; a UUID is 36 characters).
MAX_ID_CHARS = 1024


class V2:
    """The V2 handlers for ``model``, with the settings' limits on bodies and image pixels."""

    def __init__(self, model: Model, settings: Settings, limits: imaging.Limits) -> None:
        self.model = model
        self.limits = limits
        self.max_body = settings.max_upload_bytes
        self.version = str(model.meta["version"])

    def _resolve(self, call: Call) -> None:
        version = call.args.get("version")
        if version is not None and version != self.version:
            raise NotFound(f"model {self.model.name} has no version {version} (serving {self.version})")

    def metadata(self, call: Call) -> dict[str, Any]:
        """Model metadata: the input and output with name, datatype, shape (-1: the batch)."""
        self._resolve(call)
        model = self.model
        return {
            "name": model.name,
            "versions": [self.version],
            "platform": PLATFORM,
            "inputs": [{"name": model.input_name, "datatype": "FP32", "shape": [-1, *tensors.input_shape(model)]}],
            "outputs": [{"name": model.output_name, "datatype": "FP32", "shape": [-1, len(model.labels)]}],
        }

    def ready(self, call: Call) -> dict[str, Any]:
        """The model is loaded (it is, or this function would not have started)."""
        self._resolve(call)
        return {"name": self.model.name, "ready": True}

    def config(self, call: Call) -> dict[str, Any]:
        """Triton's model configuration (what Triton's image_client.py reads)."""
        self._resolve(call)
        model = self.model
        return {
            "name": model.name,
            "platform": PLATFORM,
            "backend": "litert",
            "max_batch_size": pipeline.MAX_FILES,
            "input": [
                {
                    "name": model.input_name,
                    "data_type": "TYPE_FP32",
                    "format": "FORMAT_NHWC",
                    "dims": tensors.input_shape(model),
                }
            ],
            "output": [{"name": model.output_name, "data_type": "TYPE_FP32", "dims": [len(model.labels)]}],
        }

    def infer(self, call: Call) -> dict[str, Any] | flask.Response:
        """An inference request (JSON, or JSON plus binary tensor data) → its outputs."""
        self._resolve(call)
        body = tensors.read_body(call.request, self.max_body)
        header, binary = _split(body, call.request.headers.get(HEADER_LENGTH))
        advice = (
            f"; check {HEADER_LENGTH} (tritonclient writes it into the headers dict it is given: pass a fresh "
            "dict to each call)"
            if HEADER_LENGTH in call.request.headers
            else ""
        )
        batch, wanted, request_id = self._read(header, binary, advice)
        # Out of the JSON budget by now: a request waiting for an interpreter holds only its batch.
        return self._answer(pipeline.infer(self.model, batch), wanted, request_id)

    def _read(
        self, header: bytes | memoryview, binary: memoryview, advice: str
    ) -> tuple[np.ndarray, list[tuple[bool, int]], str | None]:
        """The request's batch, its requested outputs and id; the parsed document is gone when
        this returns."""
        with tensors.parsed(header, "inference request", self.limits, advice) as doc:
            return self._request(doc, binary)

    def _request(self, doc: Any, binary: memoryview) -> tuple[np.ndarray, list[tuple[bool, int]], str | None]:
        if not isinstance(doc, dict):
            raise BadRequest("the inference request must be a JSON object with 'inputs'")
        request_id = doc.get("id")
        if request_id is not None and not isinstance(request_id, str):
            raise BadRequest("'id' must be a string")
        if request_id is not None and len(request_id) > MAX_ID_CHARS:  # echoed: a 10 KB gzip body, a 10 MB answer
            raise BadRequest(f"'id' is over {MAX_ID_CHARS} characters")
        wanted = self._outputs(doc)
        inputs = doc.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise BadRequest(f"missing 'inputs': a list holding the model's input {self.model.input_name!r}")
        if len(inputs) != 1:
            raise BadRequest(f"model {self.model.name} takes 1 input ({self.model.input_name!r}), got {len(inputs)}")
        return self._input(inputs[0], binary), wanted, request_id

    def _input(self, spec: Any, binary: memoryview) -> np.ndarray:
        """The request's one input as the model's batch (binary data checked to the byte)."""
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise BadRequest("inputs[0]: missing 'name'")
        where = f"input {shown(spec['name'])}"
        datatype, shape = spec.get("datatype"), spec.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise BadRequest(f"{where}: 'shape' must be a list of non-negative integers")
        params = _parameters(spec, where)
        if any(key.startswith("shared_memory") for key in params):
            raise BadRequest(f"{where}: shared memory is not supported; send the data in the request")
        if datatype == "BYTES":
            return self._images(spec, shape, _section(params, binary, where), where)
        dtype = FLOATS.get(str(datatype)) or PIXELS.get(str(datatype))
        if dtype is None:
            raise BadRequest(
                f"{where}: datatype {shown(datatype)} is not accepted; send FP32 (the model's input; FP16 and "
                "FP64 too), UINT8 pixels, or BYTES image files"
            )
        want = tensors.input_shape(self.model)
        if len(shape) != 4 or shape[1:] != want:
            raise BadRequest(
                f"{where}: shape {shown(shape)} does not fit the model's input [-1, {', '.join(map(str, want))}]"
            )
        tensors.check_batch_size(shape[0], "examples")
        count = tensors.element_count(shape)
        section = _section(params, binary, where)
        if section is not None:
            if len(section) != count * dtype.itemsize:
                raise BadRequest(
                    f"{where}: binary_data_size {len(section)} does not match shape {shown(shape)} of {datatype} "
                    f"({count * dtype.itemsize} bytes)"
                )
            array = np.frombuffer(section, dtype=dtype).reshape(shape)
        elif "data" in spec:
            array = tensors.dense(spec["data"], f"{where} data")
            if datatype in PIXELS and array.dtype.kind == "f":
                raise BadRequest(f"{where}: UINT8 data must be whole numbers 0..255")
            if datatype == "FP16":
                array = _half(array, where)
            if array.size != count:
                raise BadRequest(f"{where}: data holds {array.size} values, shape {shown(shape)} needs {count}")
            array = array.reshape(shape)
        else:
            raise BadRequest(f"{where}: needs 'data' or parameters.binary_data_size")
        return tensors.model_input(array, self.model, where, pixels=datatype in PIXELS)

    def _images(self, spec: dict[str, Any], shape: list[int], section: memoryview | None, where: str) -> np.ndarray:
        """BYTES elements, each an image file, decoded like uploads."""
        if len(shape) not in (1, 2) or shape[1:] not in ([], [1]):
            raise BadRequest(f"{where}: BYTES images take shape [n] or [n, 1], got {shown(shape)}")
        tensors.check_batch_size(shape[0], "images")
        name = clipped(spec["name"], 40)  # each image's, in a message about it
        if section is not None:
            items = tensors.unpack_bytes(section, where, shape[0])
            uploads = [pipeline.Upload(item, f"{name}[{i}]") for i, item in enumerate(items)]
        elif "data" in spec:
            values = list(itertools.islice(tensors.flatten(spec["data"]), shape[0] + 1))  # one too many is enough
            if len(values) != shape[0]:
                held = f"more than {shape[0]}" if len(values) > shape[0] else str(len(values))
                raise BadRequest(f"{where}: data holds {held} elements, shape {shape} needs {shape[0]}")
            uploads = [tensors.b64_image(value, f"{name}[{i}]") for i, value in enumerate(values)]
        else:
            raise BadRequest(f"{where}: needs 'data' or parameters.binary_data_size")
        return pipeline.decode(self.model, uploads, self.limits)

    def _outputs(self, doc: dict[str, Any]) -> list[tuple[bool, int]]:
        """The requested outputs, in order, as (binary, classification count); all by default."""
        params = _parameters(doc, "request")
        default_binary = _flag(params, "binary_data_output", False, "parameters")
        wanted = doc.get("outputs")
        if wanted is None or wanted == []:
            return [(default_binary, 0)]
        if not isinstance(wanted, list):
            raise BadRequest("'outputs' must be a list of {\"name\": ...}")
        chosen, named = [], set()
        for i, output in enumerate(wanted):
            if not isinstance(output, dict) or not isinstance(output.get("name"), str):
                raise BadRequest(f"outputs[{i}]: missing 'name'")
            # As Triton: each output once (a few bytes of gzip could ask for a million answers).
            if output["name"] in named:
                raise BadRequest(f"outputs[{i}]: output {shown(output['name'])} requested twice")
            named.add(output["name"])
            if output["name"] != self.model.output_name:
                raise BadRequest(
                    f"unexpected inference output {shown(output['name'])} for model {self.model.name!r} "
                    f"(its output is {self.model.output_name!r})"
                )
            options = _parameters(output, f"outputs[{i}]")
            if any(key.startswith("shared_memory") for key in options):
                raise BadRequest(f"outputs[{i}]: shared memory is not supported")
            classes = options.get("classification", 0)
            if type(classes) is not int or classes < 0:
                raise BadRequest(f"outputs[{i}]: 'classification' must be an integer ≥ 0 (the top k; 0 = none)")
            chosen.append((_flag(options, "binary_data", default_binary, f"outputs[{i}]"), classes))
        return chosen

    def _answer(
        self, probabilities: np.ndarray, wanted: list[tuple[bool, int]], request_id: str | None
    ) -> dict[str, Any] | flask.Response:
        outputs, blobs = [], []
        for binary, classes in wanted:
            output: dict[str, Any] = {"name": self.model.output_name}
            if classes:
                table = _classify(probabilities, classes, self.model.labels)
                output.update(datatype="BYTES", shape=[len(table), len(table[0])])
                flat = [entry for row in table for entry in row]
                blob = tensors.pack_bytes([entry.encode() for entry in flat]) if binary else None
                data: list[Any] = flat
            else:
                output.update(datatype="FP32", shape=list(probabilities.shape))
                blob = probabilities.astype("<f4").tobytes() if binary else None
                data = [] if binary else probabilities.ravel().tolist()
            if blob is not None:
                output["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                output["data"] = data
            outputs.append(output)
        answer: dict[str, Any] = {"model_name": self.model.name, "model_version": self.version}
        if request_id is not None:
            answer["id"] = request_id
        answer["outputs"] = outputs
        if not blobs:
            return answer
        head = json.dumps(answer, separators=(",", ":")).encode()
        response = flask.Response(head + b"".join(blobs), mimetype="application/octet-stream")
        response.headers[HEADER_LENGTH] = str(len(head))
        return response


def _split(body: bytes, header_length: str | None) -> tuple[bytes | memoryview, memoryview]:
    """The JSON part and the binary tensor data of a request body."""
    if header_length is None:
        return body, memoryview(b"")
    # Digits only (int() would also read " 12", "+12", "1_2" and other scripts' digits), and few
    # enough for int(), which refuses strings of over 4,300 digits with a ValueError (a 500).
    if not re.fullmatch(r"[0-9]{1,18}", header_length):
        raise BadRequest(f"{HEADER_LENGTH} must be a whole number of bytes, got {shown(header_length)}")
    length = int(header_length)
    if length == 0:
        raise BadRequest(f"raw binary requests ({HEADER_LENGTH}: 0) are not supported; send a JSON header first")
    if not 0 < length <= len(body):
        raise BadRequest(f"{HEADER_LENGTH} {length} is beyond the body ({len(body)} bytes after decompression)")
    view = memoryview(body)
    return view[:length], view[length:]


def _half(array: np.ndarray, where: str) -> np.ndarray:
    """JSON numbers declared FP16, as FP16 holds them: what binary FP16 data would have carried,
    so both ways give one answer; a finite number beyond FP16's ±65504 is an error, not infinity."""
    with np.errstate(over="ignore", invalid="ignore"):
        half = array.astype(FLOATS["FP16"])
    if not np.isfinite(half).all() and np.isfinite(array).all():
        raise BadRequest(f"{where}: FP16 values must lie within ±65504")
    return half


def _section(params: dict[str, Any], binary: memoryview, where: str) -> memoryview | None:
    """The input's binary data when it has ``binary_data_size`` (the request has one input, so
    its section is the whole binary part: shorter or longer is an error)."""
    if "binary_data_size" not in params:
        if len(binary):
            raise BadRequest(f"{len(binary)} bytes of binary data follow the JSON, but no input has binary_data_size")
        return None
    size = params["binary_data_size"]
    if type(size) is not int or size < 0:
        raise BadRequest(f"{where}: binary_data_size must be a non-negative integer")
    if size > len(binary):
        raise BadRequest(f"{where}: binary_data_size {size} is beyond the {len(binary)} bytes of binary data")
    if size < len(binary):
        raise BadRequest(f"{len(binary) - size} bytes of binary data left over after {where}")
    return binary


def _parameters(holder: dict[str, Any], where: str) -> dict[str, Any]:
    """``holder``'s ``parameters`` object; absent or null (as KServe allows) is an empty one."""
    params = holder.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise BadRequest(f"{where}: 'parameters' must be an object")
    return params


def _flag(params: dict[str, Any], key: str, default: bool, where: str) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise BadRequest(f"{where}: {shown(key)} must be true or false")
    return value


def _classify(probabilities: np.ndarray, k: int, labels: list[str]) -> list[list[str]]:
    """Triton's classification: per example, the top k as ``"<score>:<index>:<label>"``, best
    first, the score printed as C's ``%f`` (6 decimals) as Triton prints it."""
    top = min(k, probabilities.shape[1])
    return [[f"{row[i]:f}:{i}:{labels[i]}" for i in np.argsort(-row, kind="stable")[:top]] for row in probabilities]
