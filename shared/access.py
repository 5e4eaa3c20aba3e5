"""One access line and the request metrics per request, and the request id, for any WSGI app.

:class:`AccessLog` wraps a function's app (and the local gateway): it keeps the caller's
``X-Request-Id`` (or the trace id of a W3C ``traceparent``) or makes one, echoes it in the answer,
sets it for every log line about the request, and when the answer's last byte is out logs one
line (route template, never the raw path) and counts the request in Prometheus. ``/metrics``
scrapes and the probes are logged at DEBUG only, unless they fail.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from shared import metrics
from shared.auth import Session
from shared.config import IPNetwork
from shared.errors import clipped
from shared.logs import REQUEST_ID, SECRET_ID, access_level

log = logging.getLogger("thalamus.access")
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
TRACEPARENT_RE = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
# Metric labels come from bounded sets: any other method (a client may send any token) is "other",
# or each made-up one would add series to every scrape for the life of the process.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})
# Proxies in front of a function: an ingress, the activator, queue-proxy, perhaps a load balancer.
# Without a bound, a trusted peer's X-Forwarded-For of 7,000 hops took 34 ms to walk.
MAX_FORWARDED_HOPS = 16
# Scrapes and probes come every few seconds from the cluster itself: their access lines are DEBUG
# unless they fail (a probe's 26,000 lines a day per pod would drown the clients' requests).
QUIET_ROUTES = frozenset({"/metrics", "/healthz", "/readyz"})


@dataclass
class Exchange:
    """What the application learned about one request while answering it, for the answer's
    headers, usage counting, the access line and metrics."""

    route: str | None = None  # the route template, e.g. "/models/<name>/predict.json"
    model: str | None = None
    session: Session | None = None
    public_key: str | None = None  # the caller's key when known without a session (token requests)
    error: str | None = None  # the message of an error answer


def exchange_of(environ: dict[str, Any]) -> Exchange:
    """The :class:`Exchange` of the request ``environ`` belongs to (made on first use)."""
    found = environ.get("thalamus.exchange")
    if not isinstance(found, Exchange):
        found = environ["thalamus.exchange"] = Exchange()
    return found


def request_id(environ: dict[str, Any]) -> str:
    """The caller's X-Request-Id when it is a sane id (and not shaped like a secret key or a
    token: it is logged), else the trace id of its traceparent, else a new random id."""
    given = environ.get("HTTP_X_REQUEST_ID", "")
    if REQUEST_ID_RE.fullmatch(given) and not SECRET_ID.fullmatch(given):  # a token sent as one stays out
        return str(given)
    trace = TRACEPARENT_RE.fullmatch(environ.get("HTTP_TRACEPARENT", "").strip().lower())
    if trace and trace.group(1) != "0" * 32:
        return trace.group(1)
    return uuid.uuid4().hex


def client_address(environ: dict[str, Any], trusted: tuple[IPNetwork, ...]) -> str:
    """The caller's IP address, for per-address limits and the access line.

    The socket peer, unless it is one of the ``trusted`` proxy networks: then walk
    X-Forwarded-For from the right (each proxy appends the address it saw; what a client forges
    stays on the left) past the trusted proxies to the first other address. Only what a trusted
    hop wrote is believed: an entry that is not an IP address ends the walk at the hop that
    wrote it. At most MAX_FORWARDED_HOPS entries are read (past them, the last trusted hop read
    stands for the client). Always a valid IP address in canonical form.
    """
    peer = environ.get("REMOTE_ADDR")
    if not trusted and peer:
        peer = str(peer)  # the socket's own address, canonical as it is (an access line each: no parse),
        # except an IPv4 client of a dual-stack socket (--host ::), which is its IPv4 address
        return peer if not peer.startswith("::ffff:") else str(_ip(peer) or peer)
    believed = _ip(str(peer or "").partition("%")[0])  # a link-local peer's zone is this host's, not the client's
    if believed is None:
        return "0.0.0.0"  # noqa: S104 (no peer at all: a unix socket or a test; one shared bucket)
    forwarded = str(environ.get("HTTP_X_FORWARDED_FOR", "")).rsplit(",", MAX_FORWARDED_HOPS)[-MAX_FORWARDED_HOPS:]
    for entry in reversed(forwarded):
        if not any(believed in network for network in trusted):
            break  # ``believed`` is not a proxy: it is the client
        # A zone (fe80::1%eth0) is not a client's: ipaddress takes any text after the %, which
        # would be logged as the client and make each variant an address of its own for the limits.
        address = _ip(entry.strip()) if "%" not in entry else None
        if address is None:
            break  # garbage where an address should be: the hop that passed it on is the client
        believed = address
    return str(believed)


def _ip(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``text`` as an address, an IPv4-mapped IPv6 one (::ffff:10.0.0.1, how a dual-stack socket
    or proxy shows an IPv4 peer) as its IPv4 address: one client, one bucket, and a trusted IPv4
    proxy is trusted whichever way it is shown."""
    try:
        address = ipaddress.ip_address(text or "")
    except ValueError:
        return None
    return (address.ipv4_mapped or address) if isinstance(address, ipaddress.IPv6Address) else address


class AccessLog:
    """WSGI middleware: request id, one access line, request metrics (see the module doc)."""

    def __init__(self, app: WSGIApp, function: str, trusted: tuple[IPNetwork, ...] = ()) -> None:
        """``trusted``: the proxy networks whose X-Forwarded-For names the client (TRUSTED_PROXIES)."""
        self.app, self.function, self.trusted = app, function, trusted

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        started = time.perf_counter()
        rid = environ["thalamus.request_id"] = request_id(environ)
        exchange = exchange_of(environ)
        answer: dict[str, Any] = {}

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            answer["status"] = int(status.split(" ", 1)[0])
            headers.append(("X-Request-Id", rid))
            return start_response(status, headers, exc_info)

        token = REQUEST_ID.set(rid)
        try:
            body = self.app(environ, start)
        finally:
            REQUEST_ID.reset(token)
        return _Counted(body, lambda sent: self._done(environ, exchange, answer.get("status", 500), sent, started))

    def _done(self, environ: dict[str, Any], exchange: Exchange, status: int, sent: int, started: float) -> None:
        seconds = time.perf_counter() - started
        route = exchange.route or "unmatched"
        method = str(environ.get("REQUEST_METHOD", ""))
        labels = (self.function, route, method if method in METHODS else "other", str(status))
        metrics.REQUESTS.labels(*labels).inc()
        metrics.REQUEST_SECONDS.labels(*labels).observe(seconds)
        session = exchange.session
        fields = {
            "event": "access",
            "method": method[:16],
            "route": route,
            "status": status,
            "latency_ms": round(seconds * 1000, 2),
            "request_id": environ["thalamus.request_id"],
            "client": client_address(environ, self.trusted),
            "public_key": session.public_key if session else exchange.public_key,
            "model": exchange.model and clipped(exchange.model, 64),  # a path's, maybe no model's
            "bytes_in": int(environ.get("CONTENT_LENGTH") or 0),
            "bytes_out": sent,
            "error": clipped(exchange.error) if exchange.error and status >= 400 else None,
        }
        level = access_level(status, quiet=route in QUIET_ROUTES)
        message = f"{status} {method} {route} {fields['latency_ms']} ms"
        log.log(level, message, extra={key: value for key, value in fields.items() if value is not None})


class _Counted:
    """The answer's body, counting the bytes that go out; ``done(bytes)`` runs once, at close."""

    def __init__(self, body: Iterable[bytes], done: Callable[[int], None]) -> None:
        self.body, self.done, self.sent = body, done, 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.body:
            self.sent += len(chunk)
            yield chunk

    def close(self) -> None:
        try:
            close = getattr(self.body, "close", None)
            if close is not None:
                close()
        finally:
            self.done(self.sent)
