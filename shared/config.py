"""Typed settings, read from the environment once per process.

This is the only module that reads ``os.environ`` for Thalamus settings: a function's
``main.py`` calls :meth:`Settings.from_env` once and hands the result to its factory; tests
build :class:`Settings` directly. Each default is written once, on the dataclass field.
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

from shared.errors import StartupError

PROJECT_ROOT = Path(__file__).resolve().parent.parent

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(StartupError):
    """An environment variable holds a value Thalamus cannot use."""


# Units a request rate may be given in, and their length in seconds.
RATE_UNITS = {"s": 1, "sec": 1, "second": 1, "min": 60, "minute": 60, "h": 3600, "hour": 3600, "d": 86400, "day": 86400}
_RATE_NAMES = {1: "s", 60: "min", 3600: "h", 86400: "d"}


@dataclass(frozen=True)
class Rate:
    """A per-key request rate: at most ``limit`` requests in a window of ``window`` seconds."""

    limit: int
    window: int

    def __str__(self) -> str:
        return f"{self.limit}/{_RATE_NAMES.get(self.window, f'{self.window}s')}"

    @classmethod
    def parse(cls, text: str) -> Rate:
        """``"600/min"`` (units ``s``, ``min``, ``h``, ``d``) → Rate; ValueError saying what is wrong."""
        match = re.fullmatch(r"\s*([0-9]{1,9})\s*/\s*([a-z]+)\s*", text, re.IGNORECASE)
        if not match or match[2].lower() not in RATE_UNITS:
            raise ValueError(f"rate must look like 600/min (units s, min, h, d), got {text!r}")
        if int(match[1]) < 1:
            raise ValueError(f"rate must allow at least 1 request, got {text!r}")
        return cls(int(match[1]), RATE_UNITS[match[2].lower()])


@dataclass(frozen=True)
class Settings:
    """Every tunable of Thalamus; see the README's configuration table."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    # True when REDIS_URL was not set: keys.py and start.sh may then start a local Redis.
    redis_url_is_default: bool = True
    prefix: str = "thalamus:"
    token_ttl: int = 3600
    model_name: str = ""
    # None: models/<model_name> in the project.
    model_dir: Path | None = None
    max_upload_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 40_000_000
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
    # The server (shared/server.py): port, gunicorn worker processes and threads per worker.
    port: int = 8080
    workers: int = 1
    threads: int = 4

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
        """A copy with ``changes`` applied (for tests and the local stack)."""
        return dataclasses.replace(self, **changes)


@functools.cache
def load() -> Settings:
    """This process's settings: the environment, read once and kept."""
    return Settings.from_env()


def _text(variable: str, raw: str) -> str:
    return raw


def _path(variable: str, raw: str) -> Path:
    return Path(raw)


def _positive_int(variable: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{variable} must be an integer, got {raw!r}") from None
    if value < 1:
        raise ConfigError(f"{variable} must be at least 1, got {value}")
    return value


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
    "REDIS_URL": ("redis_url", _text),
    "THALAMUS_PREFIX": ("prefix", _text),
    "TOKEN_TTL": ("token_ttl", _positive_int),
    "MODEL_NAME": ("model_name", _text),
    "MODEL_DIR": ("model_dir", _path),
    "MAX_UPLOAD_BYTES": ("max_upload_bytes", _positive_int),
    "MAX_IMAGE_PIXELS": ("max_image_pixels", _positive_int),
    "AUTH_MAX_FAILURES": ("auth_max_failures", _positive_int),
    "AUTH_FAILURE_WINDOW": ("auth_failure_window", _positive_int),
    "TRUSTED_PROXIES": ("trusted_proxies", _networks),
    "DEFAULT_KEY_RATE": ("default_key_rate", _rate),
    "PORT": ("port", _positive_int),
    "WORKERS": ("workers", _positive_int),
    "THREADS": ("threads", _positive_int),
}
