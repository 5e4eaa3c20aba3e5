#!/usr/bin/env python3
"""Train or import an image classifier into a Thalamus model bundle (needs TensorFlow).

    ./train.py DATASET_DIR --name NAME [--epochs N --batch-size N --image-size HxW
                                        --validation-split F --grayscale --force]
    ./train.py --demo shapes|arrows [--force]         # generate images, train, evaluate
    ./train.py --import MODEL --name NAME --labels a,b,c [--scale F --offset F --add-softmax --force]

DATASET_DIR holds one subfolder per class with images inside. The bundle is written to
models/NAME/ (model.tflite + model.json) only after the TFLite model and the TensorFlow model
agree on sample inputs (max abs difference of outputs <= 1e-4 of their scale). A held-out
accuracy near chance is reported; an imported model whose outputs are raw scores rather than
probabilities is refused unless --add-softmax (or --raw-outputs) says what to do.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
TRAIN_REQUIREMENTS = "pip install -r requirements-train.txt"

if any(importlib.util.find_spec(name) is None for name in ("numpy", "PIL", "tensorflow")):
    # Run by a python without the packages: use the project's .venv when it exists.
    venv_python = ROOT / ".venv" / "bin" / "python"
    if venv_python.exists() and Path(sys.prefix).resolve() != venv_python.parent.parent.resolve():
        os.execv(str(venv_python), [str(venv_python), __file__, *sys.argv[1:]])

try:
    import numpy as np

    import demo_data
    from shared import imaging
    from shared.keyrecords import MODEL_NAME_RULE, is_model_name
except ImportError as missing:
    sys.exit(
        f"train.py: {missing.name} is missing; run: {TRAIN_REQUIREMENTS} (in .venv: .venv/bin/{TRAIN_REQUIREMENTS})"
    )

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # read when TensorFlow is imported, below

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}
# TFLite and TensorFlow outputs may differ by this much, relative to the outputs' scale (the
# largest absolute output, at least 1): raw scores in the hundreds get a proportionate margin.
TOLERANCE = 1e-4
LIMITS = imaging.Limits(max_pixels=10**9, cpu_seconds=float("inf"))  # an admin's own files: no budget
# A held-out accuracy below chance + this share of the way from chance to 1 gets a warning.
NEAR_CHANCE = 0.1
# The demo models: image size, colour, training set size, epochs; held-out set size.
DEMO_SETTINGS = {
    "shapes": {"size": (64, 64), "channels": 3, "per_class": 2000, "epochs": 18, "holdout_per_class": 400},
    "arrows": {"size": (48, 48), "channels": 1, "per_class": 1500, "epochs": 15, "holdout_per_class": 300},
}


class TrainError(Exception):
    """A one-line reason to stop."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The docstring as written, and each option's default (when it has one)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is not None and action.default is not False and action.default != argparse.SUPPRESS:
            text += " (default: %(default)s)"
        return text


def import_tensorflow():
    """TensorFlow, or a TrainError saying in one line how to install it."""
    try:
        import tensorflow as tf
    except ImportError:
        raise TrainError(
            f"TensorFlow is missing: {TRAIN_REQUIREMENTS} (in .venv: .venv/bin/{TRAIN_REQUIREMENTS})"
        ) from None
    return tf


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("dataset", nargs="?", type=Path, help="folder with one subfolder per class")
    parser.add_argument("--demo", choices=sorted(DEMO_SETTINGS), help="train a demo model on generated images")
    parser.add_argument(
        "--import",
        dest="import_path",
        type=Path,
        metavar="MODEL",
        help="a Keras file (.keras, .h5) or SavedModel folder to bundle",
    )
    parser.add_argument("--name", help="bundle name (models/NAME)")
    parser.add_argument("--labels", metavar="A,B,C", help="with --import: comma-separated labels, in output order")
    parser.add_argument("--epochs", type=int, metavar="N", default=10, help="training passes over the data")
    parser.add_argument("--batch-size", type=int, metavar="N", default=64, help="images per training step")
    parser.add_argument("--image-size", metavar="HxW", default="64x64", help="HxW the model takes")
    parser.add_argument("--grayscale", action="store_true", help="train on one channel")
    parser.add_argument("--validation-split", type=float, metavar="F", default=0.2, help="share of images held out")
    parser.add_argument(
        "--scale", type=float, metavar="F", default=1.0, help="with --import: input = pixel * scale + offset"
    )
    parser.add_argument("--offset", type=float, metavar="F", default=0.0, help="with --import: see --scale")
    parser.add_argument(
        "--add-softmax",
        action="store_true",
        help="with --import: bundle a softmax after a model that outputs raw scores",
    )
    parser.add_argument(
        "--raw-outputs",
        action="store_true",
        help="with --import: bundle raw-score outputs as they are (confidences will not be probabilities)",
    )
    parser.add_argument(
        "--models-dir", type=Path, metavar="DIR", default=ROOT / "models", help="where bundles are written"
    )
    parser.add_argument("--seed", type=int, metavar="N", default=7, help="random seed (data order, initial weights)")
    parser.add_argument("--force", action="store_true", help="replace an existing bundle")
    args = parser.parse_args(argv)
    modes = sum(x is not None for x in (args.dataset, args.demo, args.import_path))
    if modes != 1:
        parser.error("give exactly one of DATASET_DIR, --demo NAME, --import MODEL")
    if args.demo:
        args.name = args.name or args.demo
    if not args.name:
        parser.error("--name is required")
    if not is_model_name(args.name):  # a URL path segment, a key's scope, part of a Service's name
        parser.error(f"--name {args.name!r}: {MODEL_NAME_RULE}")
    if args.import_path and not args.labels:
        parser.error("--import needs --labels")
    if (args.add_softmax or args.raw_outputs) and not args.import_path:
        parser.error("--add-softmax and --raw-outputs go with --import")
    if args.add_softmax and args.raw_outputs:
        parser.error("give --add-softmax or --raw-outputs, not both")
    if not 0 < args.validation_split < 1:
        parser.error("--validation-split must be between 0 and 1")
    try:
        h, w = (int(v) for v in args.image_size.lower().split("x"))
        assert h > 0 and w > 0
    except (ValueError, AssertionError):
        parser.error(f"--image-size must look like 64x64, got {args.image_size!r}")
    args.size = (h, w)
    return args


def load_folder(root: Path, spec: dict) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images under root/<class>/ decoded and preprocessed exactly as serving does."""
    if not root.is_dir():
        raise TrainError(f"{root} is not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise TrainError(f"empty dataset: {root} has no class subfolders")
    xs, ys, skipped = [], [], 0
    for index, label in enumerate(classes):
        files = sorted(p for p in (root / label).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise TrainError(f"class {label!r} has no images in {root / label}")
        before = len(xs)
        for path in files:
            try:
                pixels = imaging.model_input(path.read_bytes(), LIMITS, spec, {})
            except Exception:  # noqa: BLE001  (any unreadable file is skipped and counted)
                skipped += 1
                continue
            xs.append(pixels.astype(np.uint8))
            ys.append(index)
        if len(xs) == before:
            raise TrainError(f"class {label!r} has no readable images")
    if skipped:
        print(f"skipped {skipped} unreadable image(s)")
    print(f"loaded {len(xs)} images in {len(classes)} classes: {', '.join(classes)}")
    return np.stack(xs), np.array(ys), classes


def build_model(tf, spec: dict, classes: int):
    """A small CNN: four conv blocks with batch norm (folded into the convs by the converter)."""
    layers = tf.keras.layers

    def block(filters: int) -> list:
        return [
            layers.Conv2D(filters, 3, padding="same", use_bias=False),
            layers.BatchNormalization(),
            layers.ReLU(),
            layers.MaxPooling2D(),
        ]

    return tf.keras.Sequential(
        [
            layers.Input((spec["height"], spec["width"], spec["channels"])),
            layers.Rescaling(1 / 127.5, offset=-1),  # the bundle takes raw 0..255 pixels
            *block(16),
            *block(32),
            *block(64),
            *block(64),
            layers.Flatten(),
            layers.Dropout(0.3),
            layers.Dense(64, activation="relu"),
            layers.Dense(classes, activation="softmax"),
        ]
    )


def train(tf, x: np.ndarray, y: np.ndarray, classes: list[str], spec: dict, args):
    """The trained model, its validation accuracy and the validation images and labels."""
    order = np.random.default_rng(args.seed).permutation(len(x))
    x, y = x[order], y[order]
    n_val = max(1, int(len(x) * args.validation_split))
    model = build_model(tf, spec, len(classes))
    steps = args.epochs * -(-(len(x) - n_val) // args.batch_size)
    # Cosine decay ends training at a small learning rate, so the last epoch is a stable one.
    schedule = tf.keras.optimizers.schedules.CosineDecay(2e-3, steps, alpha=0.02)
    model.compile(
        optimizer=tf.keras.optimizers.Adam(schedule), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    model.fit(
        x[n_val:].astype(np.float32),
        y[n_val:],
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=(x[:n_val].astype(np.float32), y[:n_val]),
        verbose=1 if sys.stdout.isatty() else 2,
    )
    _, val_accuracy = model.evaluate(x[:n_val].astype(np.float32), y[:n_val], verbose=0)
    return model, float(val_accuracy), x[:n_val], y[:n_val]


def run_tflite(tflite: bytes, batch: np.ndarray) -> np.ndarray:
    """Outputs of the TFLite model for ``batch`` (float32), in one call, with the serving runtime."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=tflite)
    inp = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(inp["index"], list(batch.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], batch.astype(np.float32))
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def convert_and_check(converter, samples: np.ndarray, reference) -> tuple[bytes, float, float]:
    """TFLite bytes, the max abs difference from ``reference`` on ``samples``, and the tolerance
    it had to stay within (:data:`TOLERANCE` of the outputs' scale), else TrainError."""
    tflite = converter.convert()
    expected = np.asarray(reference(samples))
    tolerance = TOLERANCE * max(1.0, float(np.max(np.abs(expected))))
    diff = float(np.max(np.abs(run_tflite(tflite, samples) - expected)))
    if diff > tolerance:
        raise TrainError(
            f"TFLite and TensorFlow disagree (max abs diff {diff:.2e} > {tolerance:.2e}); bundle not written"
        )
    return tflite, diff, tolerance


def outputs_are_probabilities(outputs: np.ndarray) -> bool:
    """True when every row is in [0, 1] and sums to 1: what serving reports as confidences."""
    return bool(np.all(outputs >= -1e-6) and np.all(outputs <= 1 + 1e-6) and np.allclose(outputs.sum(-1), 1, atol=1e-3))


def warn_if_near_chance(accuracy: float, labels: np.ndarray, what: str) -> float:
    """Warn on stderr when ``accuracy`` is close to always answering the most common class."""
    chance = float(np.bincount(labels).max() / len(labels))
    if accuracy < chance + NEAR_CHANCE * (1 - chance):
        print(
            f"train.py: warning: {what} accuracy {accuracy:.2f} is near chance ({chance:.2f}, always answering "
            "the most common class): the bundle will mostly guess; try more images, more --epochs or a "
            "larger --image-size",
            file=sys.stderr,
        )
    return chance


def tflite_accuracy(tflite: bytes, x: np.ndarray, y: np.ndarray) -> float:
    return float((run_tflite(tflite, x).argmax(1) == y).mean())


def write_bundle(target: Path, tflite: bytes, meta: dict, force: bool) -> None:
    """Write model.tflite + model.json atomically (a half-written bundle is never served)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    (staging / "model.tflite").write_bytes(tflite)
    (staging / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    staging.chmod(0o755)
    if target.exists():
        if not force:
            shutil.rmtree(staging)
            raise TrainError(f"{target} exists; use --force to replace it")
        shutil.rmtree(target)
    staging.rename(target)


def metadata(name: str, labels: list[str], spec: dict, preprocessing: dict, metrics: dict) -> dict:
    return {
        "name": name,
        "version": datetime.datetime.now(datetime.UTC).strftime("%Y%m%d%H%M%S"),
        "labels": labels,
        "input": {**spec, "dtype": "float32"},
        "preprocessing": {
            "resize": "stretch",
            "interpolation": "bilinear",
            "color_mode": "grayscale" if spec["channels"] == 1 else "rgb",
            **preprocessing,
        },
        "metrics": metrics,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def run(args) -> Path:
    target = args.models_dir / args.name
    if target.exists() and not args.force:
        raise TrainError(f"{target} exists; use --force to replace it")
    if importlib.util.find_spec("tensorflow") is None:
        import_tensorflow()  # says how to install it, before any slow work
    started = time.monotonic()
    if args.import_path:
        tf = import_tensorflow()
        tf.keras.utils.set_random_seed(args.seed)
        return import_model(tf, args, target)
    holdout = None
    if args.demo:
        demo = DEMO_SETTINGS[args.demo]
        args.size, args.grayscale, args.epochs = demo["size"], demo["channels"] == 1, demo["epochs"]
        tmp = Path(tempfile.mkdtemp(prefix="thalamus-demo-"))
        print(f"generating {args.demo} images in {tmp}")
        args.dataset = demo_data.write_dataset(args.demo, tmp / "train", demo["per_class"], args.seed)
        holdout = demo_data.write_dataset(args.demo, tmp / "holdout", demo["holdout_per_class"], args.seed + 1000)
    spec = {"height": args.size[0], "width": args.size[1], "channels": 1 if args.grayscale else 3}
    x, y, classes = load_folder(args.dataset, spec)  # dataset errors before the slow TF import
    tf = import_tensorflow()
    tf.keras.utils.set_random_seed(args.seed)
    model, val_accuracy, val_x, val_y = train(tf, x, y, classes, spec, args)
    samples = x[: min(64, len(x))].astype(np.float32)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    tflite, diff, _ = convert_and_check(converter, samples, lambda s: model(s, training=False))
    metrics = {
        "val_accuracy": round(val_accuracy, 4),
        "train_images": int(len(x)),
        "tflite_max_abs_diff": diff,
        "train_seconds": round(time.monotonic() - started, 1),
    }
    if holdout is not None:
        hx, hy, _ = load_folder(holdout, spec)
        metrics["holdout_accuracy"] = round(tflite_accuracy(tflite, hx, hy), 4)
        metrics["holdout_images"] = int(len(hx))
        shutil.rmtree(holdout.parent)
        metrics["chance_accuracy"] = round(warn_if_near_chance(metrics["holdout_accuracy"], hy, "held-out"), 4)
    else:
        metrics["chance_accuracy"] = round(warn_if_near_chance(val_accuracy, val_y, "held-out (validation)"), 4)
    write_bundle(target, tflite, metadata(args.name, classes, spec, {"scale": 1.0, "offset": 0.0}, metrics), args.force)
    print(f"wrote {target} ({len(tflite) / 1024:.0f} KiB): " + ", ".join(f"{k}={v}" for k, v in metrics.items()))
    return target


def load_imported(tf, path: Path):
    """(TFLite converter maker, input shape, reference function) of a Keras file or SavedModel;
    the converter maker takes ``softmax`` to append a softmax to the outputs."""
    if not path.exists():
        raise TrainError(f"{path} not found")
    if path.is_dir():
        try:
            loaded = tf.saved_model.load(str(path))
            fn = loaded.signatures["serving_default"]
        except (OSError, ValueError, KeyError) as exc:
            raise TrainError(f"cannot load {path} as a SavedModel with a serving_default signature ({exc})") from None
        ((name, spec),) = fn.structured_input_signature[1].items()

        def reference(s, softmax=False):
            out = next(iter(fn(**{name: tf.constant(s, tf.float32)}).values()))
            return (tf.nn.softmax(out) if softmax else out).numpy()

        def converter(softmax: bool):
            if not softmax:
                return tf.lite.TFLiteConverter.from_saved_model(str(path))
            wrapped = tf.function(lambda x: tf.nn.softmax(next(iter(fn(**{name: x}).values()))))
            concrete = wrapped.get_concrete_function(tf.TensorSpec(spec.shape, tf.float32))
            return tf.lite.TFLiteConverter.from_concrete_functions([concrete], loaded)

        return converter, spec.shape, reference
    try:
        model = tf.keras.models.load_model(path)
    except (OSError, ValueError) as exc:
        raise TrainError(f"cannot load {path} as a Keras model ({exc})") from None
    with_softmax = tf.keras.Sequential(
        [tf.keras.layers.Input(model.inputs[0].shape[1:]), model, tf.keras.layers.Softmax()]
    )

    def keras_reference(s, softmax=False):
        return np.asarray((with_softmax if softmax else model)(s, training=False))

    return (
        lambda softmax: tf.lite.TFLiteConverter.from_keras_model(with_softmax if softmax else model),
        model.inputs[0].shape,
        keras_reference,
    )


def import_model(tf, args, target: Path) -> Path:
    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    path = args.import_path
    converter, shape, reference = load_imported(tf, path)
    if len(shape) != 4 or shape[3] not in (1, 3):
        raise TrainError(f"model input {tuple(shape)} is not (batch, height, width, 1 or 3)")
    spec = {"height": int(shape[1]), "width": int(shape[2]), "channels": int(shape[3])}
    rng = np.random.default_rng(args.seed)
    samples = (rng.uniform(0, 255, (8, *shape[1:])) * args.scale + args.offset).astype(np.float32)
    raw = np.asarray(reference(samples))
    if raw.shape[-1] != len(labels):
        raise TrainError(f"model has {raw.shape[-1]} outputs but {len(labels)} labels were given")
    probabilities = outputs_are_probabilities(raw)
    if not probabilities and not (args.add_softmax or args.raw_outputs):
        raise TrainError(
            f"the model's outputs are raw scores, not probabilities (from {raw.min():.3g} to {raw.max():.3g}, "
            f"rows summing to {raw.sum(-1).mean():.3g}), and serving reports them as confidences: run again "
            "with --add-softmax to bundle a softmax after them (or --raw-outputs to keep them as they are)"
        )
    softmax = args.add_softmax and not probabilities
    if args.add_softmax and probabilities:
        print("train.py: the outputs are already probabilities; no softmax added", file=sys.stderr)
    tflite, diff, tolerance = convert_and_check(converter(softmax), samples, lambda s: reference(s, softmax))
    metrics = {"tflite_max_abs_diff": diff, "tflite_tolerance": tolerance, "imported_from": path.name}
    metrics["outputs"] = "probabilities" if probabilities or softmax else "raw scores"
    if softmax:
        metrics["softmax_added"] = True
    meta = metadata(args.name, labels, spec, {"scale": args.scale, "offset": args.offset}, metrics)
    write_bundle(target, tflite, meta, args.force)
    print(f"wrote {target} ({len(tflite) / 1024:.0f} KiB) from {path}" + (" with a softmax added" if softmax else ""))
    return target


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except TrainError as exc:
        print(f"train.py: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
