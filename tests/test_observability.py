"""What an operator sees, over real HTTP: one JSON access line per request with the right
fields, request ids kept and passed on, Prometheus metrics that count exactly, with 2 workers
too, and never a secret, a token or its hash in a log line."""

from __future__ import annotations

import gzip
import io
import json
import re
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from local.helpers import demo_image, encode, free_port, function_command, wait_http
from shared.credentials import token_digest
from tests.conftest import subprocess_env


@dataclass
class Function:
    base: str
    proc: subprocess.Popen[bytes]
    log: Path

    def lines(self) -> list[dict]:
        """Every line it logged, parsed (each must be one JSON object)."""
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def access(self, request_id: str) -> list[dict]:
        return [line for line in self.lines() if line.get("event") == "access" and line["request_id"] == request_id]


@pytest.fixture
def function(env, log_dir) -> Iterator:
    """Start a function with JSON logs on stdout, kept in a file (checked for secrets at the end)."""
    started: list[Function] = []

    def start(name: str, **extra: str) -> Function:
        port = free_port()
        log = log_dir / f"{name}-{port}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(function_command(name, port), stdout=out, stderr=subprocess.STDOUT,
                                    env=subprocess_env(**{**env, "LOG_FORMAT": "json", **extra}))  # fmt: skip
        started.append(Function(f"http://127.0.0.1:{port}", proc, log))
        wait_http(started[-1].base + "/healthz", proc)
        return started[-1]

    yield start
    for each in started:
        each.proc.terminate()
        each.proc.wait(20)


def rid() -> str:
    return uuid.uuid4().hex


def settle(function: Function, request_id: str, timeout: float = 5) -> list[dict]:
    """The access lines of ``request_id`` once written (a line is written when the answer is out)."""
    deadline = time.monotonic() + timeout
    while not (lines := function.access(request_id)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return lines


def test_one_access_line_per_request_with_its_fields(function, auth, own_redis, settings):
    token_fn = function("token", AUTH_MAX_FAILURES="2")
    predict = function("predict", MODEL_NAME="shapes", MAX_UPLOAD_BYTES="60000")
    pair = auth.create_key()
    scoped = auth.create_key(["arrows"])
    image = encode(demo_image("shapes", "circle", 2))
    secrets_seen = [pair.secret_key, scoped.secret_key]

    def call(target: Function, method: str, path: str, **kwargs) -> tuple[str, requests.Response]:
        request_id = rid()
        headers = {"X-Request-Id": request_id, **kwargs.pop("headers", {})}
        reply = requests.request(method, target.base + path, headers=headers, timeout=30, **kwargs)
        assert reply.headers["X-Request-Id"] == request_id
        return request_id, reply

    good = {"public_key": pair.public_key, "secret_key": pair.secret_key}
    issued_id, issued = call(token_fn, "POST", "/token.json", json=good)
    token = issued.json()["token"]
    scoped_token = auth.issue_token(scoped.public_key, scoped.secret_key, "t").token
    bearer, files = {"Authorization": f"Bearer {token}"}, {"file": ("c.png", image)}
    wrong = {**good, "secret_key": "sk_" + "w" * 43}
    token_call = (token_fn, "/token.json", pair.public_key, None)
    scenario = [
        ("token issued", issued_id, issued, *token_call),
        ("wrong secret", *call(token_fn, "POST", "/token.json", json=wrong), *token_call),
        ("wrong again", *call(token_fn, "POST", "/token.json", json=wrong), *token_call),
        ("limited", *call(token_fn, "POST", "/token.json", json=wrong), *token_call),
        ("prediction", *call(predict, "POST", "/models/shapes/predict.json", headers=bearer, files=files), predict,
         "/models/<name>/predict.json", pair.public_key, "shapes"),
        ("no token", *call(predict, "POST", "/models/shapes/predict.json", files=files), predict,
         "/models/<name>/predict.json", None, "shapes"),
        ("other model's key", *call(predict, "GET", "/models/shapes.json",
                                    headers={"Authorization": f"Bearer {scoped_token}"}),
         predict, "/models/<name>.json", scoped.public_key, "shapes"),
        ("too large", *call(predict, "POST", "/models/shapes/predict.json", headers=bearer, data=b"x" * 70000),
         predict, "/models/<name>/predict.json", None, "shapes"),
        ("unknown path", *call(predict, "GET", "/nope"), predict, "unmatched", None, None),
    ]  # fmt: skip
    statuses = [reply.status_code for _, _, reply, *_ in scenario]
    assert statuses == [200, 401, 401, 429, 200, 401, 403, 413, 404]
    for what, request_id, reply, target, route, public_key, model in scenario:
        (line,) = settle(target, request_id)  # exactly one
        assert line["status"] == reply.status_code and line["route"] == route, what
        assert line["method"] in ("GET", "POST") and line["level"] == "INFO" and line["function"]
        assert line["latency_ms"] > 0 and line["bytes_out"] == len(reply.content), what
        assert line["client"] == "127.0.0.1", what  # the peer: no trusted proxy here
        assert line.get("public_key") == public_key and line.get("model") == model, (what, line)
        if reply.status_code >= 400:
            assert line["error"] == reply.json()["error"], what
        else:
            assert "error" not in line
    assert settle(predict, scenario[4][1])[0]["bytes_in"] > len(image)

    # Redis stopped: a token function on a Redis that is gone answers 503, and logs it once.
    down = function("token", REDIS_URL=own_redis.url)
    own_redis.stop()
    request_id, reply = call(down, "GET", "/session.json", headers=bearer)
    assert reply.status_code == 503
    (line,) = settle(down, request_id)
    assert line["status"] == 503 and "Redis unreachable" in line["error"]
    # The operator's line names the server (the client's answer does not).
    assert f"127.0.0.1:{own_redis.port}" in line["error"] and str(own_redis.port) not in reply.json()["error"]

    start = next(line for line in predict.lines() if line.get("event") == "start")
    assert start["settings"]["model_name"] == "shapes" and "redis_url" in start["settings"]
    assert predict.base.endswith(f":{start['settings']['port']}")  # the port served (--port), not $PORT's default
    assert any(line.get("event") == "model_loaded" and line["version"] for line in predict.lines())
    everything = "".join(f.log.read_text() for f in (token_fn, predict, down))
    for secret in [*secrets_seen, token, scoped_token, token_digest(token), token_digest(scoped_token)]:
        assert secret not in everything
    assert settings.redis_url.split("@")[-1] in everything  # the URL is logged (no password to mask here)


def test_secrets_a_client_puts_in_the_wrong_place_stay_out_of_the_logs(function, auth):
    """A client that puts its token or secret key where it does not belong (a header without its
    colon, a request line, a path, a model or file name, a V2 input name, a chunk size) gets its
    4xx, and no log line holds either: the worker's refusals used to quote the request's bytes."""
    token_fn = function("token")
    predict = function("predict", MODEL_NAME="shapes")
    pair = auth.create_key()
    token = auth.issue_token(pair.public_key, pair.secret_key, "t").token
    secret, bearer = pair.secret_key, {"Authorization": f"Bearer {token}"}
    raw = [
        f"GET /session.json HTTP/1.1\r\nHost: a\r\nAuthorization Bearer {token}\r\n\r\n",
        f"GET /session.json?{secret} HTTP/1.1x\r\nHost: a\r\n\r\n",
        f"GET /healthz HTTP/1.1\r\nHost: a\r\nX-{secret}(: 1\r\n\r\n",
        f"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Bad: {token}\x01\r\n\r\n",
        f"POST /token.json HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n{token}\r\n",
    ]
    for payload in raw:
        with socket.create_connection(("127.0.0.1", int(token_fn.base.rsplit(":", 1)[1])), timeout=10) as sock:
            sock.sendall(payload.encode())
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 4") and token.encode() not in answer and secret.encode() not in answer
    v2 = {"inputs": [{"name": token, "datatype": "FP32", "shape": [1], "data": [1.0]}]}
    refused = [
        requests.get(f"{predict.base}/nope/{token}", timeout=10),
        requests.get(f"{predict.base}/models/{secret}.json", headers=bearer, timeout=10),
        requests.post(f"{predict.base}/models/shapes/predict.json", headers=bearer, timeout=10,
                      files={"file": (f"{secret}.png", b"not an image")}),
        requests.post(f"{predict.base}/v2/models/shapes/infer", headers=bearer, json=v2, timeout=10),
        requests.post(f"{predict.base}/models/shapes/predict.json", headers=bearer, timeout=10,
                      files={"file": ("c.png", b"x")}, data={"x" + token: "y" * 600_000}),  # a name cut short
        requests.get(f"{predict.base}/nope", headers={"X-Request-Id": token}, timeout=10),  # an id: replaced
    ]  # fmt: skip
    assert [reply.status_code for reply in refused] == [404, 404, 400, 400, 400, 404]
    assert refused[-1].headers["X-Request-Id"] != token
    time.sleep(0.5)  # the last access lines are written
    logged = token_fn.log.read_text() + predict.log.read_text()
    for leak in (token, secret, token_digest(token)):
        assert leak not in logged
    assert logged.count("[redacted]") >= 4


def test_request_ids_from_traceparent_or_made_up(function):
    token_fn = function("token")
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    reply = requests.get(token_fn.base + "/v2/health/live", timeout=5,
                         headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01"})  # fmt: skip
    assert reply.headers["X-Request-Id"] == trace and settle(token_fn, trace)
    made = requests.get(token_fn.base + "/v2/health/live", timeout=5, headers={"X-Request-Id": "not;an id" + "x" * 200})
    assert re.fullmatch(r"[0-9a-f]{32}", made.headers["X-Request-Id"])


def scrape(base: str) -> dict[tuple[str, tuple], float]:
    """Every sample of GET /metrics, parsed by prometheus_client's own parser."""
    text = requests.get(base + "/metrics", timeout=5).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(samples: dict, name: str, **labels: str) -> float:
    return sum(value for (n, key), value in samples.items() if n == name and labels.items() <= dict(key).items())


def scrape_when(base: str, counted: Callable[[dict], bool]) -> dict[tuple[str, tuple], float]:
    """A scrape in which the last answers are ``counted`` (their samples are written after their
    last byte has gone), or the last one tried within 10 s."""
    deadline = time.monotonic() + 10
    while not counted(samples := scrape(base)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return samples


@pytest.mark.parametrize("workers", ["1", "2"])
def test_metrics_count_exactly_across_workers(function, auth, workers):
    predict = function("predict", MODEL_NAME="shapes", WORKERS=workers)
    pair = auth.create_key()
    bearer = {"Authorization": "Bearer " + auth.issue_token(pair.public_key, pair.secret_key, "t").token}
    before = scrape(predict.base)
    image = encode(demo_image("shapes", "square", 3))
    route = {"function": "predict", "route": "/models/<name>/predict.json", "method": "POST"}
    two = [("file", ("a.png", image)), ("file", ("b.png", image))]
    for _ in range(7):  # new connections: with 2 workers both answer some
        reply = requests.post(predict.base + "/models/shapes/predict.json", headers=bearer, timeout=30, files=two)
        assert reply.status_code == 200
    for _ in range(3):
        assert requests.post(predict.base + "/models/shapes/predict.json", timeout=30,
                             files={"file": ("a.png", io.BytesIO(image))}).status_code == 401  # fmt: skip
    answered = total(before, "thalamus_requests_total", **route) + 10
    after = scrape_when(predict.base, lambda now: total(now, "thalamus_requests_total", **route) >= answered)
    delta = lambda name, **labels: total(after, name, **labels) - total(before, name, **labels)  # noqa: E731
    assert delta("thalamus_requests_total", **route, status="200") == 7
    assert delta("thalamus_requests_total", **route, status="401") == 3
    assert delta("thalamus_request_duration_seconds_count", **route, status="200") == 7
    assert delta("thalamus_inference_batch_size_count", model="shapes") == 7  # one model call per request
    assert delta("thalamus_inference_batch_size_sum", model="shapes") == 14
    assert delta("thalamus_image_decode_duration_seconds_count", model="shapes") == 14
    assert delta("thalamus_auth_failures_total", reason="missing") == 3
    assert total(after, "thalamus_model_info", model="shapes") == 1
    assert total(after, "thalamus_worker_processes") == int(workers)
    assert total(after, "thalamus_process_starts_total", function="predict") == int(workers)
    assert total(after, "process_resident_memory_bytes") > 10e6
    assert total(after, "thalamus_redis_command_duration_seconds_count") >= 10


def test_made_up_methods_add_no_series(function):
    token_fn = function("token")
    for n in range(3):
        reply = requests.request(f"BREW{n}", token_fn.base + "/healthz", timeout=5)
        assert reply.status_code == 405
    samples = scrape_when(token_fn.base, lambda now: total(now, "thalamus_requests_total", method="other") >= 3)
    assert total(samples, "thalamus_requests_total", method="other", status="405") == 3
    assert "BREW" not in requests.get(token_fn.base + "/metrics", timeout=5).text


def test_token_outcomes_are_counted(function, auth):
    token_fn = function("token", AUTH_MAX_FAILURES="2")
    pair = auth.create_key()
    good = {"public_key": pair.public_key, "secret_key": pair.secret_key}
    statuses = [
        requests.post(token_fn.base + "/token.json", json=body, timeout=10).status_code
        for body in [good, {**good, "secret_key": "sk_" + "v" * 43}, {**good, "secret_key": "sk_" + "v" * 43},
                     {**good, "secret_key": "sk_" + "v" * 43}, {"public_key": "pk_short", "secret_key": "sk_x"}]
    ]  # fmt: skip
    oauth = {"grant_type": "client_credentials", "client_id": pair.public_key, "client_secret": "sk_" + "v" * 43}
    statuses.append(requests.post(token_fn.base + "/token.json", data=oauth, timeout=10).status_code)  # the form too
    statuses.append(requests.post(token_fn.base + "/token.json", data="{}", timeout=10).status_code)  # JSON as a form
    assert statuses == [200, 401, 401, 429, 400, 429, 415]
    samples = scrape(token_fn.base)
    outcomes = ("issued", "invalid", "limited", "bad_request", "unavailable")
    counts = {outcome: total(samples, "thalamus_tokens_total", outcome=outcome) for outcome in outcomes}
    assert counts == {"issued": 1, "invalid": 2, "limited": 2, "bad_request": 2, "unavailable": 0}


def test_metrics_answer_in_prometheus_text_format(token_client):
    reply = token_client.get("/metrics")
    # As Prometheus's scraper reads it: the text format's version, and one charset (not two).
    assert reply.status_code == 200 and reply.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert "# TYPE thalamus_" in reply.get_data(as_text=True)


def test_scrapes_and_probes_are_left_out_of_the_access_log_unless_they_fail(function):
    token_fn = function("token")
    request_id = rid()
    for path in ("/metrics", "/healthz", "/readyz", "/v2/health/live"):
        assert requests.get(token_fn.base + path, headers={"X-Request-Id": request_id}, timeout=5).status_code == 200
    assert requests.post(token_fn.base + "/healthz", headers={"X-Request-Id": request_id}, timeout=5).status_code == 405
    lines = settle(token_fn, request_id)
    time.sleep(0.2)  # a line that should not be there has had its time
    assert [(line["route"], line["status"]) for line in token_fn.access(request_id)] == [
        ("/v2/health/live", 200),
        ("/healthz", 405),  # a wrong method: the route it reached is named, as a dashboard would group it
    ]
    assert lines  # settle saw the first of them
    samples = scrape(token_fn.base)  # still counted
    assert samples[("thalamus_requests_total", (("function", "token"), ("method", "GET"), ("route", "/healthz"),
                                                ("status", "200")))] >= 1  # fmt: skip


@pytest.mark.slow
def test_the_gateway_passes_the_request_id_on_and_both_log_it(running_stack):
    request_id = rid()
    reply = requests.get(running_stack.gateway + "/session.json", headers={"X-Request-Id": request_id}, timeout=10)
    assert reply.status_code == 401 and reply.headers["X-Request-Id"] == request_id
    assert reply.raw.headers.getlist("X-Request-Id") == [request_id]  # once, not once per hop
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        mentions = [line for line in running_stack.output if request_id in line]
        if len(mentions) >= 2:
            break
        time.sleep(0.1)
    assert sorted(line.split("|")[0].strip() for line in mentions) == ["gateway", "token"]
    assert all("401 GET" in line for line in mentions)
    # A predict function's text lines name its model too, as start.sh's table does.
    request_id = rid()
    headers = {"X-Request-Id": request_id}
    reply = requests.get(running_stack.gateway + "/models/shapes.json", headers=headers, timeout=10)
    assert reply.status_code == 401
    deadline = time.monotonic() + 5
    while len(mentions := [line for line in running_stack.output if request_id in line]) < 2:
        assert time.monotonic() < deadline, running_stack.output[-20:]
        time.sleep(0.1)
    assert sorted(line.split("|")[0].strip() for line in mentions) == ["gateway", "predict-shapes"]


def test_a_client_cannot_forge_lines_or_fields_of_the_text_log(function):
    # The text format (./start.sh's) writes what a client sent as it came: a path with a newline
    # in an error's message would start a line that reads like the service's own, one with
    # spaces would add fields of its own, and bidi overrides would reorder what a terminal shows.
    token = function("token", LOG_FORMAT="text")
    forged = "token%20%20%20%20%20%20%20%20%20|%2000:00:00%20INFO%20%20%20%20200%20POST%20/token.json"
    breaks = ["%0A", "%0D", "%C2%85", "%E2%80%A8", "%E2%80%A9"]  # LF, CR, NEL, line and paragraph separators
    fields = "%20%20status=200%20request_id=forged%20%22%20x=%5C"  # a quote and a backslash too
    # RLO, LRI, a zero width space, BOM, a tag, a soft hyphen, a Hangul filler, a variation selector
    invisible = ["%E2%80%AE", "%E2%81%A6", "%E2%80%8B", "%EF%BB%BF", "%F3%A0%81%81", "%C2%AD", "%E3%85%A4", "%EF%B8%8F"]
    for odd in [*breaks, fields, *invisible]:
        assert requests.get(f"{token.base}/x{odd}{forged}", timeout=10).status_code == 404
    sent = len(breaks) + 1 + len(invisible)
    deadline = time.monotonic() + 5
    while (text := token.log.read_text()).count("no such path") < sent and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = text.splitlines()  # as str.splitlines splits: at every Unicode line break too
    refused = [line for line in lines if "no such path" in line]
    assert len(refused) == sent, text
    assert not any(line.split("|", 1)[-1].startswith(" 00:00:00") for line in lines), text
    for line in refused:  # each field once, the client's text inside error="…"
        bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', line.split("ms  ", 1)[1])
        names = [field.split("=", 1)[0] for field in bare.split(" ")]
        assert len(names) == len(set(names)) and "x" not in names and names.count("status") == 1, line
        assert not re.search("[\xad\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2069\u3164\ufe0f\ufeff\U000e0041]",
                             line), line  # fmt: skip


def test_a_clients_long_strings_are_quoted_short_in_answers_and_log_lines(function, auth):
    """Error messages name what the client sent (a V2 datatype, an input or output name, a V1
    signature, a file name, a model in the path): a 10 KB gzip body once quoted a 10 MB string in
    the answer and in one 10 MB access line, which log pipelines split or drop."""
    predict = function("predict", MODEL_NAME="shapes")
    pair = auth.create_key()
    bearer = {"Authorization": f"Bearer {auth.issue_token(pair.public_key, pair.secret_key, 't').token}"}
    long = "x" * 2_000_000
    v2 = predict.base + "/v2/models/shapes/infer"
    sent = [
        requests.post(v2, headers={**bearer, "Content-Encoding": "gzip"}, timeout=30, data=gzip.compress(
            json.dumps({"inputs": [{"name": "x", "datatype": long, "shape": [1], "data": [1]}]}).encode())),
        requests.post(v2, headers=bearer, timeout=30, json={
            "inputs": [{"name": long, "datatype": "FP32", "shape": [1]}]}),
        requests.post(v2, headers=bearer, timeout=30, json={
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1] * 100_000, "data": [1]}]}),
        requests.post(v2, headers=bearer, timeout=30, json={
            "inputs": [{"name": long, "datatype": "BYTES", "shape": [1], "data": ["bm90IGFuIGltYWdl"]}]}),
        requests.post(v2, headers=bearer, timeout=30, json={
            "inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["x"]}], "outputs": [{"name": long}]}),
        requests.post(predict.base + "/v1/models/shapes:predict", headers=bearer, timeout=30,
                      json={"signature_name": long, "instances": [[1]]}),
        requests.post(v2, headers=bearer, timeout=30, json={  # a secret key where a cut would halve it
            "inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["x"]}],
            "outputs": [{"name": "x" * 38 + " " + pair.secret_key}]}),
        requests.post(predict.base + "/models/shapes/predict.json", headers=bearer, timeout=30,
                      files={"file": ("y" * 5000 + ".png", b"not an image")}),
        requests.get(f"{predict.base}/models/{'m' * 7000}.json", headers=bearer, timeout=30),
    ]  # fmt: skip
    assert [reply.status_code for reply in sent] == [400] * 8 + [404], [reply.text[:200] for reply in sent]
    assert pair.secret_key[:12] not in sent[6].text and "[redac" in sent[6].text
    for reply in sent:  # the quote cut, what the message goes on to say kept
        error = reply.json()["error"]
        assert (
            len(reply.content) < 400
            and "…" in error
            and error.endswith(("files", "or BMP", "'output_0')", "64, 64, 3]", "'serving_labels'", "serves shapes)"))
        )
    lines = [line for reply in sent for line in settle(predict, reply.headers["X-Request-Id"])]
    assert len(lines) == len(sent) and max(len(json.dumps(line)) for line in lines) < 1000
    assert pair.secret_key[:12] not in predict.log.read_text()


def test_an_outage_is_logged_at_warning(function):
    """With LOG_LEVEL=WARNING an operator still sees Redis go away: a 5xx's access line is a
    WARNING (the 503s of a whole outage were INFO, and nothing was logged)."""
    down = function("token", LOG_LEVEL="WARNING", REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    request_id = rid()
    assert (
        requests.get(
            down.base + "/session.json",
            headers={"Authorization": "Bearer " + "t" * 43, "X-Request-Id": request_id},
            timeout=10,
        ).status_code
        == 503
    )
    assert requests.get(down.base + "/nope", timeout=10).status_code == 404  # below WARNING: not logged
    (line,) = settle(down, request_id)
    assert line["level"] == "WARNING" and line["status"] == 503 and "Redis unreachable" in line["error"]
    assert not [other for other in down.lines() if other.get("status") == 404]


def test_a_flood_of_idle_connections_is_logged_and_counted(function):
    """A worker at its 1,000 connections stops accepting, and new ones wait in the backlog (a
    probe too): once a minute it says so, and thalamus_connections_open shows the flood, which
    was otherwise seen only as slow answers."""
    token = function("token")
    port = int(token.base.rsplit(":", 1)[1])
    with requests.Session() as kept:  # a connection made before the flood, to scrape on
        assert kept.get(token.base + "/metrics", timeout=5).status_code == 200  # (a probe's connection closes)
        flood = [socket.create_connection(("127.0.0.1", port)) for _ in range(1_010)]
        try:
            deadline = time.monotonic() + 5
            while "at the limit of 1000 open connections" not in token.log.read_text():
                assert time.monotonic() < deadline, token.log.read_text()[-2000:]
                time.sleep(0.1)
            time.sleep(0.5)  # the gauge is sampled 4 times a second
            metrics = kept.get(token.base + "/metrics", timeout=5).text
        finally:
            for sock in flood:
                sock.close()
    samples = {sample.name: sample.value for family in text_string_to_metric_families(metrics)
               for sample in family.samples if sample.name == "thalamus_connections_open"}  # fmt: skip
    assert samples == {"thalamus_connections_open": 1000}
    line = next(line for line in token.lines() if "open connections" in line["message"])
    assert line["level"] == "WARNING"
    assert requests.get(token.base + "/healthz", timeout=15).status_code == 200  # and it accepts again


def test_a_lone_surrogate_and_the_servers_own_5xx_are_logged(function, auth):
    """A V2 input named with a lone surrogate (valid JSON) made the text log fail to write its
    access line (stdout cannot encode it: a traceback on stderr instead); the worker's own 5xx
    (a 501) is a WARNING like the function's."""
    predict = function("predict", MODEL_NAME="shapes", LOG_FORMAT="text")
    pair = auth.create_key()
    bearer = {"Authorization": f"Bearer {auth.issue_token(pair.public_key, pair.secret_key, 't').token}"}
    odd = {"inputs": [{"name": "\ud800", "datatype": "BYTES", "shape": [1], "data": ["!"]}]}
    reply = requests.post(predict.base + "/v2/models/shapes/infer", headers=bearer, timeout=10, json=odd)
    assert reply.status_code == 400
    with socket.create_connection(("127.0.0.1", int(predict.base.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(b"POST /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 501 ")
    deadline = time.monotonic() + 5
    while (text := predict.log.read_text()).count(" 501 ") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "Logging error" not in text and "Traceback" not in text, text
    assert f"request_id={reply.headers['X-Request-Id']}" in text and "\\ud800" in text
    assert re.search(r"WARNING +501 ", text), text
