"""The prediction pipeline every protocol shares: decode → infer → encode.

A route reads its request into :class:`Upload` objects (or a ready tensor), calls
:func:`decode` and :func:`infer`, and writes the probabilities in its own protocol's form;
:func:`encode` is the multipart route's form.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from functions.predict.model import Model
from shared import imaging, metrics
from shared.errors import BadRequest, shown

MAX_FILES = 32  # images per request; all are decoded, then answered by one batched model call


@dataclass(frozen=True)
class Upload:
    """One encoded image from a request, with the name the client gave it (if any)."""

    data: bytes
    filename: str | None = None


def decode(model: Model, uploads: Sequence[Upload], limits: imaging.Limits) -> np.ndarray:
    """Encoded images → the model's input batch: float32 of shape (n, height, width, channels),
    preprocessed as the bundle says. Every header is checked before any image is decoded; each
    decode holds its share of the process's memory budget. Raises BadRequest naming the file and
    the problem (no image, too many, not an image, truncated, too large, too costly together),
    or ServiceUnavailable when the budget stays taken by other requests."""
    if not uploads:
        raise BadRequest("no image in the request")
    if len(uploads) > MAX_FILES:
        raise BadRequest(f"too many images: {len(uploads)} (limit {MAX_FILES} per request)")
    spec, preprocessing = model.meta["input"], model.meta["preprocessing"]
    if len(uploads) > 1:  # several: refuse the request from their headers, before any decode
        costs = []
        for upload in uploads:
            with _named(upload, uploads):
                costs.append(imaging.header_cost(upload.data, limits, (spec["width"], spec["height"])))
        imaging.check_request(costs, limits)
    batch = np.empty((len(uploads), spec["height"], spec["width"], spec["channels"]), np.float32)
    for row, upload in zip(batch, uploads, strict=True):
        with _named(upload, uploads), metrics.DECODE_SECONDS.labels(model.name).time():
            imaging.model_input(upload.data, limits, spec, preprocessing, out=row)
    return batch


@contextmanager
def _named(upload: Upload, uploads: Sequence[Upload]) -> Iterator[None]:
    """BadRequest messages inside name the file they are about: by its name, else (one of
    several: a browser's empty file input has none) by its place."""
    try:
        yield
    except BadRequest as exc:
        if upload.filename:
            label = f"file {shown(upload.filename)}"
        elif len(uploads) > 1:
            label = f"file {next(i for i, each in enumerate(uploads, 1) if each is upload)} of {len(uploads)}"
        else:
            label = "file"
        raise BadRequest(f"{label}: {exc.message}") from None


def infer(model: Model, batch: np.ndarray) -> np.ndarray:
    """The model's class probabilities for ``batch``: float32 of shape (n, len(labels)).
    BadRequest when they are not numbers: finite inputs far outside what the model takes (a
    numeric tensor of ±3e38, say) overflow inside it, and NaN is neither an answer nor JSON."""
    metrics.BATCH_SIZE.labels(model.name).observe(len(batch))
    with metrics.INFERENCE_SECONDS.labels(model.name).time():
        probabilities = model.predict(batch)
    if not np.isfinite(probabilities).all():
        raise BadRequest("the model's output is not a number for these inputs: send values in the range its "
                         "preprocessing produces (see the model's metadata)")  # fmt: skip
    return probabilities


def encode(model: Model, probabilities: np.ndarray, uploads: Sequence[Upload], top_k: int = 5) -> dict[str, Any]:
    """The multipart route's answer: ``{"prediction", "confidence", "top"}`` for one image,
    ``{"results": [...]}`` (each with its ``file`` name) for several, in upload order.
    Confidences are percentages rounded to 2 decimals; ``top`` lists up to ``top_k`` labels."""
    answers = []
    for row in probabilities:
        order = np.argsort(row)[::-1][: min(top_k, len(model.labels))]
        top = [{"label": model.labels[i], "confidence": round(float(row[i]) * 100, 2)} for i in order]
        answers.append({"prediction": top[0]["label"], "confidence": top[0]["confidence"], "top": top})
    if len(answers) == 1:
        return answers[0]
    return {"results": [{"file": u.filename, **a} for u, a in zip(uploads, answers, strict=True)]}
