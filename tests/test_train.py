"""./train.py as admins run it: tiny generated datasets, one or two epochs, and its errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import demo_data
from local import ROOT
from local.helpers import demo_image, encode
from tests.conftest import predict_client
from tests.test_predict import upload

pytestmark = pytest.mark.slow


def train(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600
    )


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """A model trained by ./train.py on a tiny generated shapes dataset (2 epochs)."""
    root = tmp_path_factory.mktemp("train")
    dataset = demo_data.write_dataset("shapes", root / "data", 12, seed=3)
    (dataset / "circle" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    result = train(
        dataset,
        "--name",
        "tiny",
        "--epochs",
        2,
        "--image-size",
        "24x32",
        "--batch-size",
        8,
        "--models-dir",
        root / "models",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return root / "models" / "tiny", result


def test_training_writes_a_bundle_the_predict_function_serves(tiny_bundle, settings, bearer):
    bundle, result = tiny_bundle
    assert "skipped 1 unreadable image" in result.stdout
    assert "Epoch 2/2" in result.stdout  # a progress line per epoch
    meta = json.loads((bundle / "model.json").read_text())
    assert meta["labels"] == ["circle", "square", "triangle"]
    assert meta["input"] == {"height": 24, "width": 32, "channels": 3, "dtype": "float32"}
    assert 0 <= meta["metrics"]["val_accuracy"] <= 1
    assert meta["metrics"]["tflite_max_abs_diff"] <= 1e-4
    assert meta["version"] and meta["created"]
    client = predict_client(settings, "tiny", bundle.parent)
    reply = upload(client, bearer, ("c.png", encode(demo_image("shapes", "circle"))), name="tiny")
    assert reply.status_code == 200
    assert reply.get_json()["prediction"] in meta["labels"]


def test_existing_bundle_needs_force(tiny_bundle):
    bundle, _ = tiny_bundle
    before = (bundle / "model.tflite").read_bytes()
    result = train(bundle.parent.parent / "data", "--name", "tiny", "--models-dir", bundle.parent)
    assert result.returncode == 1 and "--force" in result.stderr
    assert (bundle / "model.tflite").read_bytes() == before


def test_import_keras_model(tmp_path, settings, bearer):
    script = f"""
import tensorflow as tf
tf.keras.utils.set_random_seed(1)
m = tf.keras.Sequential([tf.keras.layers.Input((20, 20, 1)), tf.keras.layers.Rescaling(1 / 255),
                         tf.keras.layers.Flatten(), tf.keras.layers.Dense(2, activation="softmax")])
m.save({str(tmp_path / "m.keras")!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=300)
    result = train(
        "--import",
        tmp_path / "m.keras",
        "--name",
        "imported",
        "--labels",
        "yes,no",
        "--models-dir",
        tmp_path / "models",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    meta = json.loads((tmp_path / "models/imported/model.json").read_text())
    assert meta["labels"] == ["yes", "no"] and meta["input"]["channels"] == 1
    client = predict_client(settings, "imported", tmp_path / "models")
    reply = upload(client, bearer, ("x.png", encode(Image.new("L", (50, 40), 200))), name="imported")
    assert reply.status_code == 200 and reply.get_json()["prediction"] in ("yes", "no")

    wrong = train(
        "--import", tmp_path / "m.keras", "--name", "wrong", "--labels", "a,b,c", "--models-dir", tmp_path / "models"
    )
    assert wrong.returncode == 1 and "3 labels" in wrong.stderr
    assert not (tmp_path / "models/wrong").exists()


def test_empty_dataset(tmp_path):
    (tmp_path / "data").mkdir()
    result = train(tmp_path / "data", "--name", "x", "--models-dir", tmp_path / "m")
    assert result.returncode == 1 and "empty dataset" in result.stderr


def test_class_without_images(tmp_path):
    (tmp_path / "data/cats").mkdir(parents=True)
    (tmp_path / "data/dogs").mkdir()
    Image.new("RGB", (10, 10)).save(tmp_path / "data/cats/a.png")
    result = train(tmp_path / "data", "--name", "x", "--models-dir", tmp_path / "m")
    assert result.returncode == 1 and "'dogs' has no images" in result.stderr


def test_usage_errors():
    assert train().returncode == 2
    assert train("--import", "x.keras", "--name", "n").returncode == 2  # no --labels
    assert train("d", "--name", "n", "--image-size", "big").returncode == 2
    assert train("d", "--name", "n", "--add-softmax").returncode == 2  # only with --import
    for name in ("Shapes_V2", "-shapes", "a" * 64, "shapes.v2"):  # no route, key scope or Service could name it
        refused = train("d", f"--name={name}")
        assert refused.returncode == 2 and "lowercase letters, digits and -" in refused.stderr


def test_help_shows_the_defaults():
    result = train("--help")
    assert result.returncode == 0
    for default in ("(default: 10)", "(default: 64)", "(default: 64x64)", "(default: 0.2)", "(default: 7)"):
        assert default in result.stdout


def test_runs_with_a_python_that_lacks_the_packages():
    # The interpreter the venv was made from, without its site-packages (-S): it has none of them.
    base_python = Path(sys.base_prefix) / "bin" / "python3"
    result = subprocess.run(
        [base_python, "-S", str(ROOT / "train.py"), "--help"],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"]},
        timeout=120,
    )
    assert result.returncode == 0 and "--add-softmax" in result.stdout


def test_missing_tensorflow_is_one_line_saying_what_to_install(tmp_path):
    fake = tmp_path / "site" / "tensorflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named tensorflow')\n")
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--import", "m.keras", "--name", "n", "--labels", "a,b"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{ROOT}"},
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "pip install -r requirements-train.txt" in result.stderr


def test_near_chance_accuracy_is_reported(tmp_path):
    rng = np.random.default_rng(0)
    for label in ("left", "right"):  # the same kind of noise in both classes: nothing to learn
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(24):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
                tmp_path / "data" / label / f"{i}.png"
            )
    result = train(
        tmp_path / "data", "--name", "noise", "--epochs", 1, "--image-size", "16x16", "--models-dir", tmp_path / "m"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "near chance" in result.stderr and "warning" in result.stderr
    meta = json.loads((tmp_path / "m/noise/model.json").read_text())
    assert 0.5 <= meta["metrics"]["chance_accuracy"] < 1


RAW_SCORES = """
import sys
import tensorflow as tf
tf.keras.utils.set_random_seed(1)
m = tf.keras.Sequential([tf.keras.layers.Input((12, 12, 1)), tf.keras.layers.Flatten(),
                         tf.keras.layers.Dense(3, kernel_initializer=tf.keras.initializers.RandomNormal(0, 2))])
m.save(sys.argv[1]) if sys.argv[1].endswith(".keras") else m.export(sys.argv[1])
"""


@pytest.fixture(scope="module")
def raw_score_models(tmp_path_factory):
    """A Keras file and a SavedModel whose outputs are raw scores in the hundreds (no softmax)."""
    folder = tmp_path_factory.mktemp("raw")
    for name in ("raw.keras", "raw_saved"):
        subprocess.run([sys.executable, "-c", RAW_SCORES, str(folder / name)], check=True, capture_output=True)
    return folder


def test_import_says_when_outputs_are_raw_scores(raw_score_models, tmp_path):
    result = train(
        "--import", raw_score_models / "raw.keras", "--name", "raw", "--labels", "a,b,c", "--models-dir", tmp_path
    )
    assert result.returncode == 1 and "raw scores" in result.stderr and "--add-softmax" in result.stderr
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize("source", ["raw.keras", "raw_saved"])
def test_import_adds_a_softmax_when_asked(raw_score_models, tmp_path, settings, bearer, source):
    result = train(
        "--import",
        raw_score_models / source,
        "--name",
        "soft",
        "--labels",
        "a,b,c",
        "--add-softmax",
        "--models-dir",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    meta = json.loads((tmp_path / "soft/model.json").read_text())
    assert meta["metrics"]["softmax_added"] is True and meta["metrics"]["outputs"] == "probabilities"
    client = predict_client(settings, "soft", tmp_path)
    reply = upload(client, bearer, ("x.png", encode(Image.new("L", (30, 20), 90))), name="soft")
    assert reply.status_code == 200
    assert abs(sum(entry["confidence"] for entry in reply.get_json()["top"]) - 100) < 0.1


def test_import_keeps_raw_outputs_with_a_tolerance_relative_to_their_scale(raw_score_models, tmp_path):
    result = train(
        "--import",
        raw_score_models / "raw.keras",
        "--name",
        "raw",
        "--labels",
        "a,b,c",
        "--raw-outputs",
        "--models-dir",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "raw/model.json").read_text())["metrics"]
    assert metrics["outputs"] == "raw scores"
    assert metrics["tflite_tolerance"] > 1e-3  # 1e-4 of outputs in the hundreds
    assert metrics["tflite_max_abs_diff"] <= metrics["tflite_tolerance"]
