"""Typed settings, read from the environment once per process.

This is the only module that reads ``os.environ`` for Thalamus settings; everything else
receives a :class:`Settings` instance.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class ConfigError(ValueError):
    """An environment variable holds a value Thalamus cannot use."""


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(env: Mapping[str, str], name: str) -> tuple[IPNetwork, ...]:
    try:
        return tuple(ipaddress.ip_network(part.strip(), strict=False)
                     for part in env.get(name, "").split(",") if part.strip())
    except ValueError as exc:
        raise ConfigError(f"{name} must be comma-separated networks like 10.0.0.0/8: {exc}") from None


@dataclass(frozen=True)
class Settings:
    """Every tunable of Thalamus; see the README's configuration table."""

    redis_url: str = DEFAULT_REDIS_URL
    redis_url_is_default: bool = True
    prefix: str = "thalamus:"
    token_ttl: int = 3600
    model_name: str = ""
    model_dir: Path = PROJECT_ROOT / "models"
    max_upload_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    port: int = 8080
    # Brute-force protection for POST /token.json: failures allowed per window, per key and per
    # client address.
    auth_max_failures: int = 10
    auth_failure_window: int = 60
    # Networks of the proxies in front of us (gateway, ingress, activator, queue-proxy). Their
    # X-Forwarded-For entries are believed; empty means the socket peer is the client.
    trusted_proxies: tuple[IPNetwork, ...] = ()
    # Seconds a Redis connect/read may take before the request fails with 503.
    redis_timeout: float = 0.8

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``env`` (default: ``os.environ``); raise ConfigError on bad values."""
        env = os.environ if env is None else env
        model_name = env.get("MODEL_NAME", "").strip()
        model_dir = env.get("MODEL_DIR", "").strip()
        redis_url = env.get("REDIS_URL", "").strip()
        prefix = env.get("THALAMUS_PREFIX", "thalamus:")
        if not prefix:
            raise ConfigError("THALAMUS_PREFIX must not be empty (purge would touch every key)")
        return cls(
            redis_url=redis_url or DEFAULT_REDIS_URL,
            redis_url_is_default=not redis_url,
            prefix=prefix,
            token_ttl=_int(env, "TOKEN_TTL", 3600, minimum=1),
            model_name=model_name,
            model_dir=Path(model_dir) if model_dir else PROJECT_ROOT / "models" / model_name,
            max_upload_bytes=_int(env, "MAX_UPLOAD_BYTES", 10 * 1024 * 1024, minimum=1),
            max_image_pixels=_int(env, "MAX_IMAGE_PIXELS", 40_000_000, minimum=1),
            port=_int(env, "PORT", 8080, minimum=1),
            auth_max_failures=_int(env, "AUTH_MAX_FAILURES", 10, minimum=1),
            auth_failure_window=_int(env, "AUTH_FAILURE_WINDOW", 60, minimum=1),
            trusted_proxies=_networks(env, "TRUSTED_PROXIES"),
        )


def load() -> Settings:
    """Settings of this process, from ``os.environ``."""
    return Settings.from_env()
