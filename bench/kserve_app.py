"""KServe's Python model server on a Thalamus bundle: the third column of bench/bench_predict.py.

    bench/.venv-kserve/bin/python bench/kserve_app.py --model_dir models/shapes --http_port P --grpc_port G

bench_predict.py does not start this file by hand: ``bench.kserve_env.kserve_command(bundle_dir,
port)`` gives the command (with the interpreter of the separate venv that ``ensure_kserve_python``
makes: kserve's pins clash with the project's) and it is measured like the predict function.

A minimal ``kserve.Model``, as KServe's own custom-model example is written: the bundle's
``model.tflite`` on one LiteRT interpreter (``num_threads=1``, as Thalamus runs it), V1 JSON
``{"instances": [{"b64": "<JPEG>"}]}`` → ``{"predictions": [[p, ...]]}`` in labels order, the
image decoded as Thalamus decodes it (JPEG draft mode to at least the model's input size, then
``resize(BILINEAR, reducing_gap=3)``, scale/offset from ``model.json``), so both servers give the
same probabilities. It checks no token and applies no EXIF orientation (Thalamus does both).

Everything else is KServe's default (kserve 0.21): one uvicorn worker process (``--workers 1``)
with one event loop (uvloop + httptools), which runs this synchronous ``predict`` itself, one
request at a time — so one interpreter serves every request, and the loop's thread pool
(min(32, CPUs + 4) threads) stays idle; the gRPC server is on too (``--grpc_port``, 8081 if not
given, 4 threads); an access log line and a latency log line per request. Runs in the kserve venv
only: it imports nothing of the project.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
from pathlib import Path
from typing import Any

import kserve
import numpy as np
from ai_edge_litert.interpreter import Interpreter
from kserve.errors import InvalidInput
from PIL import Image, UnidentifiedImageError


class BundleModel(kserve.Model):
    """One bundle (``model.tflite`` + ``model.json``), served under the bundle's name."""

    def __init__(self, bundle: Path) -> None:
        self.bundle = bundle
        self.meta: dict[str, Any] = json.loads((bundle / "model.json").read_text())
        super().__init__(self.meta["name"])
        spec = self.meta["input"]
        self.size = (spec["width"], spec["height"])
        self.mode = "L" if spec["channels"] == 1 else "RGB"
        self.scale = np.float32(self.meta["preprocessing"].get("scale", 1.0))
        self.offset = np.float32(self.meta["preprocessing"].get("offset", 0.0))
        self.load()

    def load(self) -> bool:
        self.interpreter = Interpreter(model_path=str(self.bundle / "model.tflite"), num_threads=1)
        self.interpreter.allocate_tensors()
        inp = self.interpreter.get_input_details()[0]
        if inp["shape"][0] != 1:  # one image per invoke, as Thalamus does
            self.interpreter.resize_tensor_input(inp["index"], [1, *inp["shape"][1:]])
            self.interpreter.allocate_tensors()
        self.input_index = inp["index"]
        self.output_index = self.interpreter.get_output_details()[0]["index"]
        self.ready = True
        return self.ready

    def decode(self, data: bytes) -> np.ndarray:
        """Image bytes → the model's input (1, h, w, c), float32, as Thalamus computes it."""
        image = Image.open(io.BytesIO(data))
        if image.format == "JPEG":  # decode straight from the DCT at a reduced scale
            side = max(self.size)
            image.draft("RGB" if image.mode != "L" else "L", (side, side))
        image = image.convert(self.mode).resize(self.size, Image.Resampling.BILINEAR, reducing_gap=3)
        pixels = np.asarray(image, dtype=np.float32).reshape(1, self.size[1], self.size[0], -1)
        return pixels * self.scale + self.offset

    def predict(self, payload: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
        # KServe's V1 route hands predict the request body parsed by orjson (preprocess is the
        # default identity); a synchronous predict runs on the event loop itself. A body sent
        # with a Content-Type other than JSON's arrives as bytes.
        if not isinstance(payload, dict):
            raise InvalidInput("send the body as JSON (Content-Type: application/json)")
        try:
            images = [base64.b64decode(instance["b64"], validate=True) for instance in payload["instances"]]
        except (KeyError, TypeError, binascii.Error) as exc:
            raise InvalidInput(f'expected {{"instances": [{{"b64": "<image>"}}, ...]}} ({exc})') from None
        predictions = []
        for data in images:
            try:
                batch = self.decode(data)
            except (UnidentifiedImageError, OSError, ValueError) as exc:
                raise InvalidInput(f"not a usable image ({exc})") from None
            self.interpreter.set_tensor(self.input_index, batch)
            self.interpreter.invoke()
            predictions.append(self.interpreter.get_tensor(self.output_index)[0].tolist())
        return {"predictions": predictions}


def main() -> None:
    # kserve.model_server parses its own options (--http_port, --grpc_port, --workers, …) from
    # sys.argv when imported; this parser only adds --model_dir next to them.
    parser = argparse.ArgumentParser(parents=[kserve.model_server.parser])
    parser.add_argument("--model_dir", type=Path, required=True, help="a bundle: model.tflite + model.json")
    args, _ = parser.parse_known_args()
    kserve.ModelServer().start([BundleModel(args.model_dir)])


if __name__ == "__main__":
    main()
