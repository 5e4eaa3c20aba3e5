"""shared/http.py helpers that every function relies on."""

import flask
import pytest

from shared.http import client_address


@pytest.mark.parametrize("hops, forwarded, expected", [
    (0, "203.0.113.9", "10.0.0.1"),                      # no trusted proxy: the socket peer
    (1, "203.0.113.9", "203.0.113.9"),                   # one proxy appended the client
    (1, "6.6.6.6, 203.0.113.9", "203.0.113.9"),          # a spoofed entry on the left is ignored
    (2, "6.6.6.6, 203.0.113.9, 10.1.1.1", "203.0.113.9"),
    (2, "203.0.113.9", "10.0.0.1"),                      # fewer entries than hops: the peer
])
def test_client_address(hops, forwarded, expected):
    app = flask.Flask("t")
    with app.test_request_context(headers={"X-Forwarded-For": forwarded},
                                  environ_base={"REMOTE_ADDR": "10.0.0.1"}):
        assert client_address(flask.request, hops) == expected
