"""The network issue 13 measures on: the size of the original Thalamus classifier (180x180x3
input, three conv blocks, dense 128, 5 classes), as a Keras model and as a bundle imported from it
with ``train.py --import``. Weights are Keras's initial ones (seeded): speed and memory do not
depend on their values.

bench/bench_predict.py calls, from the project root with .venv's Python (TensorFlow):

    from bench.reference_model import build, keras_model
    bundle = build()        # bench/.cache/models/flowers: model.tflite + model.json, made once (~20 s)
    keras = keras_model()   # bench/.cache/flowers.keras: the same network, for the FastAPI + Keras baseline

``build(models_dir)`` imports it into another folder instead. From a shell:
``.venv/bin/python -m bench.reference_model [--models-dir DIR]`` prints the bundle's folder.
Both run TensorFlow in a child process, so the caller's process never loads it. The cache is
git-ignored; delete bench/.cache to rebuild.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / ".cache"
NAME = "flowers"
LABELS = ("daisy", "dandelion", "roses", "sunflowers", "tulips")
_ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def keras_model(cache: Path = CACHE) -> Path:
    """``cache/flowers.keras``, the reference network, saved on first use."""
    path = cache / f"{NAME}.keras"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{NAME}.partial.keras")  # a build cut short leaves no bad cache
        _run([sys.executable, "-m", "bench.reference_model", "--save-keras", str(partial)])
        partial.rename(path)
    return path


def build(models_dir: Path = CACHE / "models") -> Path:
    """``models_dir/flowers``: the reference network as a Thalamus bundle (``train.py --import``),
    imported on first use."""
    bundle = models_dir / NAME
    if not ((bundle / "model.tflite").exists() and (bundle / "model.json").exists()):
        command = [sys.executable, str(ROOT / "train.py"), "--import", str(keras_model()), "--name", NAME]
        command += ["--labels", ",".join(LABELS), "--models-dir", str(models_dir), "--force"]
        _run(command)
    return bundle


def _run(command: list[str]) -> None:
    """Run a TensorFlow child quietly (TensorFlow logs on stderr whatever it is told); its
    output is shown only when it fails."""
    done = subprocess.run(command, cwd=ROOT, env=_ENV, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command[1:3])} failed ({done.returncode}):\n{done.stdout}{done.stderr}")


def _save_keras(path: Path) -> None:
    import tensorflow as tf  # type: ignore[import-untyped]

    tf.keras.utils.set_random_seed(0)
    layers = tf.keras.layers
    model = tf.keras.Sequential(
        [
            layers.Input((180, 180, 3)),
            layers.Rescaling(1 / 255),
            layers.Conv2D(16, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(32, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(64, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dense(128, activation="relu"),
            layers.Dense(len(LABELS)),
            layers.Softmax(),
        ]
    )
    model.save(path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", type=Path, default=CACHE / "models", help="where the bundle goes")
    parser.add_argument("--save-keras", type=Path, help=argparse.SUPPRESS)  # the child's job
    args = parser.parse_args()
    if args.save_keras:
        _save_keras(args.save_keras)
    else:
        print(build(args.models_dir))
