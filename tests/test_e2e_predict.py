"""Real HTTP: a token from the token function, then predictions from one functions-framework
process per demo model on freshly generated images."""

import io
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

import demo_data
from local.helpers import DEMO_MODELS, demo_image, encode


@pytest.fixture
def token(serve_function, auth):
    pair = auth.create_key()
    base = serve_function("token")
    reply = requests.post(
        f"{base}/token.json", json={"public_key": pair.public_key, "secret_key": pair.secret_key}, timeout=10
    )
    assert reply.status_code == 200
    return reply.json()["token"]


@pytest.mark.parametrize("model", DEMO_MODELS)
def test_demo_models_predict_fresh_images(model, serve_function, token):
    base = serve_function("predict", MODEL_NAME=model)
    headers = {"Authorization": f"Bearer {token}"}
    labels = demo_data.DEMOS[model][0]
    cases = [(label, demo_image(model, label, 1000 + i)) for i in range(8) for label in labels]
    files = [("file", (f"{i}.jpg", encode(img, "JPEG", quality=90), "image/jpeg")) for i, (_, img) in enumerate(cases)]
    reply = requests.post(f"{base}/models/{model}/predict.json", files=files, headers=headers, timeout=30)
    assert reply.status_code == 200, reply.text
    predicted = [r["prediction"] for r in reply.json()["results"]]
    correct = sum(p == label for p, (label, _) in zip(predicted, cases, strict=False))
    assert correct / len(cases) >= 0.9, list(zip(predicted, [c[0] for c in cases], strict=False))

    one = requests.post(
        f"{base}/models/{model}/predict.json",
        headers=headers,
        timeout=30,
        files={"file": ("x.png", encode(cases[0][1]))},
    )
    assert one.status_code == 200 and one.json()["prediction"] in labels


def test_concurrent_requests_get_their_own_answers(serve_function, token):
    base = serve_function("predict", MODEL_NAME="shapes", THREADS="4")
    headers = {"Authorization": f"Bearer {token}"}
    cases = [
        (label, encode(demo_image("shapes", label, 2000 + i)))
        for i in range(6)
        for label in ("circle", "square", "triangle")
    ]

    def call(case):
        label, data = case
        reply = requests.post(
            f"{base}/models/shapes/predict.json",
            headers=headers,
            timeout=30,
            files={"file": ("s.png", io.BytesIO(data))},
        )
        return label, reply.status_code, reply.json().get("prediction")

    sequential = {
        data: requests.post(
            f"{base}/models/shapes/predict.json", headers=headers, timeout=30, files={"file": ("s.png", data)}
        ).json()["prediction"]
        for _, data in cases
    }
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, cases * 3))
    assert all(status == 200 for _, status, _ in results)
    # Shared interpreters would mix up tensors: every answer must equal the one-at-a-time answer.
    assert [p for _, _, p in results] == [sequential[data] for _, data in cases * 3]


def test_chunked_upload_is_read_like_any_other(serve_function, token):
    base = serve_function("predict", MODEL_NAME="shapes")
    image = encode(demo_image("shapes", "triangle", 55))
    body = (
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="t.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + image + b"\r\n--XyZ--\r\n"
    )

    def chunks():  # a generator body: requests sends it with Transfer-Encoding: chunked
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]

    reply = requests.post(
        f"{base}/models/shapes/predict.json",
        data=chunks(),
        timeout=30,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "multipart/form-data; boundary=XyZ"},
    )
    assert reply.status_code == 200 and reply.json()["prediction"] == "triangle"
