"""The OpenAPI paths of the inference protocols (V1 and V2) for one model, with every answer."""

from __future__ import annotations

from typing import Any

from functions.predict import pipeline, v2
from shared import openapi

V1_TAG = "KServe / TF Serving V1"
V2_TAG = "Open Inference Protocol V2"
# A 1x1 PNG, so that "Try it out" in /docs runs as it is (put your image's base64 instead).
IMAGE_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="


def _json(schema: dict[str, Any], example: Any, description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema, "example": example}}}


def _object(properties: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {"type": "object", "required": required or list(properties), "properties": properties, **extra}


def paths(
    meta: dict[str, Any], input_name: str, output_name: str, max_body: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(paths, schemas) of V1 and V2 for the model ``meta`` describes, with bodies up to
    ``max_body`` bytes (after decompression too)."""
    name, version, labels = meta["name"], str(meta["version"]), meta["labels"]
    spec = meta["input"]
    shape = [spec["height"], spec["width"], spec["channels"]]
    n = len(labels)
    probabilities = [round(0.97 if i == 0 else 0.03 / max(1, n - 1), 4) for i in range(n)]
    parameters = {
        "name": {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "enum": [name]}},
        "version": {"name": "version", "in": "path", "required": True, "schema": {"type": "string", "enum": [version]}},
        "label": {"name": "label", "in": "path", "required": True, "schema": {"type": "string", "enum": ["latest"]}},
    }
    errors = {
        "401": openapi.UNAUTHORIZED,
        "403": openapi.insufficient_scope(name),
        "404": openapi.error(
            "Another model, an unknown version or version label", f"model {name} has no version 7 (serving {version})"
        ),
        "405": openapi.METHOD_NOT_ALLOWED,
        "429": openapi.RATE_LIMITED,
        "503": openapi.REDIS_DOWN,
    }
    body_errors = {
        "413": openapi.error(
            f"Body over {max_body} bytes (MAX_UPLOAD_BYTES), on the wire or after gzip/deflate decompression",
            f"request body after gzip decompression too large (limit {max_body} bytes)",
        ),
        "415": openapi.error("A Content-Encoding other than gzip or deflate", "Content-Encoding 'br' is not supported"),
        "503": openapi.BUSY,  # examples that are image files are decoded under the process's budget
    }

    def operation(
        method: str, tag: str, summary: str, ok: dict[str, Any], extra: dict[str, Any] | None = None, **more: Any
    ) -> dict[str, Any]:
        return {
            method: {"summary": summary, "tags": [tag], "responses": {"200": ok, **errors, **(extra or {})}, **more}
        }

    def forms(
        template: str, variants: tuple[str, ...], build: Any, suffix: str = ""
    ) -> dict[str, Any]:  # the model, /versions/{version}, /labels/{label}
        result = {}
        for variant in variants:
            path = template + ("" if variant == "name" else f"/{variant}s/{{{variant}}}") + suffix
            params = [parameters["name"]] + ([] if variant == "name" else [parameters[variant]])
            result[path] = build(params)
        return result

    # -- V1 --------------------------------------------------------------------------------------
    status_example = {
        "name": name,
        "ready": True,
        "model_version_status": [
            {"version": version, "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        ],
    }
    v1_400 = openapi.error(
        "Bad body: not JSON, neither or both of 'instances'/'inputs', a tensor of the wrong shape, "
        "non-numbers or NaN, bad base64, not an image, more than "
        f"{pipeline.MAX_FILES} examples, an unknown signature_name",
        f"instances: shape [1, 3] does not fit the model's input [-1, {', '.join(map(str, shape))}]",
    )
    predict_description = (
        f"Each example is a numeric tensor of shape {shape} (the model's input: pixels × scale + offset "
        'as the bundle\'s preprocessing says) or an image file as `{"b64": "<base64>"}`, decoded like '
        f'an upload. Up to {pipeline.MAX_FILES} examples. `signature_name: "serving_labels"` adds each '
        "example's label. Any Content-Type is accepted; `Content-Encoding: gzip` or `deflate` too."
    )
    v1: dict[str, Any] = {}
    v1 |= forms(
        "/v1/models/{name}",
        ("name", "version", "label"),
        lambda params: operation(
            "get",
            V1_TAG,
            f"Status of {name} (KServe readiness and TF Serving's model status)",
            _json({"$ref": "#/components/schemas/V1Status"}, status_example),
            parameters=params,
        ),
    )
    v1 |= forms(
        "/v1/models/{name}",
        ("name", "version", "label"),
        lambda params: operation(
            "get",
            V1_TAG,
            f"Signatures of {name} (TF Serving's model metadata)",
            _json({"type": "object"}, {"model_spec": {"name": name, "signature_name": "", "version": version}}),
            parameters=params,
        ),
        "/metadata",
    )
    v1 |= forms(
        "/v1/models/{name}",
        ("name", "version", "label"),
        lambda params: operation(
            "post",
            V1_TAG,
            f"Predict with {name} (TF Serving's :predict)",
            {
                "description": "`predictions` for `instances`, `outputs` for `inputs`",
                "content": {
                    "application/json": {
                        "schema": {"$ref": "#/components/schemas/V1PredictResponse"},
                        "examples": {
                            "instances": {"value": {"predictions": [probabilities]}},
                            "inputs": {"value": {"outputs": [probabilities]}},
                            "serving_labels": {
                                "value": {"predictions": [{"probabilities": probabilities, "label": labels[0]}]}
                            },
                        },
                    }
                },
            },
            {"400": v1_400, **body_errors},
            parameters=params,
            description=predict_description,
            requestBody={
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {"$ref": "#/components/schemas/V1PredictRequest"},
                        "examples": {
                            "an image": {"value": {"instances": [{"b64": IMAGE_B64}]}},
                            "named, with labels": {
                                "value": {
                                    "signature_name": "serving_labels",
                                    "instances": [{input_name: {"b64": IMAGE_B64}}],
                                }
                            },
                        },
                    }
                },
            },
        ),
        ":predict",
    )

    # -- V2 --------------------------------------------------------------------------------------
    v2_400 = openapi.error(
        "Bad request: not JSON, a missing field, a datatype other than FP32/FP16/FP64/UINT8/BYTES, a shape "
        "that does not fit, data length not matching the shape, an Inference-Header-Content-Length "
        f"beyond the body, bad base64, not an image, more than {pipeline.MAX_FILES} examples, an "
        "unknown output name",
        f"input '{input_name}': data holds 10 values, shape [1, {', '.join(map(str, shape))}] needs "
        f"{shape[0] * shape[1] * shape[2]}",
    )
    v2_metadata = {
        "name": name,
        "versions": [version],
        "platform": "litert_tflite",
        "inputs": [{"name": input_name, "datatype": "FP32", "shape": [-1, *shape]}],
        "outputs": [{"name": output_name, "datatype": "FP32", "shape": [-1, n]}],
    }
    infer_answer = {
        "model_name": name,
        "model_version": version,
        "id": "42",
        "outputs": [{"name": output_name, "datatype": "FP32", "shape": [1, n], "data": probabilities}],
    }
    classified = {
        "model_name": name,
        "model_version": version,
        "outputs": [
            {"name": output_name, "datatype": "BYTES", "shape": [1, 1], "data": [f"{probabilities[0]:f}:0:{labels[0]}"]}
        ],
    }
    infer_description = (
        f"One input: FP32 (FP16, FP64) of shape [n, {', '.join(map(str, shape))}] (the model's input), UINT8 of "
        "that shape (raw pixels), or BYTES of shape [n] holding image files (base64 strings in JSON). "
        "Binary tensor data extension: send `Inference-Header-Content-Length: <JSON bytes>`, the JSON "
        "with `parameters.binary_data_size` on the input, then the little-endian tensor bytes (BYTES: "
        "each element as a 4-byte length and its bytes); ask for binary outputs with "
        "`binary_data: true` (answered as `application/octet-stream` with the same header). "
        'Classification extension: `"parameters": {"classification": k}` on the output answers '
        '`"score:index:label"` strings. Any Content-Type; `Content-Encoding: gzip` or `deflate` too.'
    )
    header_length = {
        "name": "Inference-Header-Content-Length",
        "in": "header",
        "required": False,
        "description": "binary tensor data extension: the length of the JSON that starts the body",
        "schema": {"type": "integer", "minimum": 1},
    }
    v2: dict[str, Any] = {}
    v2 |= forms(
        "/v2/models/{name}",
        ("name", "version"),
        lambda params: operation(
            "get",
            V2_TAG,
            f"Metadata of {name}: input and output names, datatypes, shapes",
            _json({"$ref": "#/components/schemas/V2ModelMetadata"}, v2_metadata),
            parameters=params,
        ),
    )
    v2 |= forms(
        "/v2/models/{name}",
        ("name", "version"),
        lambda params: operation(
            "get",
            V2_TAG,
            f"Readiness of {name}",
            _json(_object({"name": {"type": "string"}, "ready": {"type": "boolean"}}), {"name": name, "ready": True}),
            parameters=params,
        ),
        "/ready",
    )
    v2 |= forms(
        "/v2/models/{name}",
        ("name", "version"),
        lambda params: operation(
            "get",
            V2_TAG,
            f"Triton model configuration of {name} (max_batch_size, input format)",
            _json({"type": "object"}, {"name": name, "max_batch_size": pipeline.MAX_FILES}),
            parameters=params,
        ),
        "/config",
    )
    v2 |= forms(
        "/v2/models/{name}",
        ("name", "version"),
        lambda params: operation(
            "post",
            V2_TAG,
            f"Infer with {name}",
            {
                "description": "The requested outputs (JSON), or JSON plus binary tensor data",
                "headers": {
                    "Inference-Header-Content-Length": {
                        "description": "length of the JSON part when binary data follows",
                        "schema": {"type": "integer"},
                    }
                },
                "content": {
                    "application/json": {
                        "schema": {"$ref": "#/components/schemas/V2InferResponse"},
                        "examples": {"probabilities": {"value": infer_answer}, "classification": {"value": classified}},
                    },
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                },
            },
            {"400": v2_400, **body_errors},
            parameters=[*params, header_length],
            description=infer_description,
            requestBody={
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {"$ref": "#/components/schemas/V2InferRequest"},
                        "examples": {
                            "an image": {
                                "value": {
                                    "id": "42",
                                    "inputs": [
                                        {"name": input_name, "datatype": "BYTES", "shape": [1], "data": [IMAGE_B64]}
                                    ],
                                }
                            },
                            "top label": {
                                "value": {
                                    "inputs": [
                                        {"name": input_name, "datatype": "BYTES", "shape": [1], "data": [IMAGE_B64]}
                                    ],
                                    "outputs": [{"name": output_name, "parameters": {"classification": 1}}],
                                }
                            },
                        },
                    },
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                },
            },
        ),
        "/infer",
    )
    return {**v1, **v2}, _schemas(labels, input_name, output_name)


def _schemas(labels: list[str], input_name: str, output_name: str) -> dict[str, Any]:
    # A V1 example: nested lists of numbers (the model's input) or an image file, bare or named
    # after the model's input (TF Serving's named form). `inputs` (columnar) holds the batch.
    numbers = {"type": "array", "minItems": 1, "description": "nested lists of numbers"}
    image = {
        "type": "object",
        "required": ["b64"],
        "additionalProperties": False,
        "properties": {"b64": {"type": "string", "description": "an image file (JPEG, PNG, WebP, GIF, BMP), base64"}},
    }
    named = {
        "type": "object",
        "required": [input_name],
        "additionalProperties": False,
        "properties": {input_name: {"oneOf": [numbers, image]}},
    }
    tensor = {"oneOf": [numbers, image, named]}
    parameters = {"type": "object", "nullable": True}
    output = _object(
        {
            "name": {"type": "string"},
            "datatype": {"type": "string", "enum": ["FP32", "BYTES"]},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "data": {"type": "array", "items": {}},
            "parameters": {"type": "object"},
        },
        ["name", "datatype", "shape"],
    )
    return {
        "V1Status": _object(
            {
                "name": {"type": "string"},
                "ready": {"type": "boolean"},
                "model_version_status": {"type": "array", "items": {"type": "object"}},
            }
        ),
        "V1PredictRequest": {
            "type": "object",
            "description": "exactly one of `instances` (row form) and `inputs` (columnar form)",
            "properties": {
                "signature_name": {"type": "string", "enum": ["", "serving_default", "serving_labels"]},
                "instances": {"type": "array", "items": tensor, "minItems": 1, "maxItems": pipeline.MAX_FILES},
                "inputs": tensor,
            },
            "oneOf": [{"required": ["instances"]}, {"required": ["inputs"]}],
        },
        "V1PredictResponse": {
            "type": "object",
            "properties": {
                "predictions": {
                    "type": "array",
                    "items": {
                        "oneOf": [
                            {"type": "array", "items": {"type": "number"}},
                            _object(
                                {
                                    "probabilities": {"type": "array", "items": {"type": "number"}},
                                    "label": {"type": "string", "enum": labels},
                                }
                            ),
                        ]
                    },
                },
                "outputs": {
                    "oneOf": [
                        {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
                        {"type": "object"},
                    ]
                },
            },
        },
        "V2ModelMetadata": _object(
            {
                "name": {"type": "string"},
                "versions": {"type": "array", "items": {"type": "string"}},
                "platform": {"type": "string"},
                "inputs": {"type": "array", "items": {"type": "object"}},
                "outputs": {"type": "array", "items": {"type": "object"}},
            },
            ["name", "platform", "inputs", "outputs"],
        ),
        "V2InferRequest": _object(
            {
                "id": {"type": "string", "nullable": True, "maxLength": v2.MAX_ID_CHARS},
                "parameters": parameters,
                "inputs": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 1,
                    "items": _object(
                        {
                            "name": {"type": "string"},
                            "datatype": {"type": "string", "enum": ["FP32", "FP16", "FP64", "UINT8", "BYTES"]},
                            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                            "data": {"type": "array", "items": {}},
                            "parameters": parameters,
                        },
                        ["name", "datatype", "shape"],
                    ),
                },
                "outputs": {
                    "type": "array",
                    "nullable": True,
                    "items": _object(
                        {"name": {"type": "string", "enum": [output_name]}, "parameters": parameters}, ["name"]
                    ),
                },
            },
            ["inputs"],
        ),
        "V2InferResponse": _object(
            {
                "model_name": {"type": "string"},
                "model_version": {"type": "string"},
                "id": {"type": "string"},
                "outputs": {"type": "array", "items": output},
            },
            ["model_name", "outputs"],
        ),
    }
