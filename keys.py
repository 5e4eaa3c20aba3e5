#!/usr/bin/env python3
"""Thalamus admin CLI for API keys: generate, revoke, list, purge.

./keys.py -g client.json [--models shapes,arrows] [--label "team a"]
./keys.py -r pk_...
./keys.py -l
./keys.py -p
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

try:
    from local import redis_server
    from shared import config
    from shared.auth import AuthStore, parse_scopes
    from shared.errors import ThalamusError
except ImportError:
    # Run by a python without the project's packages: use the project's .venv when it exists.
    venv_python = Path(__file__).resolve().parent / ".venv" / "bin" / "python"
    if venv_python.exists() and Path(sys.prefix).resolve() != venv_python.parent.parent.resolve():
        os.execv(str(venv_python), [str(venv_python), __file__, *sys.argv[1:]])
    sys.exit(
        "keys.py: dependencies missing; run ./start.sh once (it creates .venv), "
        "or: python3 -m venv .venv && .venv/bin/pip install -r requirements.txt -e ."
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="keys.py", description="Manage Thalamus API keys in Redis (REDIS_URL).")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument(
        "-g", "--generate", metavar="FILE", help="generate a keypair into FILE (mode 0600); prints the public key"
    )
    action.add_argument("-r", "--revoke", metavar="PUBLIC_KEY", help="revoke a key and every live token issued for it")
    action.add_argument("-p", "--purge", action="store_true", help="delete every key and token under THALAMUS_PREFIX")
    action.add_argument("-l", "--list", action="store_true", help="list keys (never secrets)")
    parser.add_argument("--models", metavar="A,B", help="with -g: models the key may call (default all)")
    parser.add_argument("--label", default="", help="with -g: a label shown by -l")
    args = parser.parse_args(argv)
    if (args.models or args.label) and not args.generate:
        parser.error("--models and --label go with -g")
    return args


def generate(auth: AuthStore, path: Path, models: str | None, label: str) -> None:
    scopes = parse_scopes(models)
    # Create the file first, exclusively and private, so a key is never made that cannot be saved.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise SystemExit(f"keys.py: {path} exists; refusing to overwrite it") from None
    except OSError as exc:
        raise SystemExit(f"keys.py: cannot create {path}: {exc.strerror}") from None
    try:
        pair = auth.create_key(scopes, label)
        with os.fdopen(fd, "w") as out:
            json.dump({"public_key": pair.public_key, "secret_key": pair.secret_key}, out, indent=2)
            out.write("\n")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    print(pair.public_key)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        settings = config.Settings.from_env()
        if redis_server.ensure(settings):
            print(
                f"keys.py: started the local Redis on 127.0.0.1:6379 in the background "
                f"(data in {redis_server.DATA_DIR}; ./start.sh uses it too)",
                file=sys.stderr,
            )
    except (config.ConfigError, redis_server.LocalRedisError) as exc:
        raise SystemExit(f"keys.py: {exc}") from None
    auth = AuthStore(settings)
    try:
        if args.generate:
            generate(auth, Path(args.generate), args.models, args.label)
        elif args.revoke:
            killed = auth.revoke_key(args.revoke)
            print(f"revoked {args.revoke} ({killed} live token(s) invalidated)")
        elif args.purge:
            print(f"purged {auth.purge()} Redis key(s) under {settings.prefix!r}")
        else:
            for key in auth.list_keys():
                scopes = ",".join(key.scopes) if key.scopes else "*"
                print(f"{key.public_key}  models={scopes}  tokens={key.live_tokens}  label={key.label!r}")
    except ThalamusError as exc:
        raise SystemExit(f"keys.py: {exc.message}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
