"""shared/config.py: the settings every function and tool reads once, and what they refuse."""

import pytest

from shared.admin import parse_duration
from shared.config import ConfigError, Rate, Settings


def test_bad_trusted_proxies_is_a_config_error():
    with pytest.raises(ConfigError, match="TRUSTED_PROXIES"):
        Settings.from_env({"TRUSTED_PROXIES": "10.0.0.0/8,nonsense"})


@pytest.mark.parametrize(
    ("raw", "expected"), [("0", False), ("off", False), ("false", False), ("1", True), ("ON", True)]
)
def test_token_cache_switch(raw, expected):
    assert Settings.from_env({"TOKEN_CACHE": raw}).token_cache is expected
    assert Settings.from_env({}).token_cache is True


def test_bad_switch_and_interpreters_are_config_errors():
    with pytest.raises(ConfigError, match="TOKEN_CACHE must be 1 or 0"):
        Settings.from_env({"TOKEN_CACHE": "maybe"})
    with pytest.raises(ConfigError, match="MODEL_INTERPRETERS must be a whole number, 1 to 1,024, got 0"):
        Settings.from_env({"MODEL_INTERPRETERS": "0"})


@pytest.mark.parametrize(
    "variable",
    ["TOKEN_TTL", "AUTH_FAILURE_WINDOW", "MAX_TOKENS_PER_KEY", "AUTH_MAX_FAILURES", "MAX_UPLOAD_BYTES",
     "MAX_IMAGE_PIXELS", "DECODE_MEMORY_MB", "MODEL_INTERPRETERS", "WORKERS", "THREADS", "REQUEST_HEADER_TIMEOUT",
     "REQUEST_BODY_TIMEOUT", "PORT"],
)  # fmt: skip
def test_a_number_past_what_any_request_could_use_stops_the_start(variable):
    # A TTL of 10**21 s passed the start, then Redis refused it: a 500 on every token request.
    with pytest.raises(ConfigError, match=f"{variable} must be .*, 1 to [0-9,]+, got 1000000000000000000000$"):
        Settings.from_env({variable: str(10**21)})
    assert Settings.from_env({variable: "1"})


@pytest.mark.parametrize(
    ("unit", "seconds"),
    [("s", 1), ("sec", 1), ("seconds", 1), ("m", 60), ("min", 60), ("Minute", 60), ("h", 3600), ("HOURS", 3600),
     ("d", 86400), ("day", 86400)],
)  # fmt: skip
def test_rates_and_durations_take_the_same_units(unit, seconds):
    """``--rate 10/m`` and ``--grace 5min`` mean what they say, as ``10/min`` and ``5m`` do."""
    assert Rate.parse(f"10/{unit}") == Rate(10, seconds)
    assert parse_duration(f"5{unit}") == parse_duration(f"5 {unit}") == 5 * seconds
    assert Settings.from_env({"DEFAULT_KEY_RATE": f"7/{unit}"}).default_key_rate == Rate(7, seconds)


@pytest.mark.parametrize("text", ["5y", "5", "m", "0s", "-5m", "1.5h", "5 mi", "6M", "５m"])
def test_durations_that_are_not_one_are_refused(text):
    with pytest.raises(ValueError, match="duration must"):
        parse_duration(text)


def test_an_upper_case_m_is_refused_as_ambiguous():
    """``--expires 6M`` may mean six months: it is refused, not taken as six minutes."""
    with pytest.raises(ValueError, match=r"units s, sec, second\(s\); m, min.*a lone M could mean months"):
        Rate.parse("10/M")
    with pytest.raises(ValueError, match="a lone M could mean months"):
        parse_duration("6 M")
    with pytest.raises(ConfigError, match="DEFAULT_KEY_RATE"):
        Settings.from_env({"DEFAULT_KEY_RATE": "10/M"})
    assert parse_duration("6m") == parse_duration("6MIN") == 360


@pytest.mark.parametrize(
    "url",
    ["redis://h", "redis://h/", "redis://h/3", "redis://h/%30", "redis://h/0/", "redis://[::1]:6380/1",
     "rediss://:pw@h:6380/0?ssl_cert_reqs=none", "unix:///run/redis.sock?db=2", "redis://h/0?db=1"],
)  # fmt: skip
def test_redis_urls_redis_py_reads_alike_are_accepted(url):
    assert Settings.from_env({"REDIS_URL": url}).redis_url == url


@pytest.mark.parametrize(
    ("url", "words"),
    [("redis://h/abc", "the path names the database"), ("redis://h/0?socket_read_size=0", "socket_read_size"),
     ("redis://h/0?socket_connect_timeout=0", "socket_connect_timeout"), ("redis://h/0?db=-1", "db must be"),
     ("redis://h/0?ssl_password=x", "'ssl_password' is for TLS: use a rediss:// URL"),
     ("unix:///run/redis.sock?ssl_cert_reqs=none", "'ssl_cert_reqs' is for TLS")],
)  # fmt: skip
def test_redis_urls_that_would_fail_every_request_stop_the_start(url, words):
    with pytest.raises(ConfigError, match=words):
        Settings.from_env({"REDIS_URL": url})
