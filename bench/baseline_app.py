"""The baseline the original monolith was: FastAPI + a Keras model loaded with TensorFlow,
``model.predict`` per request. Only for bench/bench_predict.py.

    BASELINE_MODEL=path.keras BASELINE_SIZE=64x64x3 uvicorn bench.baseline_app:app --port P
"""

import io
import os

import numpy as np
import tensorflow as tf
from fastapi import FastAPI, File, UploadFile
from PIL import Image

height, width, channels = (int(v) for v in os.environ["BASELINE_SIZE"].split("x"))
model = tf.keras.models.load_model(os.environ["BASELINE_MODEL"])
app = FastAPI()


@app.post("/predict")
async def predict(file: UploadFile = File(...)) -> dict:  # noqa: B008  (FastAPI idiom)
    image = Image.open(io.BytesIO(await file.read())).convert("L" if channels == 1 else "RGB")
    array = np.asarray(image.resize((width, height)), dtype=np.float32).reshape(1, height, width, channels)
    probabilities = model.predict(array, verbose=0)[0]
    return {"prediction": int(np.argmax(probabilities)), "confidence": float(np.max(probabilities)) * 100}
