"""Keypairs and bearer tokens as clients hold them, and as Redis keeps them: secrets as salted
scrypt hashes, tokens as SHA-256 digests, never in the clear."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field

# fullmatch only: "$" would also match before a trailing newline.
PUBLIC_KEY_RE = re.compile(r"pk_[A-Za-z0-9_-]{43}")
SECRET_KEY_RE = re.compile(r"sk_[A-Za-z0-9_-]{43}")
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{43}")

# scrypt cost: N=2^14, r=8, p=1 uses 16 MiB and about 40-50 ms on one core here (see README).
SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_LEN = 1 << 14, 8, 1, 32


def hash_secret(secret: str, salt: bytes | None = None) -> str:
    """Salted scrypt hash of ``secret``, encoded with its parameters: ``scrypt$N$r$p$salt$hash``.

    ``salt`` defaults to 16 fresh random bytes.
    """
    import scrypt  # noqa: PLC0415 (as in matching_hash)

    salt = salt or secrets.token_bytes(16)
    digest = scrypt.hash(secret.encode(), salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_LEN)
    b64 = base64.urlsafe_b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def salt_of(encoded: str) -> bytes | None:
    """The salt inside an encoded hash (None when it is not one of ours)."""
    try:
        return base64.urlsafe_b64decode(encoded.split("$")[4])
    except (IndexError, ValueError):
        return None


def matching_hash(secret: str, hashes: list[str]) -> str | None:
    """The first of ``hashes`` that ``secret`` matches, or None; constant-time compares.

    Hashes that share salt and parameters (a rotation with a grace period keeps the salt) cost
    one scrypt run together, so an old secret during its grace costs no more than the new one.
    """
    # Imported here, not at the top: only token issuance and keys.py hash secrets, so a predict
    # function never loads it (3 MB resident and 4 ms of its cold start).
    import scrypt  # noqa: PLC0415

    digests: dict[tuple[str, ...], bytes] = {}
    found = None
    for encoded in hashes:
        try:
            scheme, n, r, p, salt, digest = encoded.split("$")
            expected = base64.urlsafe_b64decode(digest)
            params = (scheme, n, r, p, salt, str(len(expected)))
            if params not in digests:
                digests[params] = scrypt.hash(
                    secret.encode(), base64.urlsafe_b64decode(salt), int(n), int(r), int(p), len(expected)
                )
        except (ValueError, scrypt.error):
            continue
        if scheme == "scrypt" and hmac.compare_digest(digests[params], expected) and found is None:
            found = encoded
    return found


@functools.cache
def dummy_hash() -> str:
    """A hash of no key's secret, verified against when the public key is unknown, so that answer
    takes as long as a wrong secret. Made on first use: computing it at import would add a scrypt
    run to every cold start."""
    return hash_secret(secrets.token_urlsafe(32))


def token_digest(token: str) -> str:
    """SHA-256 hex of a bearer token: the only form in which tokens are stored."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Keypair:
    """What a client holds: its public key (its name everywhere) and its secret (shown once)."""

    public_key: str
    secret_key: str = field(repr=False)

    @classmethod
    def new(cls, public_key: str | None = None) -> Keypair:
        """A random keypair; a new secret for ``public_key`` when one is given."""
        return cls(public_key or "pk_" + secrets.token_urlsafe(32), "sk_" + secrets.token_urlsafe(32))
