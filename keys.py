#!/usr/bin/env python3
"""Manage Thalamus API keys in Redis (REDIS_URL, under THALAMUS_PREFIX).

examples:
  ./keys.py -g client.json                         a keypair for every model (file mode 0600)
  ./keys.py -g client.json --models shapes,arrows --label "team a" --expires 90d --rate 600/min
  ./keys.py -l                                     list keys: models, rate, expiry, tokens, last use
  ./keys.py --edit pk_… --models shapes --rate 60/min     live tokens follow on their next request
  ./keys.py --edit pk_… --models '*' --rate none --expires never   all models, unlimited, forever
  ./keys.py --rotate pk_… -o new.json --grace 1h   new secret, same public key; old one works 1 h
  ./keys.py --rotate pk_… -o new.json --revoke-tokens     ...and end its live tokens now
  ./keys.py -r pk_…                                revoke a key and every live token issued for it
  ./keys.py --usage --days 7                       requests and errors per key, model, last use
  ./keys.py --audit --since 7d                     who created, edited, rotated, revoked, purged
  ./keys.py -p --yes                               delete every key, token, count and audit event
  add --json to -l, --usage or --audit for output a script can read

durations: 45s, 30m, 12h, 90d. --expires also takes an ISO date or date-time (2027-01-31,
2027-01-31T12:00, UTC unless an offset is given) or "never". rates: N/s, N/min, N/h, N/d, "none".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    from local import redis_server
    from shared import config, tokencache
    from shared.admin import UNCHANGED, KeyAdmin, parse_duration, parse_expiry
    from shared.credentials import PUBLIC_KEY_RE, Keypair
    from shared.errors import OutcomeUnknown, ThalamusError
    from shared.keyrecords import Actor, KeyInfo, parse_scopes, utc
    from shared.logs import redacted
    from shared.usage import USAGE_DAYS
except ImportError:
    # Run by a python without the project's packages: use the project's .venv when it exists.
    venv_python = Path(__file__).resolve().parent / ".venv" / "bin" / "python"
    if venv_python.exists() and Path(sys.prefix).resolve() != venv_python.parent.parent.resolve():
        os.execv(str(venv_python), [str(venv_python), __file__, *sys.argv[1:]])
    sys.exit(
        "keys.py: dependencies missing; run ./start.sh once (it creates .venv), "
        "or: python3 -m venv .venv && .venv/bin/pip install -r requirements.txt -e ."
    )

MODELS_DIR = Path(__file__).resolve().parent / "models"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="keys.py",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    action = parser.add_argument_group("actions (one of)").add_mutually_exclusive_group(required=True)
    action.add_argument(
        "-g", "--generate", metavar="FILE", help="new keypair into FILE (mode 0600, never overwritten); e.g. -g k.json"
    )
    action.add_argument("-l", "--list", action="store_true", help="list keys, never secrets; e.g. -l --json")
    action.add_argument("--edit", metavar="PUBLIC_KEY", help="change a key's --models/--label/--rate/--expires")
    action.add_argument(
        "--rotate", metavar="PUBLIC_KEY", help="new secret for the same public key into -o FILE; e.g. --grace 1h"
    )
    action.add_argument("-r", "--revoke", metavar="PUBLIC_KEY", help="revoke a key and every live token issued for it")
    action.add_argument(
        "--usage",
        nargs="?",
        const="",
        metavar="PUBLIC_KEY",
        help="requests and errors per key and model (all keys, or one); e.g. --usage --days 7",
    )
    action.add_argument("--audit", action="store_true", help="key events: who did what, when; e.g. --audit --since 7d")
    action.add_argument("-p", "--purge", action="store_true", help="delete everything under THALAMUS_PREFIX (asks)")
    key = parser.add_argument_group("key settings (with -g or --edit)")
    key.add_argument("--models", metavar="A,B", help="models the key may call, '*' = all (default); e.g. shapes,arrows")
    key.add_argument("--label", help='a note shown by -l and --usage; e.g. --label "team a"')
    key.add_argument("--rate", metavar="N/UNIT", help="requests allowed per s, min, h or d, or none; e.g. 600/min")
    key.add_argument("--expires", metavar="WHEN", help="90d, 12h, 2027-01-31, 2027-01-31T12:00 or never")
    more = parser.add_argument_group("other options")
    more.add_argument(
        "-o", "--output", metavar="FILE", help="with --rotate: file for the new keypair; e.g. -o new.json"
    )
    more.add_argument("--grace", metavar="DURATION", help="with --rotate: the old secret works this long; e.g. 1h")
    more.add_argument("--revoke-tokens", action="store_true", help="with --rotate: end the key's live tokens too")
    more.add_argument("--days", type=int, metavar="N", help="with --usage: the last N days (default 30, at most 90)")
    more.add_argument("--since", metavar="DURATION", help="with --audit: events this recent; e.g. 7d (default all)")
    more.add_argument("--json", action="store_true", help="with -l, --usage or --audit: JSON on stdout")
    more.add_argument("--yes", action="store_true", help="with -p: do not ask (required when stdin is no terminal)")
    args = parser.parse_args(argv)
    allowed = {
        "models": ("generate", "edit"),
        "label": ("generate", "edit"),
        "rate": ("generate", "edit"),
        "expires": ("generate", "edit"),
        "output": ("rotate",),
        "grace": ("rotate",),
        "revoke_tokens": ("rotate",),
        "since": ("audit",),
        "json": ("list", "usage", "audit"),
        "yes": ("purge",),
    }
    chosen = next(
        name
        for name in ("generate", "list", "edit", "rotate", "revoke", "usage", "audit", "purge")
        if getattr(args, name) not in (None, False)
    )
    for option, actions in allowed.items():
        if getattr(args, option) not in (None, False) and chosen not in actions:
            flags = " or ".join("--" + a if len(a) > 1 else a for a in actions)
            parser.error(f"--{option.replace('_', '-')} goes with {flags.replace('--generate', '-g')}")
    if args.days is not None and chosen != "usage":
        parser.error("--days goes with --usage")
    args.days = 30 if args.days is None else args.days
    if chosen == "rotate" and not args.output:
        parser.error("--rotate needs -o FILE for the new keypair")
    if chosen == "edit" and all(getattr(args, o) is None for o in ("models", "label", "rate", "expires")):
        parser.error("--edit needs at least one of --models, --label, --rate, --expires")
    args.action = chosen
    return args


def fail(message: str) -> SystemExit:
    """The one line keys.py prints before exiting with status 1."""
    return SystemExit(f"keys.py: {message}")


def public_key(text: str) -> str:
    if not PUBLIC_KEY_RE.fullmatch(text):
        # Not repeated as given: a secret key pasted in its place would be on the terminal again.
        hint = "; that is a secret key: keys are named by their public key" if text.startswith("sk_") else ""
        raise fail(f"not a public key (pk_ + 43 characters): {redacted(text)[:60]!r}{hint}")
    return text


def warn_unknown_models(scopes: list[str] | None) -> None:
    """Only a warning: a cluster may serve models this checkout has no bundle for."""
    for name in scopes or []:
        if not (MODELS_DIR / name / "model.json").exists():
            print(f"keys.py: warning: no bundle models/{name} here (fine if your cluster serves it)", file=sys.stderr)


def key_settings(args: argparse.Namespace, settings: config.Settings) -> dict[str, Any]:
    """The --models, --label, --rate and --expires given, parsed (ValueError/ThalamusError)."""
    changes: dict[str, Any] = {}
    if args.models is not None:
        changes["scopes"] = parse_scopes(args.models)
        warn_unknown_models(changes["scopes"])
    if args.label is not None:
        if not args.label.isprintable():  # a newline or an escape would forge rows of -l's table
            raise fail(f"--label must be printable text (no newline, tab or control character): {args.label!r}")
        changes["label"] = args.label
    if args.rate is not None:
        changes["rate"] = None if args.rate.strip().lower() in ("none", "unlimited") else config.Rate.parse(args.rate)
    elif args.action == "generate":
        changes["rate"] = settings.default_key_rate
    if args.expires is not None:
        changes["expires"] = parse_expiry(args.expires)
    return changes


def write_keypair(name: str, pair: Keypair, store: Callable[[], object]) -> None:
    """Save ``pair`` to the file ``name`` (created exclusively, mode 0600), then ``store()`` it in
    Redis: a key is never in force that was not saved first. A store that fails takes the file
    away, unless Redis took the command and fell silent: the key may then be in force, and its
    file is all that holds its secret, so it stays."""
    if not name or name.endswith(os.sep) or Path(name).name in ("", ".", ".."):
        raise fail(f"{name!r} names no file; give a file name, e.g. -g client.json")
    path = Path(name)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise fail(f"{path} exists; refusing to overwrite it") from None
    except OSError as exc:
        raise fail(f"cannot create {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w") as out:
            json.dump({"public_key": pair.public_key, "secret_key": pair.secret_key}, out, indent=2)
            out.write("\n")
        store()
    except OutcomeUnknown as exc:
        raise fail(f"{exc.detail}; {path} is kept in case it was (a token request with it tells)") from None
    except BaseException:
        path.unlink(missing_ok=True)
        raise


# -- output ------------------------------------------------------------------------------------


def table(headers: list[str], rows: list[list[str]]) -> None:
    # A label stored by another client may hold control characters: shown escaped, never run.
    rows = [[cell if cell.isprintable() else repr(cell)[1:-1] for cell in map(str, row)] for row in rows]
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    for row in [headers, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def when(epoch: float | None, now: float) -> str:
    """``2026-11-26 11:12Z (3h ago)``, ``… (in 89d)`` or ``never``."""
    if epoch is None:
        return "never"
    delta = abs(epoch - now)
    for unit, seconds in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if delta >= seconds or unit == "s":
            amount = f"{round(delta / seconds)}{unit}"
            break
    stamp = time.strftime("%Y-%m-%d %H:%MZ", time.gmtime(epoch))
    return f"{stamp} ({amount} ago)" if epoch <= now else f"{stamp} (in {amount})"


def key_json(key: KeyInfo, now: float) -> dict[str, Any]:
    return {
        "public_key": key.public_key,
        "label": key.label,
        "models": key.scopes,
        "rate": str(key.rate) if key.rate else None,
        "expires": utc(key.expires) if key.expires else None,
        "expired": key.expired(now),
        "created": utc(key.created),
        "live_tokens": key.live_tokens,
        "last_used": utc(key.last_used) if key.last_used else None,
    }


def list_keys(admin: KeyAdmin, as_json: bool) -> None:
    keys = admin.list_keys()
    admin.note_expired(keys)
    now = admin.redis_time()  # expired or not as the functions judge it, whatever this host's clock
    if as_json:
        print(json.dumps([key_json(key, now) for key in keys], indent=2))
        return
    if not keys:
        print(f"no keys under THALAMUS_PREFIX {admin.settings.prefix!r}")
        return
    rows = [
        [
            key.public_key,
            key.label or "-",
            ",".join(key.scopes) if key.scopes else "*",
            str(key.rate) if key.rate else "unlimited",
            ("EXPIRED " if key.expired(now) else "") + when(key.expires, now),
            str(key.live_tokens),
            when(key.last_used, now),
        ]
        for key in keys
    ]
    table(["PUBLIC KEY", "LABEL", "MODELS", "RATE", "EXPIRES", "TOKENS", "LAST USED"], rows)


def show_usage(admin: KeyAdmin, key: str | None, days: int, as_json: bool) -> None:
    if not 1 <= days <= USAGE_DAYS:
        raise fail(f"--days must be from 1 to {USAGE_DAYS} (usage is kept {USAGE_DAYS} days), got {days}")
    rows = admin.usage_report(key, days)
    if as_json:
        print(json.dumps([{**row.__dict__, "last_used": utc(row.last_used)} for row in rows], indent=2))
        return
    if not rows:
        print(f"no requests in the last {days} day(s)")
        return
    now = admin.redis_time()
    table(
        ["PUBLIC KEY", "LABEL", "MODEL", "REQUESTS", "ERRORS", "LAST USED"],
        [[r.public_key, r.label or "-", r.model, str(r.requests), str(r.errors), when(r.last_used, now)] for r in rows],
    )


def show_audit(admin: KeyAdmin, since: str | None, as_json: bool) -> None:
    start = admin.redis_time() - parse_duration(since) if since else None  # events are stamped by Redis's clock
    admin.note_expired(admin.list_keys())
    events = admin.audit_log(start)
    if as_json:
        print(json.dumps([{**event.__dict__, "time": utc(event.time)} for event in events], indent=2))
        return
    if not events:
        print("no key events" + (f" in the last {since}" if since else ""))
        return
    table(
        ["TIME", "ACTION", "PUBLIC KEY", "BY", "DETAIL"],
        [
            [utc(e.time), e.action, e.public_key, f"{e.user}@{e.host}" if e.user != "-" else e.host or "-", e.detail]
            for e in events
        ],
    )


# -- actions -----------------------------------------------------------------------------------


def purge(admin: KeyAdmin, confirmed: bool) -> int:
    where = f"{admin.settings.prefix!r} in {admin.settings.redis_url_masked}"
    if not confirmed:
        if not sys.stdin.isatty():
            raise fail("-p deletes every key under THALAMUS_PREFIX; add --yes to confirm (stdin is not a terminal)")
        answer = input(f"Delete every key, token, usage count and audit event under {where}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 1
    purged = admin.purge()
    in_force_everywhere()
    print(f"purged {purged} Redis key(s) under {where}")
    return 0


def in_force_everywhere() -> None:
    """Predict functions answer tokens they know from their token cache, which Redis updates
    with a push: wait out the longest before every function has seen it (shared/tokencache.py),
    so that what this command took away is gone everywhere once it has printed. Every edit of
    models, rate or expiry waits, whether it narrows them or not."""
    time.sleep(tokencache.PROPAGATION_SECONDS)


def run(args: argparse.Namespace, admin: KeyAdmin, settings: config.Settings) -> int:
    if args.action == "generate":
        changes = key_settings(args, settings)
        pair = Keypair.new()
        write_keypair(args.generate, pair, lambda: admin.create_key(**changes, pair=pair))
        print(pair.public_key)
    elif args.action == "edit":
        pk = public_key(args.edit)
        changes = key_settings(args, settings)
        admin.edit_key(pk, **{name: changes.get(name, UNCHANGED) for name in ("scopes", "label", "rate", "expires")})
        if any(getattr(args, name) is not None for name in ("models", "rate", "expires")):
            in_force_everywhere()
        info = admin.key(pk)
        print(
            f"edited {pk}: models={','.join(info.scopes) if info.scopes else '*'} label={info.label!r} "
            f"rate={info.rate or 'unlimited'} expires={utc(info.expires)}"
        )
    elif args.action == "rotate":
        pk = public_key(args.rotate)
        grace = parse_duration(args.grace) if args.grace else 0
        admin.key(pk)  # an unknown key is named before the file is made
        pair, done = Keypair.new(pk), []

        def rotate() -> None:
            done.append(admin.rotate_key(pk, grace=grace, revoke_tokens=args.revoke_tokens, secret=pair.secret_key))

        write_keypair(args.output, pair, rotate)
        if args.revoke_tokens:
            in_force_everywhere()
        old = f"works until {utc(done[0].old_until)}" if done[0].old_until else "stopped working"
        tokens = f"{done[0].killed} live token(s) invalidated" if args.revoke_tokens else "live tokens keep working"
        print(f"rotated {pk}: new secret in {args.output}; the old secret {old}; {tokens}")
    elif args.action == "revoke":
        pk = public_key(args.revoke)
        killed = admin.revoke_key(pk)
        in_force_everywhere()
        print(f"revoked {pk} ({killed} live token(s) invalidated)")
    elif args.action == "list":
        list_keys(admin, args.json)
    elif args.action == "usage":
        show_usage(admin, public_key(args.usage) if args.usage else None, args.days, args.json)
    elif args.action == "audit":
        show_audit(admin, args.since, args.json)
    else:
        return purge(admin, args.yes)
    return 0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        settings = config.load()
        if redis_server.ensure(settings):
            print(
                f"keys.py: started the local Redis on 127.0.0.1:6379 in the background (data in "
                f"{redis_server.DATA_DIR}; ./start.sh uses it too; stop it with: "
                f".venv/bin/python -m local.redis_server stop)",
                file=sys.stderr,
            )
    except (config.ConfigError, redis_server.LocalRedisError) as exc:
        raise fail(str(exc)) from None
    admin = KeyAdmin(settings, actor=Actor.here())
    try:
        return run(args, admin, settings)
    except ThalamusError as exc:
        raise fail(exc.detail) from None
    except ValueError as exc:
        raise fail(str(exc)) from None


if __name__ == "__main__":
    try:
        status = main(sys.argv[1:])
        sys.stdout.flush()  # here, where a closed pipe can still be caught
        sys.exit(status)
    except BrokenPipeError:  # the reader went away (keys.py -l | head): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        sys.exit(1)
