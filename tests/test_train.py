"""./train.py as admins run it: tiny generated datasets, one or two epochs, and its errors."""

import json
import subprocess
import sys

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
