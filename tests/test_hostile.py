"""Hostile clients against real servers (``python -m shared.server``, the local gateway): slow
headers and bodies, malformed requests and framings, odd paths. Every answer is JSON with the
right 4xx, nobody else waits, and the server logs no traceback."""

from __future__ import annotations

import collections
import contextlib
import io
import json
import random
import re
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from PIL import Image

from local.helpers import demo_image, encode, free_port, function_command, wait_http
from shared.config import Rate
from shared.deadlines import JOIN_BODY_BYTES, MAX_BODY_CHUNKS, DeadlineSocket
from shared.refusals import request_id_of
from tests.conftest import subprocess_env
from tests.test_observability import scrape_when, total

DEADLINE = 2  # REQUEST_HEADER_TIMEOUT and REQUEST_BODY_TIMEOUT of the servers under attack


@dataclass
class Server:
    base: str
    port: int
    proc: subprocess.Popen[bytes]
    log: io.BufferedRandom

    def log_text(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")


@pytest.fixture
def serve(env, log_dir) -> Iterator:
    """Start a function with short deadlines, its stderr kept; afterwards assert no traceback."""
    servers: list[Server] = []

    def start(function: str, **extra: str) -> Server:
        port = free_port()
        log = open(log_dir / f"{function}-{port}.log", "w+b")  # noqa: SIM115 (closed below)
        deadlines = {"REQUEST_HEADER_TIMEOUT": str(DEADLINE), "REQUEST_BODY_TIMEOUT": str(DEADLINE)}
        proc = subprocess.Popen(function_command(function, port), env=subprocess_env(**env, **deadlines, **extra),
                                stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        server = Server(f"http://127.0.0.1:{port}", port, proc, log)
        servers.append(server)
        wait_http(server.base + "/healthz", proc)
        return server

    yield start
    for server in servers:
        server.proc.terminate()
        server.proc.wait(10)
        assert "Traceback" not in server.log_text(), server.log_text()
        server.log.close()


# -- raw HTTP ----------------------------------------------------------------------------------


def exchange(port: int, payload: bytes, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Send ``payload`` on a new connection; the answer's status, headers and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock, sock.makefile("rb") as answers:
        sock.sendall(payload)
        return read_answer(answers, payload.split(b" ", 1)[0].decode("latin-1"))


def request(method: str, target: str, *headers: str, body: bytes = b"") -> bytes:
    return ("\r\n".join([f"{method} {target} HTTP/1.1", "Host: thalamus", *headers]) + "\r\n\r\n").encode() + body


def assert_json_error(answer: tuple[int, dict[str, str], bytes], status: int) -> str:
    code, headers, body = answer
    assert code == status, (code, body)
    assert headers.get("content-type") == "application/json", headers
    assert re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", headers.get("x-request-id", "")), headers  # every answer has one
    return str(json.loads(body)["error"])


@dataclass
class Tricklers:
    """Connections that each send ``prefix`` at once, then one byte of ``drip`` a second."""

    port: int
    count: int
    prefix: bytes
    drip: bytes = b"X-Slow: a\r\n"
    socks: list[socket.socket] = field(default_factory=list)
    answers: dict[int, tuple[float, bytes]] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Tricklers:
        self.started = time.monotonic()
        for _ in range(self.count):
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
            sock.sendall(self.prefix)
            self.socks.append(sock)
        self.thread = threading.Thread(target=self._drip, daemon=True)
        self.thread.start()
        return self

    def _drip(self) -> None:
        position = 0
        while not self.stop.is_set():
            live = [s for i, s in enumerate(self.socks) if i not in self.answers]
            if not live:
                return
            readable, _, _ = select.select(live, [], [], 1.0)
            for i, sock in enumerate(self.socks):
                if i in self.answers:
                    continue
                if sock in readable:
                    try:
                        self.answers[i] = (time.monotonic() - self.started, sock.recv(65536))
                    except OSError:
                        self.answers[i] = (time.monotonic() - self.started, b"")
                else:
                    try:
                        sock.send(self.drip[position % len(self.drip) :][:1])
                    except OSError:
                        self.answers[i] = (time.monotonic() - self.started, b"")
            position += 1

    def wait_all(self, limit: float) -> None:
        end = time.monotonic() + limit
        while len(self.answers) < self.count and time.monotonic() < end:
            time.sleep(0.05)

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(5)
        for sock in self.socks:
            sock.close()


def timed_get(url: str, **kwargs) -> tuple[int, float]:
    started = time.monotonic()
    reply = requests.get(url, timeout=10, **kwargs)
    return reply.status_code, time.monotonic() - started


@pytest.fixture
def token_header(auth) -> dict[str, str]:
    pair = auth.create_key()
    return {"Authorization": "Bearer " + auth.issue_token(pair.public_key, pair.secret_key, "t").token}


# -- slow clients ------------------------------------------------------------------------------


def test_slow_headers_and_small_bodies_do_not_hold_a_thread(serve, token_header):
    server = serve("token")  # a thread per CPU: fewer than the slow clients by far
    small = request("POST", "/token.json", "Content-Type: application/json", "Content-Length: 500")
    with (
        Tricklers(server.port, 40, b"GET /session.json HTTP/1.1\r\nHost: x\r\n"),
        Tricklers(server.port, 8, small, b"{"),
    ):
        time.sleep(1.2)  # every slow client has sent bytes: each would hold a thread on plain gthread
        timings = [timed_get(server.base + "/session.json", headers=token_header) for _ in range(10)]
    assert all(status == 200 for status, _ in timings)
    assert max(seconds for _, seconds in timings) < 1.0


def test_slow_headers_get_408_json_at_the_deadline(serve):
    server = serve("token")
    with Tricklers(server.port, 3, b"GET /healthz HTTP/1.1\r\nHost: x\r\n") as slow:
        slow.wait_all(DEADLINE + 3)
    assert len(slow.answers) == 3
    for seconds, answer in slow.answers.values():
        assert DEADLINE - 0.2 <= seconds <= DEADLINE + 1.5
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 ") and "not received in time" in json.loads(body)["error"]
        assert re.search(rb"\r\nX-Request-Id: [0-9a-f]{32}\r\n", head), head


def test_a_small_body_that_comes_late_gets_408_naming_the_body(serve):
    # The whole head came, then part of a small body (which the poller reads before dispatch).
    server = serve("token")
    head = request("POST", "/token.json", "Content-Type: application/json", "Content-Length: 100")
    started = time.monotonic()
    error = assert_json_error(exchange(server.port, head + b'{"public_key": ', timeout=DEADLINE + 5), 408)
    assert error == "request body not received in time" and time.monotonic() - started < DEADLINE + 2


def test_no_token_is_refused_before_the_body_is_read(serve):
    server = serve("predict", MODEL_NAME="shapes")
    head = request("POST", "/models/shapes/predict.json", "Content-Type: multipart/form-data; boundary=x",
                   "Content-Length: 5000000")  # fmt: skip
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(head)  # and not one byte of the 5 MB body
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 401 ") and b"Connection: close" in answer


def send_all_then_read(port: int, head: bytes, body: bytes, per_second: int = 0) -> bytes:
    """What a client that writes its whole request before it reads (Node's fetch, undici) gets:
    a write that fails (the server reset the connection) loses the answer, as it does for it.
    ``per_second``: the body's pace (0: as fast as it goes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        step = per_second // 10 or len(body)
        for at in range(0, len(body), step):
            sock.sendall(body[at : at + step])
            time.sleep(0.1 if per_second else 0)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


EIGHT_MB = b"x" * 8_000_000
IN_ONE_CHUNK = b"%x\r\n%s\r\n0\r\n\r\n" % (len(EIGHT_MB), EIGHT_MB)
REFUSED_BEFORE_THE_BODY = {  # (the function's extra settings, head fields, body, status)
    "no token, a Content-Length": ({}, ["Content-Length: 8000000"], EIGHT_MB, 401),
    "no token, chunked": ({}, ["Transfer-Encoding: chunked"], IN_ONE_CHUNK, 401),
    "over MAX_UPLOAD_BYTES": ({"MAX_UPLOAD_BYTES": "1000000"}, ["Content-Length: 8000000"], EIGHT_MB, 413),
}


@pytest.mark.parametrize("what", REFUSED_BEFORE_THE_BODY)
def test_a_client_that_sends_its_whole_body_before_reading_gets_the_refusal(serve, what):
    """A refusal given before the body is read closes the connection; what the client still sends
    is read and dropped meanwhile (nginx's lingering close), not answered with a reset, which
    destroys the answer not yet read (Node's fetch saw EPIPE instead of its 401 or 413)."""
    extra, fields, body, status = REFUSED_BEFORE_THE_BODY[what]
    server = serve("predict", MODEL_NAME="shapes", **extra)
    head = request("POST", "/models/shapes/predict.json", "Content-Type: multipart/form-data; boundary=x", *fields)
    answer = send_all_then_read(server.port, head, body)
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()) and b"Connection: close" in answer, answer[:200]


def test_a_slow_upload_refused_early_still_gets_its_answer(serve):
    """The lingering close lasts as long as reading the body would have: REQUEST_BODY_TIMEOUT
    (2 s here), and more while it flows at 64 KiB/s or more (at most 30 s). It ended at the
    timeout, and a slow link's upload (3 MB at 640 KB/s) got a reset instead of its 401."""
    server = serve("predict", MODEL_NAME="shapes")
    body = EIGHT_MB[:3_000_000]
    head = request("POST", "/models/shapes/predict.json", "Content-Type: multipart/form-data; boundary=x",
                   f"Content-Length: {len(body)}")  # fmt: skip
    answer = send_all_then_read(server.port, head, body, per_second=640_000)
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]


def test_a_stopping_server_does_not_wait_for_a_lingering_client(serve):
    """SIGTERM: a client still sending after its refusal is cut as soon as an idle connection is
    (2 s), not after the lingering close's own deadline, which a trickle stretches to 30 s."""
    server = serve("predict", MODEL_NAME="shapes")
    head = request("POST", "/models/shapes/predict.json", "Content-Type: multipart/form-data; boundary=x",
                   "Content-Length: 1000000")  # fmt: skip
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head + b"x" * 100_000)
        assert sock.recv(65536).startswith(b"HTTP/1.1 401 ")
        started = time.monotonic()
        server.proc.terminate()
        with contextlib.suppress(OSError):
            while server.proc.poll() is None and time.monotonic() - started < 20:
                sock.sendall(b"x" * 100_000)  # 1 MB/s: the lingering close's deadline keeps moving
                time.sleep(0.1)
    assert server.proc.wait(20) == 0 and time.monotonic() - started < 8  # not the 10 s grace period


BIG = "Content-Length: 10000000"  # under MAX_UPLOAD_BYTES: no 413 first
NO_BODY_WANTED = {  # requests answered without a token, each with a 10 MB body never sent
    "the framework's /robots.txt": (request("PUT", "/robots.txt", BIG), 404),
    "the framework's /favicon.ico": (request("POST", "/favicon.ico", BIG), 404),
    "an Upgrade Flask refuses": (
        request("POST", "/models/shapes/predict.json", "Connection: Upgrade", "Upgrade: websocket", BIG), 400),
    "a Host Flask refuses": (request("POST", "/models/shapes/predict.json", BIG).replace(b"thalamus", b"a..b"), 400),
    "a route without a body": (request("GET", "/healthz", BIG), 200),
    "a route without a body, 100-continue asked": (request("GET", "/openapi.json", BIG, "Expect: 100-continue"), 200),
    "Flask's own /static/ route": (request("OPTIONS", "/static/x", BIG), 404),
}  # fmt: skip


@pytest.mark.parametrize("what", NO_BODY_WANTED)
def test_answers_that_need_no_body_never_read_one(serve, what):
    # Flask and functions-framework answer some requests before the service runs, and read the
    # whole body afterwards (two requests took a replica from 75 to 706 MiB); the service read
    # the body of every route that had one, /healthz's too, holding a thread while it came.
    server = serve("predict", MODEL_NAME="shapes")
    head, status = NO_BODY_WANTED[what]
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(head)  # and not one byte of the body
        answer = b""
        while chunk := sock.recv(65536):  # until the server closes: it must not wait for the body
            answer += chunk
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()) and b"Connection: close" in answer, answer
    assert b"application/json" in answer and b"100 Continue" not in answer, answer


def test_the_host_header_is_required_and_well_formed(serve):
    """RFC 9112 3.2: an HTTP/1.1 request without Host, or with a malformed one, is a 400 (Envoy
    refuses it so on a cluster; the function and the local gateway do too)."""
    server = serve("predict", MODEL_NAME="shapes")

    def get(version: str, field: str) -> tuple[int, dict[str, str], bytes]:
        return exchange(server.port, f"GET /healthz HTTP/{version}\r\n{field}\r\n".encode())

    assert "Host" in assert_json_error(get("1.1", ""), 400)
    for bad in ("a b", "x/y", "x@y", "x:8080:1", "x:port", "[::1"):
        assert "Host" in assert_json_error(get("1.1", f"Host: {bad}\r\n"), 400), bad
    for good in ("thalamus.example:8080", "127.0.0.1", "[::1]:8080", "[fe80::1%25eth0]", "x:", ""):  # "": no authority
        assert get("1.1", f"Host: {good}\r\n")[0] == 200, good
    assert get("1.0", "")[0] == 200  # HTTP/1.0 has no Host requirement


def test_a_request_for_an_empty_path_is_a_json_404_not_a_redirect(serve):
    # Flask redirected it, in HTML, to the host the client named.
    server = serve("predict", MODEL_NAME="shapes")
    answer = exchange(server.port, b"GET http://x HTTP/1.1\r\nHost: attacker.example\r\n\r\n")
    assert "no such path" in assert_json_error(answer, 404)
    assert "location" not in answer[1]


def test_a_100_continue_is_sent_only_once_the_token_is_good(serve, token_header):
    """A client that asks first ("Expect: 100-continue", as curl does for large uploads) is not
    invited to upload a body the token check then refuses."""
    server = serve("predict", MODEL_NAME="shapes")
    image = encode(demo_image("shapes", "circle", 3))
    body = b"--x\r\nContent-Disposition: form-data; name=file; filename=c.png\r\n\r\n" + image + b"\r\n--x--\r\n"
    for token, first in (
        (token_header["Authorization"], b"HTTP/1.1 100 Continue\r\n\r\n"),
        ("Bearer " + "t" * 43, b""),
    ):
        head = request("POST", "/models/shapes/predict.json", f"Authorization: {token}", "Expect: 100-continue",
                       "Content-Type: multipart/form-data; boundary=x", f"Content-Length: {len(body)}")  # fmt: skip
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(head)
            answer = sock.recv(65536)
            if first:
                assert answer == first
                sock.sendall(body)
                answer = sock.recv(65536)
                while not answer.endswith(b"}"):  # the head and the JSON body, perhaps in two reads
                    answer += sock.recv(65536)
                assert answer.startswith(b"HTTP/1.1 200 ") and b'"circle"' in answer
            else:
                assert answer.startswith(b"HTTP/1.1 401 "), answer  # no 100 before it


def test_slow_body_with_a_token_gets_408_and_frees_its_thread(serve, token_header):
    server = serve("predict", MODEL_NAME="shapes", THREADS="2")
    head = request("POST", "/models/shapes/predict.json", f"Authorization: {token_header['Authorization']}",
                   "Content-Type: multipart/form-data; boundary=x", "Content-Length: 1000000")  # fmt: skip
    with Tricklers(server.port, 1, head, b"z") as slow:
        time.sleep(0.5)
        status, waited = timed_get(server.base + "/models/shapes.json", headers=token_header)  # the other thread
        assert status == 200 and waited < 1.0
        slow.wait_all(DEADLINE + 3)
    seconds, answer = slow.answers[0]
    assert DEADLINE - 0.2 <= seconds <= DEADLINE + 1.5
    assert answer.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in answer
    image = encode(demo_image("shapes", "circle", 3))
    after = requests.post(server.base + "/models/shapes/predict.json", headers=token_header, timeout=10,
                          files={"file": ("c.png", image)})  # fmt: skip
    assert after.status_code == 200 and after.json()["prediction"] == "circle"


def test_probes_are_answered_while_every_thread_is_busy(serve, token_header):
    """The kubelet's liveness and readiness probes have a thread of their own: with both of a
    replica's threads held by long requests, they are answered at once, not after those requests
    (a liveness probe that times out gets the container restarted). A probe with a body is an
    ordinary request."""
    server = serve("predict", MODEL_NAME="shapes", THREADS="2")
    head = request("POST", "/models/shapes/predict.json", f"Authorization: {token_header['Authorization']}",
                   "Content-Type: multipart/form-data; boundary=x", "Content-Length: 1000000")  # fmt: skip
    with Tricklers(server.port, 2, head, b"z") as slow:
        time.sleep(0.5)
        for path in ("/healthz", "/readyz", "/readyz?probe=1"):
            status, waited = timed_get(server.base + path)
            assert status == 200 and waited < 1.0, (path, waited)
        started = time.monotonic()
        code, _, _ = exchange(server.port, request("GET", "/healthz", "Content-Length: 2", body=b"{}"))
        assert code == 200 and time.monotonic() - started > 0.5  # it waited for a pool thread
        # One probe a connection: probes pipelined by a client that never reads the answers
        # cannot fill the socket and hold the probes' thread (it answers the first, then closes).
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(request("GET", "/healthz") * 50)
            time.sleep(0.3)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
        assert received.count(b"HTTP/1.1 200 ") == 1 and b"Connection: close" in received
        slow.wait_all(DEADLINE + 3)
    assert all(answer.startswith(b"HTTP/1.1 408 ") for _, answer in slow.answers.values())


def test_a_slow_uploads_token_is_checked_again_once_its_body_is_in(serve, auth):
    """A token let through when the head arrived is checked again if the body took long: a key
    revoked meanwhile gets its 401, not a prediction after keys.py said the revocation is in
    force everywhere (a red team had one answered 26 s after)."""
    server = serve("predict", MODEL_NAME="shapes")
    pair = auth.create_key()
    token = auth.issue_token(pair.public_key, pair.secret_key, "t").token
    image = encode(demo_image("shapes", "circle", 3))
    upload = requests.Request("POST", server.base + "/models/shapes/predict.json", data={"note": "x" * 50_000},
                              files={"file": ("c.png", image)}).prepare()  # fmt: skip
    body = upload.body  # larger than the worker reads before it dispatches: the token is checked first
    head = request("POST", "/models/shapes/predict.json", f"Authorization: Bearer {token}",
                   f"Content-Type: {upload.headers['Content-Type']}", f"Content-Length: {len(body)}")  # fmt: skip
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock, sock.makefile("rb") as answers:
        sock.sendall(head + body[:10])
        time.sleep(0.3)  # the token is checked (and cached) as the head arrives
        auth.revoke_key(pair.public_key)
        time.sleep(0.5)
        sock.sendall(body[10:])
        status, _, answer = read_answer(answers, "POST")
    assert status == 401, answer
    # ... and a key that stays valid is not refused, nor its rate counted twice
    rated = auth.create_key(rate=Rate.parse("3/m"))
    bearer = f"Bearer {auth.issue_token(rated.public_key, rated.secret_key, 't').token}"
    head = request("POST", "/models/shapes/predict.json", f"Authorization: {bearer}",
                   f"Content-Type: {upload.headers['Content-Type']}", f"Content-Length: {len(body)}")  # fmt: skip
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock, sock.makefile("rb") as answers:
        sock.sendall(head + body[:10])
        time.sleep(0.8)
        sock.sendall(body[10:])
        status, headers, answer = read_answer(answers, "POST")
    assert status == 200 and headers["ratelimit-remaining"] == "2", (status, headers, answer)


# -- malformed requests ------------------------------------------------------------------------

MALFORMED = [
    ("request line over 8 KB", request("GET", "/" + "a" * 9000), 414),
    ("200 headers", request("GET", "/healthz", *[f"X-H{i}: v" for i in range(200)]), 431),
    ("a 9 KB header", request("GET", "/healthz", "X-Big: " + "b" * 9000), 431),
    ("control character in a header", request("GET", "/healthz", "X-Bad: a\x01b"), 400),
    ("no HTTP version", b"GET /healthz\r\nHost: x\r\n\r\n", 400),
    ("bad method", request("G(T", "/healthz"), 400),
    ("bad chunk size", request("POST", "/token.json", "Content-Type: application/json",
                               "Transfer-Encoding: chunked", body=b"zz\r\n{}\r\n0\r\n\r\n"), 400),
    ("chunk without its CRLF", request("POST", "/token.json", "Content-Type: application/json",
                                       "Transfer-Encoding: chunked", body=b"2\r\n{}XX0\r\n\r\n"), 400),
    ("Content-Length and chunked", request("POST", "/token.json", "Content-Length: 5",
                                           "Transfer-Encoding: chunked", body=b"0\r\n\r\n"), 400),
    ("two Content-Lengths", request("POST", "/token.json", "Content-Length: 2", "Content-Length: 3",
                                    body=b"{}"), 400),
    ("an Expect other than 100-continue", request("GET", "/healthz", "Expect: tea"), 417),
    ("an unknown transfer coding", request("POST", "/token.json", "Transfer-Encoding: zstd, chunked",
                                           body=b"0\r\n\r\n"), 501),
    ("gzip as a transfer coding", request("POST", "/token.json", "Content-Type: application/json",
                                          "Transfer-Encoding: gzip, chunked", body=b"0\r\n\r\n"), 501),
]  # fmt: skip


@pytest.mark.parametrize("what, payload, status", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_requests_get_json_4xx(serve, what, payload, status):
    server = serve("token")
    assert_json_error(exchange(server.port, payload), status)
    assert requests.get(server.base + "/healthz", timeout=5).status_code == 200


@pytest.mark.parametrize("path", ["/robots.txt", "/favicon.ico", "/session.json%0a", "/a%00b", "/%ff%fe",
                                  "/models//shapes.json", "/.." + "/x" * 10, "/token.json/../x"])  # fmt: skip
def test_odd_paths_get_json_404(serve, path):
    server = serve("token")
    assert "no such path" in assert_json_error(exchange(server.port, request("GET", path)), 404)


def test_leading_double_slash_is_the_same_path(serve):
    # werkzeug reads "//token.json" as "/token.json" (leading slashes fold): a JSON 405, no redirect.
    server = serve("token")
    assert "use POST" in assert_json_error(exchange(server.port, request("GET", "//token.json")), 405)


def test_deeply_nested_json_and_many_form_fields_are_400(serve, token_header):
    token = serve("token")
    nested = requests.post(token.base + "/token.json", data="[" * 8000 + "]" * 8000, timeout=10,
                           headers={"Content-Type": "application/json"})  # fmt: skip
    assert nested.status_code == 400 and "nested" in nested.json()["error"]
    fields = "&".join(f"f{i}=v" for i in range(2000)) + "&grant_type=client_credentials"
    form = requests.post(token.base + "/token.json", data=fields, timeout=10,
                         headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    # The real problem, as RFC 6749 §5.2 puts it: no client credentials.
    assert form.status_code == 401 and form.json()["error"] == "invalid_client"
    assert "client_id" in form.json()["error_description"]
    predict = serve("predict", MODEL_NAME="shapes")
    parts = {f"f{i}": (None, "v") for i in range(2000)}
    many = requests.post(predict.base + "/models/shapes/predict.json", files=parts, headers=token_header, timeout=10)
    assert many.status_code == 400 and "too many parts (limit 1000," in many.json()["error"]


def test_the_servers_own_answers_carry_a_request_id_and_an_access_line(serve):
    """The answers the worker gives before the application sees the request (414, 431, 400, 417,
    408): each with a new X-Request-Id (the request's headers were not read: the caller's is not
    taken from them), and one access line under that id, as the application's answers have."""
    server = serve("predict", MODEL_NAME="shapes", LOG_FORMAT="json")
    mine = "X-Request-Id: mine-1"
    cases = [
        # gunicorn's parser refuses these (whole heads): the method is the request line's
        (request("GET", "/" + "a" * 9000, mine), 414, "GET"),
        (request("GET", "/healthz", mine, *[f"X-H{i}: v" for i in range(200)]), 431, "GET"),
        (request("GET", "/healthz", mine, "X-Bad: a\x01b"), 400, "GET"),
        (request("GET", "/healthz", mine, "Expect: tea"), 417, "GET"),
        # the worker's main thread refuses this one (a head over 64 KiB, never ended)
        (f"GET /healthz HTTP/1.1\r\n{mine}\r\nX-Big: {'b' * 70_000}".encode(), 431, "GET"),
    ]
    ids = {}
    for payload, status, method in cases:
        code, headers, _ = exchange(server.port, payload)
        assert code == status and re.fullmatch(r"[0-9a-f]{32}", headers.get("x-request-id", "")), (status, headers)
        assert headers.get("cache-control") == "no-store"  # a refusal is never cached (the token endpoint's too)
        ids[headers["x-request-id"]] = (status, method)
    assert len(ids) == len(cases)  # one each
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [json.loads(line) for line in server.log_text().splitlines() if line.startswith("{")]
        access = {line["request_id"]: line for line in lines if line.get("event") == "access"}
        if set(ids) <= set(access):
            break
        time.sleep(0.05)
    for rid, (status, method) in ids.items():
        line = access[rid]
        assert (line["status"], line["route"], line.get("method", "")) == (status, "unmatched", method), line
        assert line["error"] and line["bytes_out"] > 0 and line["client"] == "127.0.0.1"
    assert "mine-1" not in access
    # ... and each is counted in the function's request metrics, as route "unmatched"
    want = collections.Counter(str(status) for status, _ in ids.values())
    unmatched = {"route": "unmatched"}
    samples = scrape_when(server.base, lambda now: total(now, "thalamus_requests_total", **unmatched) >= len(ids))
    assert total(samples, "thalamus_requests_total", **unmatched) == len(ids)
    assert {status: total(samples, "thalamus_requests_total", **unmatched, status=status) for status in want} == want


def test_a_parsed_requests_own_id_is_kept():
    """When gunicorn has parsed the request (an error after that), its id follows shared.access's
    rules: the caller's X-Request-Id when sane, else its traceparent's trace id, else a new one."""

    @dataclass
    class Parsed:
        headers: list[tuple[str, str]]

    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    assert request_id_of(Parsed([("HOST", "x"), ("X-REQUEST-ID", "abc-1")])) == "abc-1"
    assert (
        request_id_of(Parsed([("X-REQUEST-ID", "bad id\r\nX: y"), ("TRACEPARENT", f"00-{trace}-00f067aa0ba902b7-01")]))
        == trace
    )
    assert re.fullmatch(r"[0-9a-f]{32}", request_id_of(Parsed([("X-REQUEST-ID", "é" * 3)])))
    assert re.fullmatch(r"[0-9a-f]{32}", request_id_of(None))
    assert request_id_of(None) != request_id_of(None)


# -- the gateway -------------------------------------------------------------------------------


def test_gateway_stays_responsive_with_dozens_of_slow_connections(running_stack):
    port = int(running_stack.gateway.rsplit(":", 1)[1])
    slow_body = request("POST", "/token.json", "Content-Type: application/json", "Content-Length: 100000")
    with Tricklers(port, 40, b"GET /healthz HTTP/1.1\r\nHost: x\r\n"), Tricklers(port, 16, slow_body, b"{"):
        time.sleep(1.2)
        timings = [timed_get(running_stack.gateway + "/healthz") for _ in range(5)]
        timings += [timed_get(running_stack.gateway + "/session.json") for _ in range(5)]  # proxied
    assert [status for status, _ in timings] == [200] * 5 + [401] * 5
    assert max(seconds for _, seconds in timings) < 1.0


def test_gateway_relays_a_functions_413(running_stack):
    huge = b"x" * (10 * 1024 * 1024 + 1)
    reply = requests.post(running_stack.gateway + "/token.json", data=huge, timeout=30,
                          headers={"Content-Type": "application/json"})  # fmt: skip
    assert reply.status_code == 413 and "too large" in reply.json()["error"]
    chunked = requests.post(running_stack.gateway + "/token.json", data=iter([huge[:6_000_000], huge[6_000_000:]]),
                            timeout=30, headers={"Content-Type": "application/json"})  # fmt: skip
    assert chunked.status_code == 413


def test_gateway_refusals_reach_a_client_that_sends_its_whole_body_first(running_stack):
    port = int(running_stack.gateway.rsplit(":", 1)[1])
    for path, content_type, status in (("/models/shapes/predict.json", "multipart/form-data; boundary=x", 401),
                                       ("/token.json", "application/json", 413)):  # fmt: skip
        head = request("POST", path, f"Content-Type: {content_type}", f"Content-Length: {len(EIGHT_MB)}")
        for _ in range(3):
            answer = send_all_then_read(port, head, EIGHT_MB)
            assert answer.startswith(f"HTTP/1.1 {status} ".encode()), (path, answer[:200])


def test_gateway_relays_an_early_answer_before_the_upload_ends(running_stack):
    """A function's 401 or 413, given before it reads the body, goes to the client as soon as it
    comes: the gateway stops sending the body to a function that drops it (it sent all of the
    upload first, once the function no longer reset the connection after 64 KiB)."""
    port = int(running_stack.gateway.rsplit(":", 1)[1])
    total, sent = 10_000_000, 0  # at 2 MB/s: 5 s to send it all
    head = request("POST", "/models/shapes/predict.json", "Content-Type: multipart/form-data; boundary=x",
                   f"Content-Length: {total}")  # fmt: skip
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        while sent < total and not select.select([sock], [], [], 0.1)[0]:
            sock.sendall(b"x" * 200_000)
            sent += 200_000
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 401 ") and sent < total // 2, (sent, answer[:200])


def test_gateway_uploads_with_expect_100_continue(running_stack, tmp_path):
    """curl asks "Expect: 100-continue" for a large upload: the gateway invites the body itself
    and does not pass the Expect on (the function's 100 would read as its early answer, and the
    gateway would wait for an answer while the function waits for the body)."""
    assert running_stack.keys("-g", str(tmp_path / "k.json")).returncode == 0
    pair = json.loads((tmp_path / "k.json").read_text())
    token = requests.post(f"{running_stack.gateway}/token.json", json=pair, timeout=30).json()["token"]
    image = io.BytesIO()  # a photo's worth of bytes (noise compresses badly), sent in two goes
    Image.frombytes("RGB", (400, 400), random.randbytes(400 * 400 * 3)).save(image, "PNG")
    body = b"--x\r\nContent-Disposition: form-data; name=file; filename=n.png\r\n\r\n" + image.getvalue()
    body += b"\r\n--x--\r\n"
    head = request("POST", "/models/shapes/predict.json", f"Authorization: Bearer {token}", "Expect: 100-continue",
                   "Content-Type: multipart/form-data; boundary=x", f"Content-Length: {len(body)}")  # fmt: skip
    with socket.create_connection(("127.0.0.1", int(running_stack.gateway.rsplit(":", 1)[1])), timeout=15) as sock:
        sock.sendall(head)
        assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body[:100_000])
        time.sleep(0.3)  # the function has had the head (and the Expect, were it passed on) long since
        sock.sendall(body[100_000:])
        with sock.makefile("rb") as answers:
            status, _, reply = read_answer(answers, "POST")
    assert status == 200 and json.loads(reply)["prediction"], reply


def test_gateway_says_close_when_it_closes(running_stack):
    """An answer the gateway gives without reading the whole body (a function's 401 before the
    upload) says ``Connection: close``, as the connection is then closed: a client that reuses
    it (tritonclient does) otherwise lost its next request, the answer having said keep-alive."""
    port = int(running_stack.gateway.rsplit(":", 1)[1])
    body = b"x" * 5_000_000
    head = request("POST", "/v2/models/shapes/infer", "Content-Type: application/json",
                   f"Content-Length: {len(body)}")  # fmt: skip
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock, sock.makefile("rb") as answers:
        sock.sendall(head)
        with contextlib.suppress(OSError):  # the gateway may stop reading (and reset) once it has answered
            sock.sendall(body)
        status, headers, _ = read_answer(answers, "POST")
        assert status == 401 and headers.get("connection") == "close", headers
    session = requests.Session()  # what a pooling client sees: the next request is answered
    replies = [session.post(running_stack.gateway + "/v2/models/shapes/infer", data=body, timeout=30) for _ in range(2)]
    assert [reply.status_code for reply in replies] == [401, 401]
    assert session.get(running_stack.gateway + "/v2/health/live", timeout=10).status_code == 200


def test_gateway_answers_odd_paths_in_json(running_stack):
    port = int(running_stack.gateway.rsplit(":", 1)[1])
    for path in ["/robots.txt", "//models/shapes.json", "/models/shapes%0a.json", "/" + "a" * 9000]:
        code, headers, body = exchange(port, request("GET", path))
        assert code in (404, 414) and headers["content-type"] == "application/json", (path, code, body)
    assert requests.get(running_stack.gateway + "/openapi.json", timeout=10).json()["openapi"].startswith("3.")


# -- how answers are sent --------------------------------------------------------------------


def test_an_answer_head_waits_for_its_body_and_goes_out_with_it():
    """One send per answer: the client is woken once, with the whole answer (a head alone would
    cost the server a second syscall and a GIL hand-off, and the client a second wake-up)."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        sock = DeadlineSocket(ours.family, ours.type, ours.proto, fileno=ours.detach())
        theirs.setblocking(False)
        body = b'{"ok": true}'
        sock.begin(5, 5, 0)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
        with pytest.raises(BlockingIOError):
            theirs.recv(1)  # nothing yet: the head waits for the body
        sock.sendall(body)
        assert theirs.recv(100) == b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n" + body  # in one piece
        sock.end()
        sock.begin(5, 5, 0)
        sock.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
        sock.end()  # an answer without a body: its head goes at the end of the request
        assert theirs.recv(100) == b"HTTP/1.1 204 No Content\r\n\r\n"
        sock.begin(5, 5, 0)
        sock.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
        theirs.close()  # the client has gone: the request still ends, its deadlines lifted
        with pytest.raises(OSError):
            sock.end()
        assert sock.deadlines is None and sock.held == b""
        sock.close()


def test_bodiless_and_large_answers_arrive_whole_on_one_connection(serve):
    """HEAD, the API description (too large to join its head), a health check and a 404, one after
    the other on one kept-alive connection: each answer complete, none delayed to the next."""
    server = serve("predict", MODEL_NAME="shapes")
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock, sock.makefile("rb") as answers:
        for method, path, status in [("HEAD", "/v2/health/live", 200), ("GET", "/openapi.json", 200),
                                     ("GET", "/v2/health/live", 200), ("GET", "/nowhere", 404)]:  # fmt: skip
            sock.sendall(request(method, path))
            code, headers, body = read_answer(answers, method)
            assert code == status
            if path == "/openapi.json":
                assert int(headers["content-length"]) > JOIN_BODY_BYTES and json.loads(body)["openapi"].startswith("3.")


def read_answer(answers: io.BufferedReader, method: str) -> tuple[int, dict[str, str], bytes]:
    """The next answer on ``answers``: status, headers (lower-case names), whole body (without a
    Content-Length: the rest of the connection)."""
    status = int(answers.readline().split()[1])
    headers = {}
    while (line := answers.readline()) != b"\r\n":
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if method == "HEAD":
        return status, headers, b""
    if "content-length" not in headers:
        return status, headers, answers.read()  # to the end of the connection
    body = answers.read(int(headers["content-length"]))
    assert len(body) == int(headers["content-length"])
    return status, headers, body


def assert_refusals_keep_the_connection(port: int, refusals: list[tuple[str, str, int]]) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, sock.makefile("rb") as answers:
        for method, path, status in [*refusals, ("GET", "/v2/health/live", 200)]:
            sock.sendall(request(method, path))
            code, headers, body = read_answer(answers, method)
            assert (code, headers.get("connection")) == (status, "keep-alive"), (method, path, body)


def test_refusing_a_request_without_a_body_keeps_the_connection(serve):
    """A 404, 401 or 405 to a request that has no body leaves nothing unread: the client keeps
    its connection (gunicorn marks every request's input as terminated, with a body or not)."""
    server = serve("predict", MODEL_NAME="shapes")
    refusals = [("GET", "/nowhere", 404), ("GET", "/models/shapes.json", 401), ("DELETE", "/healthz", 405)]
    assert_refusals_keep_the_connection(server.port, refusals)
    code, headers, _ = exchange(server.port, request("POST", "/nowhere", "Content-Length: 5", body=b"hello"))
    assert (code, headers.get("connection")) == (404, "close")  # a body left unread still ends the connection


def main_thread_wakeups(pid: int) -> int:
    """Voluntary context switches of the server's main thread: the poller, when WORKERS=1."""
    status = Path(f"/proc/{pid}/task/{pid}/status").read_text()
    return int(status.split("voluntary_ctxt_switches:")[1].split()[0])


def test_requests_one_after_another_stay_with_their_thread(serve):
    """A client sending requests one after the other on a kept-alive connection is served by the
    same pool thread: the poller is not woken for each (it used to be: the connection handed back,
    its next request read and handed on)."""
    server = serve("token")
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock, sock.makefile("rb") as answers:
        sock.sendall(request("GET", "/v2/health/live"))  # not a probe of the kubelet's (those have a thread)
        assert read_answer(answers, "GET")[0] == 200
        before = main_thread_wakeups(server.proc.pid)
        for _ in range(100):
            sock.sendall(request("GET", "/v2/health/live"))
            assert read_answer(answers, "GET")[0] == 200
        woken = main_thread_wakeups(server.proc.pid) - before
    assert woken < 50, woken  # 0-2 on an idle machine (the poller's once-a-second turn); 101 before


def test_a_next_request_that_comes_late_or_in_pieces_loses_nothing(serve):
    """The pool thread waits only briefly for a next request: one that begins within the wait and
    ends after it, one that comes after it, and two sent at once are all answered in order; a
    head left unfinished still gets its 408 at the deadline."""
    server = serve("token")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock, sock.makefile("rb") as answers:
        sock.sendall(request("GET", "/v2/health/live"))
        assert read_answer(answers, "GET")[0] == 200
        head = request("GET", "/nowhere")
        sock.sendall(head[:10])  # within the wait...
        time.sleep(0.2)
        sock.sendall(head[10:])  # ...and the rest long after it
        assert read_answer(answers, "GET")[0] == 404
        time.sleep(0.2)
        sock.sendall(request("GET", "/v2/health/live") + request("DELETE", "/v2/health/live"))  # pipelined
        assert [read_answer(answers, "GET")[0], read_answer(answers, "DELETE")[0]] == [200, 405]
        started = time.monotonic()
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        code, headers, body = read_answer(answers, "GET")
        assert code == 408 and "not received in time" in json.loads(body)["error"]
        assert DEADLINE - 0.2 <= time.monotonic() - started <= DEADLINE + 1.5


def test_pipelined_requests_take_their_turn(serve):
    """Requests pipelined on one connection are served one by one through the queue, as every
    other request: two connections that keep thousands in flight do not hold the threads while
    a third client waits."""
    server = serve("token", THREADS="2")
    burst = request("GET", "/v2/health/live") * 3000
    floods = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(2)]
    try:
        for flood in floods:
            flood.sendall(burst)
        time.sleep(0.1)  # both are being served
        status, waited = timed_get(server.base + "/healthz")
        assert status == 200 and waited < 1.0, waited  # 1-6 ms; 0.8-1.3 s when a thread kept its pipeline
    finally:
        for flood in floods:
            flood.close()


def test_a_body_in_too_many_chunks_is_refused(serve, token_header):
    """gunicorn's parser spends some microseconds of Python on every chunk, whatever its size (a
    megabyte in one-byte chunks took 3.5 s of CPU), and the body limits count bytes: past
    MAX_BODY_CHUNKS chunks a body is refused (400, the connection closed); below, it is read."""
    server = serve("predict", MODEL_NAME="shapes")
    image = encode(demo_image("shapes", "circle", 3))
    form = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="c.png"\r\n\r\n'
            + image + b"\r\n--b--\r\n")  # fmt: skip
    bearer = "Authorization: " + token_header["Authorization"]
    head = [bearer, "Content-Type: multipart/form-data; boundary=b", "Transfer-Encoding: chunked"]

    def chunked(body: bytes, size: int) -> bytes:
        chunks = [body[at : at + size] for at in range(0, len(body), size)]
        return b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks) + b"0\r\n\r\n"

    path = "/models/shapes/predict.json"
    code, _, body = exchange(server.port, request("POST", path, *head, body=chunked(form, len(form) // 100 + 1)))
    assert code == 200 and json.loads(body)["prediction"] == "circle", body
    most = b"1\r\nx\r\n" * MAX_BODY_CHUNKS + b"0\r\n\r\n"  # read, and found no multipart form
    assert "no file" in assert_json_error(exchange(server.port, request("POST", path, *head, body=most)), 400)
    flood = b"1\r\nx\r\n" + most
    answer = exchange(server.port, request("POST", path, *head, body=flood))
    assert f"more than {MAX_BODY_CHUNKS} chunks" in assert_json_error(answer, 400)
    assert answer[1].get("connection") == "close"  # where the next request would start is unknown


@pytest.mark.parametrize("trailer", [b"", b"X-Checksum: 1\r\n"], ids=["plain", "with-trailer"])
def test_a_chunked_body_with_a_request_behind_it_is_answered(serve, trailer):
    """A small chunked body is read whole before dispatch, however the client packs it: followed
    by a pipelined request in the same send, or ending with a trailer, it is answered at once,
    not with a 408 at the header deadline."""
    server = serve("token")
    body = b'7;ext=1\r\n{"a": 1\r\n1\r\n}\r\n0\r\n' + trailer + b"\r\n"
    post = request("POST", "/token.json", "Content-Type: application/json", "Transfer-Encoding: chunked", body=body)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock, sock.makefile("rb") as answers:
        started = time.monotonic()
        sock.sendall(post + request("GET", "/v2/health/live"))
        assert read_answer(answers, "POST")[0] == 400  # answered: no keypair in that JSON
        assert read_answer(answers, "GET")[0] == 200
        assert time.monotonic() - started < DEADLINE / 2


def test_the_gateway_sends_a_request_without_a_body_on_without_one():
    """A GET reaches the function as it came, not with an empty chunked body (which a function
    refusing the request would leave unread, closing its connection; some servers refuse a GET
    with a body outright). A chunked upload still goes on chunked."""
    with socket.create_server(("127.0.0.1", 0)) as function:
        port = free_port()
        command = [sys.executable, "-m", "local.gateway", "--port", str(port),
                   "--token", f"http://127.0.0.1:{function.getsockname()[1]}"]  # fmt: skip
        gateway = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL)
        try:
            wait_http(f"http://127.0.0.1:{port}/healthz", gateway)
            received = []
            for body in (None, iter([b"{}"])):
                asked = threading.Thread(target=requests.post if body else requests.get,
                                         args=(f"http://127.0.0.1:{port}/session.json",),
                                         kwargs={"data": body, "timeout": 10})  # fmt: skip
                asked.start()
                connection, _ = function.accept()
                with connection:
                    connection.settimeout(10)
                    data = b""
                    # Until the head, and for the upload its last chunk, after the head (a head
                    # whose request id ends in 0 ends in "0\r\n\r\n" too).
                    while not (
                        b"\r\n\r\n" in data and (not body or data.split(b"\r\n\r\n", 1)[1].endswith(b"0\r\n\r\n"))
                    ) and (chunk := connection.recv(65536)):
                        data += chunk
                    connection.settimeout(0.3)  # and whatever follows at once
                    with contextlib.suppress(TimeoutError):
                        data += connection.recv(65536)
                    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
                asked.join(10)
                received.append(data)
        finally:
            gateway.terminate()
            gateway.wait(10)
    head, _, rest = received[0].partition(b"\r\n\r\n")
    assert head.startswith(b"GET /session.json ") and b"transfer-encoding" not in head.lower() and rest == b""
    head, _, rest = received[1].partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower() and rest == b"2\r\n{}\r\n0\r\n\r\n"


def test_the_servers_own_refusal_of_a_head_request_has_no_body(serve):
    """RFC 9110 9.3.2: an answer to HEAD has no content, the worker's own refusals included (a
    transfer coding it does not do: 501; a head over 64 KiB: 431), though Content-Length says
    what a GET would get."""
    server = serve("predict", MODEL_NAME="shapes")
    fields = "".join(f"X-{n}: 1\r\n" for n in range(200))
    for payload, status in (
        (request("HEAD", "/healthz", "Transfer-Encoding: gzip, chunked", body=b"0\r\n\r\n"), 501),
        (f"HEAD /healthz HTTP/1.1\r\nX-Big: {'b' * 70_000}".encode(), 431),
        # Refused by gunicorn's parser, before there is a request to tell the method:
        (f"HEAD /healthz HTTP/1.1\r\nHost: x\r\n{fields}\r\n".encode(), 431),  # too many fields
        (f"HEAD /{'a' * 9000} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 414),
        (b"HEAD /healthz HTTP/1.1\r\nHost: x\r\nBad Name: 1\r\n\r\n", 400),
        (b"HEAD /healthz HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"\r\nHEAD /healthz HTTP/1.1\r\nHost: x\r\nBad Name: 1\r\n\r\n", 400),  # one leading CRLF is allowed
    ):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(payload)
            received = b""
            while chunk := sock.recv(65536):  # the refusal closes the connection
                received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(f"HTTP/1.1 {status} ".encode()) and body == b"", received
        assert b"Content-Length: " in head
