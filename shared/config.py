"""Typed settings, read from the environment once per process.

This is the only module that reads ``os.environ`` for Thalamus settings (prometheus_client's own
``PROMETHEUS_MULTIPROC_DIR`` is set and read by :mod:`shared.server` and :mod:`shared.metrics`):
a function's ``main.py``, the server, the local stack and ``keys.py`` call :func:`load` once and
hand the result on; tests build :class:`Settings` directly, or with :meth:`Settings.from_env`
on an environment of their own. Each default is written once, on the dataclass field.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, unquote_plus, urlsplit, urlunsplit

from shared.errors import StartupError

PROJECT_ROOT = Path(__file__).resolve().parent.parent

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(StartupError):
    """An environment variable holds a value Thalamus cannot use."""


# Units of time a rate (600/min) or a duration (90d) may be given in, in any case but "M" (a
# month, or a minute?): their seconds.
TIME_UNITS = {
    unit: seconds
    for seconds, units in ((1, "s sec secs second seconds"), (60, "m min mins minute minutes"),
                           (3600, "h hr hrs hour hours"), (86400, "d day days"))
    for unit in units.split()
}  # fmt: skip
UNITS_TEXT = "s, sec, second(s); m, min, minute(s); h, hr, hour(s); d, day(s), in any case but a lone M"


def unit_seconds(unit: str) -> int | None:
    """The seconds of a time unit (:data:`TIME_UNITS`), None for what is not one."""
    return None if unit == "M" else TIME_UNITS.get(unit.lower())


def units_error(what: str, example: str, text: str, unit: str | None) -> ValueError:
    """The error for ``text``, meant as a ``what`` like ``example``, whose ``unit`` (None: none
    read) is not one."""
    why = " (a lone M could mean months: write min for minutes, d for days)" if unit == "M" else ""
    return ValueError(f"{what} must look like {example} (units {UNITS_TEXT}), got {text!r}{why}")


_RATE_NAMES = {1: "s", 60: "min", 3600: "h", 86400: "d"}


def mask_url(url: str) -> str:
    """``url`` with its secrets replaced by ``***``: the password of its user part (the whole
    user part when it has no ``:``, as redis-py may read it as a password), the value of any
    query option that names a password (``password=``, ``ssl_password=``, the key file's) and
    whatever follows it, and a fragment. A password holding ``/ ? # & ;`` unencoded runs on
    past where the URL's syntax ends it: everything it may have run into is masked too."""
    try:
        parts = urlsplit(url)
    except ValueError:  # not even a URL (an unclosed IPv6 bracket): nothing of it is shown
        return "(not a URL)"
    if _at_past_host(parts):  # all before the last @ may be the password
        if "@" in parts.query or "@" in parts.fragment:  # and all after it, in a query password
            return f"{parts.scheme}://***"
        return mask_url(f"{parts.scheme}://{url.rpartition('@')[2]}").replace("://", "://***@", 1)
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.partition(':')[0]}:***@{host}" if ":" in user else f"***@{host}"
    fields = re.split(r"[&;]", parts.query) if parts.query else []
    shown: list[str] = []
    for field in fields:
        name = field.partition("=")[0]
        if "password" in unquote_plus(name).lower():  # redis-py unquotes names: pass%77ord is one too
            shown.append(f"{name}=***")
            break  # what follows may be the rest of a password that held & or ;
        shown.append(field)
    query = "&".join(shown) + ("&***" if len(shown) < len(fields) else "")
    masked = urlunsplit(parts._replace(netloc=netloc, query=query, fragment="***" if parts.fragment else ""))
    # urlunsplit writes unix:///path as unix:/path (no host): keep the form it was given in.
    return masked.replace(":", "://", 1) if not netloc and url.startswith(f"{parts.scheme}://") else masked


@dataclass(frozen=True)
class Rate:
    """A per-key request rate: at most ``limit`` requests in a window of ``window`` seconds."""

    limit: int
    window: int

    def __str__(self) -> str:
        return f"{self.limit}/{_RATE_NAMES.get(self.window, f'{self.window}s')}"

    @classmethod
    def parse(cls, text: str) -> Rate:
        """``"600/min"`` (units :data:`TIME_UNITS`) → Rate; ValueError saying what is wrong."""
        match = re.fullmatch(r"\s*([0-9]{1,9})\s*/\s*([a-z]+)\s*", text, re.IGNORECASE)
        window = unit_seconds(match[2]) if match else None
        if match is None or window is None:
            raise units_error("rate", "600/min", text, match[2] if match else None)
        if int(match[1]) < 1:
            raise ValueError(f"rate must allow at least 1 request, got {text!r}")
        return cls(int(match[1]), window)


@dataclass(frozen=True)
class Settings:
    """Every tunable of Thalamus; see the README's configuration table."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    # True when REDIS_URL was not set: keys.py and start.sh may then start a local Redis.
    redis_url_is_default: bool = True
    prefix: str = "thalamus:"
    token_ttl: int = 3600
    # Live tokens a key may have; a new one past this ends the key's oldest (see auth_scripts.ISSUE).
    max_tokens_per_key: int = 100
    model_name: str = ""
    # None: models/<model_name> in the project.
    model_dir: Path | None = None
    # The token function's list of deployed models (JSON); None: it lists none.
    model_catalog: Path | None = None
    max_upload_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    # LiteRT interpreters a predict process holds (each with its own packed weights), at most
    # one per CPU it may use; None: one per such CPU.
    model_interpreters: int | None = None
    # Bytes of images a predict process decodes at once, in MiB; None: from its memory limit.
    decode_memory_mb: int | None = None
    # Brute-force protection for POST /token.json: failures allowed per window.
    auth_max_failures: int = 10
    auth_failure_window: int = 60
    # Networks of the proxies in front of us (gateway, ingress, activator, queue-proxy). Their
    # X-Forwarded-For entries are believed; empty means the socket peer is the client.
    trusted_proxies: tuple[IPNetwork, ...] = ()
    # The request rate ./keys.py -g gives a new key when --rate is not given; None = unlimited.
    default_key_rate: Rate | None = None
    # Seconds a Redis connect/read may take before the request fails with 503.
    redis_timeout: float = 0.8
    # Predict functions answer known tokens from a cache Redis keeps current (CLIENT TRACKING).
    token_cache: bool = True
    # The server (shared/server.py): port (None: a function's 8080, as Knative sets it; the local
    # stack's gateway 8000), gunicorn worker processes and threads per worker (None: one per CPU
    # the process may use, at least 2; see shared.server.serving_threads).
    port: int | None = None
    workers: int = 1
    threads: int | None = None
    # Seconds a client has to send a request's headers, and its body (a body that keeps
    # flowing earns more time); then 408 and the thread is free again.
    header_timeout: int = 10
    body_timeout: int = 10
    # Logs on stdout: level, and "json" or "text" (None: text on a terminal, JSON otherwise).
    log_level: str = "INFO"
    log_format: str | None = None

    @property
    def redis_url_masked(self) -> str:
        """REDIS_URL with its password, if any, replaced by ``***``: safe to print or log."""
        return mask_url(self.redis_url)

    def summary(self) -> dict[str, Any]:
        """Every setting, as JSON-friendly values, secrets masked: for the start-up log line."""
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        values["redis_url"] = self.redis_url_masked
        values["model_dir"] = str(self.bundle_dir) if self.model_name else None
        values["trusted_proxies"] = [str(network) for network in self.trusted_proxies]
        values["default_key_rate"] = str(self.default_key_rate) if self.default_key_rate else None
        return values

    @property
    def bundle_dir(self) -> Path:
        """Folder of the model bundle a predict function serves."""
        return self.model_dir or PROJECT_ROOT / "models" / self.model_name

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``env`` (default: ``os.environ``); unset variables keep the defaults.

        Raises ConfigError naming the variable when a value is unusable.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for variable, (field, parse) in _VARIABLES.items():
            raw = env.get(variable, "").strip()
            if raw:
                values[field] = parse(variable, raw)
        if "THALAMUS_PREFIX" in env and not env["THALAMUS_PREFIX"]:
            raise ConfigError("THALAMUS_PREFIX must not be empty (purge would touch every key)")
        values["redis_url_is_default"] = "redis_url" not in values
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied (the server's port and threads as served; tests)."""
        return dataclasses.replace(self, **changes)


@functools.cache
def load() -> Settings:
    """This process's settings: the environment, read once and kept."""
    return Settings.from_env()


def _text(variable: str, raw: str) -> str:
    return raw


def _path(variable: str, raw: str) -> Path:
    return Path(raw)


# The URL options redis-py reads that make sense here; any other it passes on to the connection
# as an argument, many of which only fail on the first command (a 500 on every request).
REDIS_URL_OPTIONS = frozenset({
    "db", "username", "password", "client_name", "protocol", "health_check_interval", "max_connections",
    "retry_on_timeout", "socket_connect_timeout", "socket_keepalive", "socket_read_size", "socket_timeout",
    "ssl_ca_certs", "ssl_ca_data", "ssl_ca_path", "ssl_certfile", "ssl_keyfile", "ssl_password",
    "ssl_cert_reqs", "ssl_check_hostname", "ssl_min_version", "ssl_ciphers",
})  # fmt: skip


def _at_past_host(parts: SplitResult) -> bool:
    """Whether an ``@`` comes after what ``urlsplit`` took for the host: a user part holding
    ``/``, ``?`` or ``#`` unencoded, which it then read as the path, the query or the fragment."""
    return "@" in parts.path or "@" in parts.query or "@" in parts.fragment


def _redis_url(variable: str, raw: str) -> str:
    """A URL redis-py can connect with: its scheme, port and options checked now, at start, not
    on each request (an unknown option there was a 500 with a traceback on every one)."""
    import redis  # noqa: PLC0415 (only where a Redis URL is set)

    try:
        parts = urlsplit(raw)
        # A password's / ? # & ; unencoded: what follows them would be quoted below as a path or
        # an option's name (a # would also cut a password in the query short, unsaid).
        if _at_past_host(parts):
            raise ValueError("an @ after the host: percent-encode / ? # and @ in the password (%2F %3F %23 %40)")
        if "#" in raw:
            raise ValueError("a # (a fragment, which Redis URLs have not): percent-encode it as %23")
        names = [unquote_plus(field.partition("=")[0]) for field in re.split("[&;]", parts.query)]
        if unknown := sorted({name for name in names if name} - REDIS_URL_OPTIONS):
            known = ", ".join(sorted(REDIS_URL_OPTIONS))
            if any("password" in name.lower() for name in names):  # the unknown one may be a password's tail
                raise ValueError(f"an unknown option (percent-encode & and ; in a password: %26 %3B; known: {known})")
            raise ValueError(f"unknown option {unknown[0]!r} (known: {known})")
        if parts.scheme != "rediss" and (tls := sorted(name for name in names if name.startswith("ssl_"))):
            raise ValueError(f"option {tls[0]!r} is for TLS: use a rediss:// URL")  # redis-py: a TypeError
        if parts.scheme in ("redis", "rediss") and not re.fullmatch(r"/?|/[0-9]+/?", unquote_plus(parts.path)):
            raise ValueError(f"the path names the database, a number: {parts.path!r}")  # redis-py ignores others
        options = redis.connection.parse_url(raw)  # type: ignore[no-untyped-call]  # as redis-py reads the URL
        redis.ConnectionPool.from_url(raw).make_connection()  # built, connected nowhere: what else it refuses
        if re.search(r"\s", str(options.get("client_name") or "")):
            raise ValueError("client_name may not hold spaces (Redis refuses it)")
        if not 0 <= (db := options.get("db", 0)) <= 1_000_000:
            raise ValueError(f"db must be a database number, got {db}")
        # A read size of 0 reads nothing: every command would fail as if Redis had hung up.
        if (read_size := options.get("socket_read_size", 1)) < 1:
            raise ValueError(f"socket_read_size must be at least 1, got {read_size}")
        for option, lowest in (
            ("socket_timeout", 0.001),
            ("socket_connect_timeout", 0.001),
            ("health_check_interval", 0),
        ):
            if (seconds := options.get(option)) is not None and not lowest <= seconds <= 3600:
                raise ValueError(f"{option} must be seconds, from {lowest} to 3600, got {seconds}")
    except (ValueError, TypeError, LookupError, redis.RedisError) as exc:
        raise ConfigError(f"{variable} is not a usable Redis URL ({mask_url(raw)}): {exc}") from None
    return raw


def _int_up_to(highest: int, what: str = "") -> Callable[[str, str], int]:
    """A parser of whole numbers from 1 to ``highest``: past it, a value would fail every request
    (Redis refuses a TTL beyond its integers) or ask for what no machine has (a million threads)."""

    def parse(variable: str, raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{variable} must be an integer, got {raw!r}") from None
        if not 1 <= value <= highest:
            raise ConfigError(f"{variable} must be {what or 'a whole number'}, 1 to {highest:,}, got {raw}")
        return value

    return parse


DAY = 24 * 3600
_seconds_to_10_years = _int_up_to(3650 * DAY, "seconds")
_port = _int_up_to(65535, "a TCP port")


def _switch(variable: str, raw: str) -> bool:
    if raw.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if raw.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{variable} must be 1 or 0 (true/false, on/off), got {raw!r}")


def _choice(*allowed: str) -> Callable[[str, str], str]:
    def parse(variable: str, raw: str) -> str:
        if raw.lower() not in allowed and raw.upper() not in allowed:
            raise ConfigError(f"{variable} must be one of {', '.join(allowed)}, got {raw!r}")
        return raw.upper() if raw.upper() in allowed else raw.lower()

    return parse


def _networks(variable: str, raw: str) -> tuple[IPNetwork, ...]:
    try:
        return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in raw.split(",") if part.strip())
    except ValueError as exc:
        raise ConfigError(f"{variable} must be comma-separated networks like 10.0.0.0/8: {exc}") from None


def _rate(variable: str, raw: str) -> Rate:
    try:
        return Rate.parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{variable}: {exc}") from None


# Environment variable → (Settings field, parser). The defaults live on the fields above.
_VARIABLES: dict[str, tuple[str, Callable[[str, str], Any]]] = {
    "REDIS_URL": ("redis_url", _redis_url),
    "THALAMUS_PREFIX": ("prefix", _text),
    "TOKEN_TTL": ("token_ttl", _seconds_to_10_years),
    "MAX_TOKENS_PER_KEY": ("max_tokens_per_key", _int_up_to(100_000)),
    "MODEL_NAME": ("model_name", _text),
    "MODEL_DIR": ("model_dir", _path),
    "MODEL_CATALOG": ("model_catalog", _path),
    "MAX_UPLOAD_BYTES": ("max_upload_bytes", _int_up_to(1 << 30, "bytes")),
    "MAX_IMAGE_PIXELS": ("max_image_pixels", _int_up_to(1 << 30, "pixels")),
    "DECODE_MEMORY_MB": ("decode_memory_mb", _int_up_to(1 << 20, "MiB")),
    "MODEL_INTERPRETERS": ("model_interpreters", _int_up_to(1024)),
    "AUTH_MAX_FAILURES": ("auth_max_failures", _int_up_to(1_000_000)),
    "AUTH_FAILURE_WINDOW": ("auth_failure_window", _seconds_to_10_years),
    "TRUSTED_PROXIES": ("trusted_proxies", _networks),
    "DEFAULT_KEY_RATE": ("default_key_rate", _rate),
    "TOKEN_CACHE": ("token_cache", _switch),
    "PORT": ("port", _port),
    "WORKERS": ("workers", _int_up_to(64)),
    "THREADS": ("threads", _int_up_to(256)),
    "REQUEST_HEADER_TIMEOUT": ("header_timeout", _int_up_to(3600, "seconds")),
    "REQUEST_BODY_TIMEOUT": ("body_timeout", _int_up_to(3600, "seconds")),
    "LOG_LEVEL": ("log_level", _choice("DEBUG", "INFO", "WARNING", "ERROR")),
    "LOG_FORMAT": ("log_format", _choice("json", "text")),
}
