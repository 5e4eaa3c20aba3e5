"""OpenAPI document of a predict function, specific to the model it serves."""

from typing import Any

from functions.predict import pipeline, spec_protocols
from shared import openapi

# The image formats shared.imaging decodes, as multipart part types.
IMAGE_TYPES = "image/jpeg, image/png, image/webp, image/gif, image/bmp"


def document(meta: dict[str, Any], input_name: str, output_name: str, max_body: int) -> dict[str, Any]:
    """The predict function's OpenAPI 3 document for the model described by ``meta``, whose
    tensors the inference protocols name ``input_name`` and ``output_name``, taking request
    bodies up to ``max_body`` bytes (MAX_UPLOAD_BYTES)."""
    name, labels = meta["name"], meta["labels"]
    spec = meta["input"]
    shares = [97.12, 2.41, 0.47][: len(labels)]
    top = [{"label": label, "confidence": share} for label, share in zip(labels, shares, strict=False)]
    one = {"prediction": labels[0], "confidence": top[0]["confidence"], "top": top}
    model_param = {
        "name": "name",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "enum": [name]},
        "example": name,
    }
    common = {
        "401": openapi.UNAUTHORIZED,
        "403": openapi.insufficient_scope(name),
        "404": openapi.error(
            "This function does not serve that model", f"no such model here: other (this function serves {name})"
        ),
        "405": openapi.METHOD_NOT_ALLOWED,
        "429": openapi.RATE_LIMITED,
        "503": openapi.REDIS_DOWN,
    }
    predict_post = {
        "summary": f"Classify one or more images with {name}",
        "description": (
            f"Labels: {', '.join(labels)}. Images (JPEG, PNG, WebP, GIF first frame, BMP; any "
            f"colour mode; EXIF orientation applied) are resized to {spec['width']}x{spec['height']}. "
            f"Up to {pipeline.MAX_FILES} `file` parts, {max_body} bytes in all; several are answered as "
            "`results`, in upload order, in one model call."
        ),
        "tags": [name],
        "parameters": [model_param],
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {
                                "type": "array",
                                "minItems": 1,
                                "maxItems": pipeline.MAX_FILES,
                                "items": {"type": "string", "format": "binary"},
                                "description": f"1 to {pipeline.MAX_FILES} images: JPEG, PNG, WebP, GIF or BMP",
                            }
                        },
                    },
                    "encoding": {"file": {"contentType": IMAGE_TYPES}},
                }
            },
        },
        "responses": {
            "200": {
                "description": "Predictions",
                "content": {
                    "application/json": {
                        "schema": {
                            "oneOf": [
                                {"$ref": "#/components/schemas/Prediction"},
                                {"$ref": "#/components/schemas/Results"},
                            ]
                        },
                        "examples": {
                            "one file": {"value": one},
                            "several files": {"value": {"results": [{"file": "a.jpg", **one}]}},
                        },
                    }
                },
            },
            "400": openapi.error(
                f"No file, more than {pipeline.MAX_FILES}, an empty file, not an image (or not one of these "
                "formats), a truncated image, too many pixels, too costly to decode together; or a malformed request",
                "file 'cat.txt': not an image; send JPEG, PNG, WebP, GIF or BMP",
            ),
            "415": openapi.error(
                "Not multipart/form-data", "send multipart/form-data with the image(s) in field 'file'"
            ),
            **common,
            "503": openapi.BUSY,
        },
    }
    metadata_get = {
        "summary": f"Metadata of {name}: labels, input size, preprocessing, metrics, version",
        "tags": [name],
        "parameters": [model_param],
        "responses": {
            "200": {
                "description": "model.json of the bundle",
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ModelMetadata"}, "example": meta}
                },
            },
            **common,
        },
    }
    scored = {
        "type": "object",
        "required": ["label", "confidence"],
        "properties": {
            "label": {"type": "string", "enum": labels},
            "confidence": {"type": "number", "minimum": 0, "maximum": 100},
        },
    }
    prediction: dict[str, Any] = {
        "type": "object",
        "required": ["prediction", "confidence", "top"],
        "properties": {
            "prediction": {"type": "string", "enum": labels},
            "confidence": {"type": "number", "minimum": 0, "maximum": 100},
            "top": {"type": "array", "items": scored},
        },
    }
    schemas = {
        "Prediction": prediction,
        "Results": {
            "type": "object",
            "required": ["results"],
            "properties": {
                "results": {
                    "type": "array",
                    "items": {
                        **prediction,
                        "properties": {**prediction["properties"], "file": {"type": "string", "nullable": True}},
                    },
                }
            },
        },
        "ModelMetadata": {
            "type": "object",
            "required": ["name", "version", "labels", "input"],
            "properties": {
                "name": {"type": "string"},
                "version": {"type": "string"},
                "labels": {"type": "array", "items": {"type": "string"}},
                "input": {"type": "object"},
                "preprocessing": {"type": "object"},
                "metrics": {"type": "object"},
                "created": {"type": "string"},
            },
        },
    }
    protocol_paths, protocol_schemas = spec_protocols.paths(meta, input_name, output_name, max_body)
    return openapi.document(
        f"Thalamus model {name}",
        f"Predictions from model `{name}` (version {meta['version']}). Get a token at "
        "`POST /token.json` first (Authorize → oauth2 with your keypair). The same model speaks "
        "KServe / TF Serving V1 (`/v1/models/...`) and the Open Inference Protocol V2 (`/v2/models/...`).",
        {
            "/models/{name}/predict.json": {"post": predict_post},
            "/models/{name}.json": {"get": metadata_get},
            **protocol_paths,
        },
        {**schemas, **protocol_schemas},
        max_body,
    )
