"""The local gateway's own answers (local/gateway.py), over real HTTP on the running stack."""

import http.server
import json
import socket
import threading
import time

import pytest
import requests
import werkzeug.test

from local.gateway import Gateway
from local.helpers import free_port
from shared.access import AccessLog


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/docs", "/", "/openapi.json", "/openapi/token.json"])
def test_its_own_paths_answer_a_wrong_method_with_405_as_a_function_does(running_stack, path):
    reply = requests.post(running_stack.gateway + path, timeout=10)
    assert reply.status_code == 405 and reply.headers["Allow"] == "GET, HEAD"
    assert "method not allowed" in reply.json()["error"]
    assert requests.get(running_stack.gateway + path, timeout=10).status_code == 200


def test_the_root_is_v1_liveness_for_clients_and_the_docs_page_for_a_browser(running_stack):
    # KServe's SDK (is_server_live() with protocol v1) GETs the root with httpx's Accept: */*.
    for accept in ("*/*", "application/json", "application/json, text/html;q=0.1"):
        reply = requests.get(running_stack.gateway + "/", headers={"Accept": accept}, timeout=10)
        assert reply.status_code == 200 and reply.json() == {"status": "alive"}, accept
        assert reply.headers["Vary"] == "Accept"  # a cache in front keeps the two answers apart
    browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    page = requests.get(running_stack.gateway + "/", headers={"Accept": browser}, timeout=10)
    assert page.headers["Content-Type"].startswith("text/html") and "swagger-ui" in page.text
    assert page.headers["Vary"] == "Accept"
    assert page.text == requests.get(running_stack.gateway + "/docs", timeout=10).text


@pytest.mark.parametrize("path", ["/robots.txt", "/docs/nothing.js", "/openapi/nobody.json", "/openapi/token"])
def test_a_path_of_nobody_stays_404_whatever_the_method(running_stack, path):
    for method in ("GET", "POST"):
        reply = requests.request(method, running_stack.gateway + path, timeout=10)
        assert reply.status_code == 404 and "no such" in reply.json()["error"], (method, path)


def test_a_100_continue_never_follows_its_answer(running_stack):
    """A client that asked "Expect: 100-continue" and got its final answer without a 100 was
    not asked for its body: the connection closes, with no 100 sent after the answer (that 100
    would be read as the next answer, and the body's bytes as the next request)."""
    port = int(running_stack.gateway.rsplit(":", 1)[1])
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head)
        received = b""
        while chunk := sock.recv(65536):  # until the server closes
            received += chunk
    assert received.startswith(b"HTTP/1.1 200 ") and received.count(b"HTTP/1.1") == 1, received


class _Echo(http.server.BaseHTTPRequestHandler):
    """A function stand-in that answers with the headers it got, and one for its own hop."""

    def do_POST(self):
        body = json.dumps(dict(self.headers.items())).encode()
        self.send_response(200)
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body)),
                   "Connection": "X-Upstream-Hop", "X-Upstream-Hop": "1", "X-Upstream-Kept": "1"}  # fmt: skip
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_headers_a_connection_header_names_stay_on_their_hop():
    # RFC 9110 7.6.1: a proxy removes the headers that Connection lists, both ways.
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Echo)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{upstream.server_address[1]}"
        client = werkzeug.test.Client(AccessLog(Gateway(url, {}), "gateway"))
        reply = client.post("/token.json", data=b"{}", headers={
            "Connection": "keep-alive, X-Hop-Secret", "X-Hop-Secret": "1", "X-Kept": "1"})  # fmt: skip
        seen = {name.lower() for name in reply.get_json()}
        assert "x-kept" in seen and "x-hop-secret" not in seen, seen
        assert reply.headers.get("X-Upstream-Kept") == "1" and "X-Upstream-Hop" not in reply.headers
    finally:
        upstream.shutdown()
        upstream.server_close()


def exchange(port: int, request: bytes) -> bytes:
    """``request`` sent on a connection of its own; everything received until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


@pytest.mark.parametrize("host", ["a%25b", "%", "x%y:80", "h" * 64])
def test_an_absolute_form_target_reaches_the_function_as_its_path(running_stack, host):
    """RFC 9112 3.2.2: a proxy takes absolute-form targets. The gateway sends the function the
    path alone (http.client made the Host of it: a 500 for a host with '%')."""
    port = int(running_stack.gateway.rsplit(":", 1)[1])
    reply = exchange(port, f"GET http://{host}/v2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert reply.startswith(b"HTTP/1.1 200 ") and b'"name":"thalamus"' in reply.replace(b" ", b""), reply


def test_a_missing_or_malformed_host_is_a_400_at_the_edge(running_stack):
    """RFC 9112 3.2, as Envoy answers it on a cluster: the gateway refuses the request itself."""
    port = int(running_stack.gateway.rsplit(":", 1)[1])
    for field in ("", "Host: a b\r\n", "Host: x/y\r\n"):
        reply = exchange(port, f"GET /v2 HTTP/1.1\r\n{field}Connection: close\r\n\r\n".encode())
        assert reply.startswith(b"HTTP/1.1 400 ") and b"Host" in reply and b"application/json" in reply, reply
    assert exchange(port, b"GET /v2 HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200 ")  # 1.0 needs no Host


def test_an_absolute_form_target_without_a_path_is_the_root(running_stack):
    port = int(running_stack.gateway.rsplit(":", 1)[1])
    reply = exchange(port, b"GET http://x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 ") and b'"alive"' in reply, reply


def test_close_among_connection_options_closes_after_the_answer(running_stack):
    """RFC 9112 9.6: "close" anywhere in Connection ends the connection after this answer: the
    request pipelined after it is not answered."""
    port = int(running_stack.gateway.rsplit(":", 1)[1])
    two = b"GET /v2 HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, close\r\n\r\nGET /v2 HTTP/1.1\r\nHost: x\r\n\r\n"
    reply = exchange(port, two)
    assert reply.count(b"HTTP/1.1 200 ") == 1 and b"Connection: close" in reply, reply


class _Reader(http.server.BaseHTTPRequestHandler):
    """A function stand-in that reads the whole body it was promised, and notes what came."""

    received: list[int] = []

    def do_POST(self):
        length, got = int(self.headers["Content-Length"]), b""
        while len(got) < length and (chunk := self.rfile.read(min(65536, length - len(got)))):
            got += chunk
        type(self).received.append(len(got))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_body_that_ends_early_cuts_the_function_off_at_once():
    """A client gone mid-upload: the gateway closes its connection to the function at once (a
    400), instead of leaving the function waiting for bytes that never come until its 408."""
    _Reader.received = []
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Reader)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    try:
        gateway = AccessLog(Gateway(f"http://127.0.0.1:{upstream.server_address[1]}", {}, timeout=30), "gateway")
        environ = werkzeug.test.EnvironBuilder("/token.json", method="POST", data=b"x" * 50_000).get_environ()
        environ["CONTENT_LENGTH"] = "100000"  # promised, never sent: the client went away
        statuses = []
        body = gateway(environ, lambda status, headers, exc_info=None: statuses.append(status))
        b"".join(body)
        # Without the cut, the function waits until the gateway gives up on it, at its 30 s timeout.
        deadline = time.monotonic() + 10
        while not _Reader.received and time.monotonic() < deadline:
            time.sleep(0.01)
        assert statuses[0].startswith("400") and _Reader.received == [50_000]
    finally:
        upstream.shutdown()
        upstream.server_close()


def test_a_client_may_send_100_header_fields_through_the_gateway(running_stack):
    """A client's 100 header fields (Envoy's default limit, and the gateway's) reach the function
    with the ones the gateway adds (X-Forwarded-For, X-Request-Id, Accept-Encoding): the function
    leaves room for a proxy's; the 101st is the gateway's 431."""
    port = int(running_stack.gateway.rsplit(":", 1)[1])

    def with_fields(count: int) -> bytes:
        fields = "".join(f"X-F{i}: v\r\n" for i in range(count - 2))  # with Host and Connection
        return exchange(port, f"GET /v2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{fields}\r\n".encode())

    assert with_fields(100).startswith(b"HTTP/1.1 200 ")
    assert with_fields(101).startswith(b"HTTP/1.1 431 ")


def test_the_answer_is_http_1_1_whatever_minor_version_the_request_names(running_stack):
    port = int(running_stack.gateway.rsplit(":", 1)[1])
    reply = exchange(port, b"GET /v2 HTTP/1.7\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:40]


def test_expect_100_continue_without_a_body_keeps_the_connection(running_stack):
    """A bodiless request with Expect: 100-continue has nothing to invite: answered and kept
    alive (the gateway never reads such a body; the connection had closed after a keep-alive
    answer, dropping the request pipelined after it)."""
    port = int(running_stack.gateway.rsplit(":", 1)[1])
    two = (b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n"
           b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")  # fmt: skip
    reply = exchange(port, two)
    assert reply.count(b"HTTP/1.1 200 ") == 2 and b"100 Continue" not in reply, reply


def test_the_early_answer_look_works_past_descriptor_1023():
    """The gateway looks at the function's socket before each block of a body it forwards; with
    select() a descriptor past 1,023 (a gateway holding many connections) was a ValueError, and
    every proxied upload a 500."""
    import http.client
    import io
    import os

    from local.gateway import _AnsweredEarly, _Upload

    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    function_side, gateway_side = socket.socketpair()
    try:
        assert gateway_side.fileno() > 1023
        conn = http.client.HTTPConnection("127.0.0.1")
        conn.sock = gateway_side
        upload = _Upload(conn, io.BytesIO(b"x" * 200_000), 200_000)
        assert upload.read() == b"x" * 65536  # nothing from the function yet: the body goes on
        function_side.sendall(b"HTTP/1.1 401 Unauthorized\r\n")
        time.sleep(0.05)
        with pytest.raises(_AnsweredEarly):
            upload.read()
    finally:
        function_side.close()
        gateway_side.close()
        for fd in filler:
            os.close(fd)
