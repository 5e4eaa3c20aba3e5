"""The local gateway's own answers (local/gateway.py), over real HTTP on the running stack."""

import pytest
import requests


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/docs", "/", "/openapi.json", "/openapi/token.json"])
def test_its_own_paths_answer_a_wrong_method_with_405_as_a_function_does(running_stack, path):
    reply = requests.post(running_stack.gateway + path, timeout=10)
    assert reply.status_code == 405 and reply.headers["Allow"] == "GET, HEAD"
    assert "method not allowed" in reply.json()["error"]
    assert requests.get(running_stack.gateway + path, timeout=10).status_code == 200


def test_a_path_of_nobody_stays_404_whatever_the_method(running_stack):
    for method in ("GET", "POST"):
        reply = requests.request(method, running_stack.gateway + "/robots.txt", timeout=10)
        assert reply.status_code == 404 and "no such path" in reply.json()["error"]
