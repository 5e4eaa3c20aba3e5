"""shared/http.py helpers that every function relies on."""

import flask
import pytest

from shared.access import client_address
from shared.config import Settings
from shared.errors import MESSAGE_CHARS, clipped

CLUSTER = Settings.from_env({"TRUSTED_PROXIES": "127.0.0.0/8, 10.0.0.0/8"}).trusted_proxies


@pytest.mark.parametrize(
    "trusted, peer, forwarded, expected",
    [
        ((), "10.0.0.1", "203.0.113.9", "10.0.0.1"),  # nothing trusted: the peer
        (CLUSTER, "198.51.100.7", "203.0.113.9", "198.51.100.7"),  # untrusted peer: its XFF is ignored
        (CLUSTER, "127.0.0.1", "203.0.113.9, 10.2.0.5", "203.0.113.9"),  # queue-proxy ← ingress ← client
        (CLUSTER, "127.0.0.1", "203.0.113.9, 10.2.0.5, 10.3.0.8", "203.0.113.9"),  # + activator: same client
        (CLUSTER, "127.0.0.1", "6.6.6.6, 203.0.113.9, 10.2.0.5", "203.0.113.9"),  # a forged entry stays left
        (CLUSTER, "127.0.0.1", "10.9.9.9, 10.2.0.5", "10.9.9.9"),  # all internal: the first hop
        (CLUSTER, "127.0.0.1", "", "127.0.0.1"),
        (CLUSTER, "127.0.0.1", "not-an-ip, 10.2.0.5", "10.2.0.5"),  # garbage: the hop that passed it on
        (CLUSTER, "127.0.0.1", "203.0.113.9, " + "x" * 5000, "127.0.0.1"),  # never a string a client chose
        (CLUSTER, "127.0.0.1", "2001:DB8:0:0::7", "2001:db8::7"),  # canonical form: one bucket per address
        (CLUSTER, "127.0.0.1", " 203.0.113.9 ,10.2.0.5", "203.0.113.9"),
        # A zone is text of the client's choosing (a secret key, fields), and a bucket per variant
        (CLUSTER, "127.0.0.1", "fe80::1%1 status=200 sk_x, 10.2.0.5", "10.2.0.5"),
        (CLUSTER, "fe80::1%eth0", "", "fe80::1"),  # a link-local peer: its zone is this host's
        # 16 hops are read at most: past them, the last trusted one read stands for the client
        (CLUSTER, "127.0.0.1", "203.0.113.9, " + ", ".join(["10.2.0.5"] * 15), "203.0.113.9"),
        (CLUSTER, "127.0.0.1", "203.0.113.9, " + ", ".join([f"10.2.0.{i}" for i in range(16)]), "10.2.0.0"),
        # An IPv4 address shown as IPv4-mapped IPv6 (a dual-stack socket or proxy) is that address
        ((), "::ffff:203.0.113.9", "", "203.0.113.9"),
        (CLUSTER, "::ffff:127.0.0.1", "203.0.113.9", "203.0.113.9"),  # a trusted proxy all the same
        (CLUSTER, "127.0.0.1", "::FFFF:203.0.113.9, ::ffff:10.2.0.5", "203.0.113.9"),
        (CLUSTER, "127.0.0.1", "::ffff:cb00:7109", "203.0.113.9"),
    ],
)
def test_client_address(trusted, peer, forwarded, expected):
    app = flask.Flask("t")
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    with app.test_request_context(headers=headers, environ_base={"REMOTE_ADDR": peer}):
        assert client_address(flask.request.environ, trusted) == expected


def test_a_cut_message_never_shows_part_of_a_secret():
    """A message is cut to its limit after the secrets in it are redacted; a secret the cut would
    halve is redacted whole (half of one is too short to be known as one)."""
    secret = "sk_" + "ubV9IUn289OG8nSErQ5dTx1YkL0pAm7cWz3fGh2JiK4"
    # an earlier redaction shortening the text must not slide a later secret's first half in
    for text in ("A" * 600 + " y" * 40 + " " + secret + " tail", "x" * 580 + " " + secret):
        cut = clipped(text)
        assert len(cut) <= MESSAGE_CHARS and cut.endswith("…") and secret[:8] not in cut, cut[-80:]
    assert clipped("x" * 700) == "x" * (MESSAGE_CHARS - 1) + "…"
    # A token glued to other characters, which the cut would halve: left out, not cut in two (a
    # piece of it would be too short for the logs to know it).
    token = "Ib4Kg0GMxbCgXkyLiQDHnDX" + "q" * 20
    cut = clipped("x" * 580 + "." + token + "Z", MESSAGE_CHARS)
    assert cut == "x" * 580 + ".…" and token[:8] not in cut
    assert clipped("short " + secret) == "short [redacted]"  # under the limit too, as the logs would
    # ...but only what is exactly a secret: the names a client needs to mend its request stay.
    for name in ("Screenshot_20240315-143022_Chrome.png", "3F2504E0-4F89-11D3-9A0C-0305E82C3301.jpg",
                 "preprocessed_image_batch_float32", "pk_abcdefghijsk_QQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQ"):  # fmt: skip
        assert clipped(f"file {name!r}: truncated") == f"file {name!r}: truncated"


def test_an_answer_never_echoes_a_secret_sent_where_it_does_not_belong(shapes_client):
    """A client that put its secret key or a token in the path or a name gets its error without
    it, as the access line has it (a shared proxy or a browser may keep what an answer says)."""
    secret, token = "sk_" + "ubV9IUn289OG8nSErQ5dTx1YkL0pAm7cWz3fGh2JiK4", "Q" * 20 + "_" + "z" * 22
    for path in (f"/x/{secret}", f"/models/{token}.json", f"/v2/models/shapes/infer/{secret}"):
        reply = shapes_client.get(path)
        assert reply.status_code == 404 and "[redacted]" in reply.get_json()["error"], reply.get_json()
        assert secret not in reply.get_data(as_text=True) and token not in reply.get_data(as_text=True)


def test_routes_compile_no_url_builder_until_one_is_used(monkeypatch):
    """werkzeug compiles two URL builders per rule when a map is made (generated source: most of
    a function's routing set-up, at every cold start); nothing here builds URLs, so a Service's
    rules compile theirs on first use, and then build what werkzeug's own rules build."""
    from werkzeug.routing import Map, Rule

    from shared.http import Route, Service

    compiled = []
    real = Rule._compile_builder
    monkeypatch.setattr(Rule, "_compile_builder", lambda rule, *args: compiled.append(rule.rule) or real(rule, *args))
    rules = ["/models/<name>/predict.json", "/docs/<asset>", "/healthz"]
    service = Service(Settings(), [Route(rule, ("GET",), lambda call: {}) for rule in rules], openapi=dict)
    assert compiled == []
    adapter = service._map.bind("localhost")
    assert adapter.match("/models/shapes/predict.json", method="GET") == (rules[0], {"name": "shapes"})
    assert compiled == []
    plain = Map([Rule(rule, endpoint=rule) for rule in rules]).bind("localhost")
    for endpoint, values in ((rules[0], {"name": "shapes", "extra": "1"}), (rules[1], {"asset": "a b.css"})):
        assert adapter.build(endpoint, values) == plain.build(endpoint, values)
    assert adapter.build(rules[0], {"name": "x", "extra": "1"}, append_unknown=False) == "/models/x/predict.json"
