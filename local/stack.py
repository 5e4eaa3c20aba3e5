"""``./start.sh``: run the whole stack locally and supervise it.

Starts (or finds) Redis, one function server (``shared.server``) for the token function and one per
model bundle in ``models/``, each on its own port as Knative would give each its own URL, and
the gateway on ``--port`` (default 8000). Ctrl-C or SIGTERM stops everything it started.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from local import ROOT, die_with_parent, gateway, redis_server
from shared import config, modelcatalog
from shared.keyrecords import MODEL_NAME_RULE, is_model_name

PID_FILE = ROOT / ".thalamus" / "stack.pid"
CATALOG_FILE = ROOT / ".thalamus" / "models.json"  # the token function's MODEL_CATALOG
GATEWAY_PORT = 8000  # without $PORT or --port


def _terminate(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to each of ``procs``, then wait up to 15 s for them all; SIGKILL for the rest."""
    for proc in procs:
        proc.terminate()
    deadline = time.monotonic() + 15
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Child:
    name: str
    url: str
    model: str
    proc: subprocess.Popen | None = None


def port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def discover_models(models_dir: Path) -> list[str]:
    """Names of the bundles in ``models_dir`` (folders holding model.json and model.tflite); a
    folder whose name cannot be a model's (see MODEL_NAME_RE) is passed over, saying so."""
    if not models_dir.is_dir():
        return []
    bundles = sorted(
        p.name
        for p in models_dir.iterdir()
        if not p.name.startswith(".")  # train.py staging
        and (p / "model.json").is_file()
        and (p / "model.tflite").is_file()
    )
    for name in bundles:
        if not is_model_name(name):
            print(f"start.sh: not serving models/{name}: a model's name is {MODEL_NAME_RULE}", file=sys.stderr)
    return [name for name in bundles if is_model_name(name)]


def running_stack() -> str | None:
    """The gateway URL of a stack already running from this folder, if any."""
    try:
        pid, url = PID_FILE.read_text().split()
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return None
    return url


def wait_ready(child: Child, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.proc and child.proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(child.url + "/healthz", timeout=1):  # noqa: S310 (local)
                return True
        except OSError:
            time.sleep(0.1)
    return False


class Stack:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.children: list[Child] = []
        self.redis: subprocess.Popen | None = None
        self.stopping = False

    def plan(self, models: list[str]) -> None:
        show = "localhost" if self.host in ("127.0.0.1", "0.0.0.0") else self.host  # noqa: S104
        url = lambda p: f"http://{show}:{p}"  # noqa: E731
        self.children = [Child("gateway", url(self.port), "-"), Child("token", url(self.port + 1), "-")]
        self.children += [Child(f"predict-{m}", url(self.port + 2 + i), m) for i, m in enumerate(models)]

    def ports(self) -> list[int]:
        return [int(child.url.rsplit(":", 1)[1]) for child in self.children]

    def spawn(self, child: Child, settings: config.Settings) -> None:
        port = child.url.rsplit(":", 1)[1]
        # The gateway sets X-Forwarded-For, as an ingress does, and connects to the functions from
        # its own address: the functions believe that header from there only, whatever the
        # environment says (a wider TRUSTED_PROXIES would let any local client that calls a function
        # directly claim any address, and dodge the per-address limits; one that binds 127.0.0.2
        # still can: on a laptop, every process is trusted alike).
        source = gateway.source_address()
        env = {
            "LOG_FORMAT": "text",  # a person reads these lines, prefixed with the function's name
            **os.environ,
            "TRUSTED_PROXIES": f"{source}/32",
            "WORKERS": "1",
            "REDIS_URL": settings.redis_url,
        }
        if child.name == "gateway":
            args = [
                sys.executable,
                "-m",
                "local.gateway",
                "--host",
                self.host,
                "--port",
                port,
                "--token",
                self.children[1].url.replace("localhost", "127.0.0.1"),
                "--source",
                source,
            ]
            args += [f"--model={c.model}={c.url.replace('localhost', '127.0.0.1')}" for c in self.children[2:]]
        else:
            function = "token" if child.name == "token" else "predict"
            args = [
                sys.executable,
                "-m",
                "shared.server",
                str(ROOT / "functions" / function / "main.py"),
                "--host",
                self.host,
                "--port",
                port,
            ]
            if child.name == "token":
                env["MODEL_CATALOG"] = str(CATALOG_FILE)
            if child.model != "-":
                env["MODEL_NAME"] = child.model
                env["MODEL_DIR"] = str(ROOT / "models" / child.model)
        # Children get SIGTERM if this supervisor dies, even by SIGKILL: nothing outlives it.
        child.proc = subprocess.Popen(
            args, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent()
        )  # noqa: PLW1509

    def stop(self, *_: object) -> None:
        if self.stopping:
            return
        self.stopping = True
        # A second Ctrl-C meanwhile ends this process at once: the kernel then sends SIGTERM to
        # every child left (die_with_parent), and no pid file is left to say the stack is up.
        PID_FILE.unlink(missing_ok=True)
        # The gateway first, so that what it has received still finds its function; then the
        # functions, which finish their requests in flight and write the usage counts they hold
        # to Redis on their way out; Redis last.
        gateway, functions = self.children[0], self.children[1:]
        for group in ([gateway.proc], [c.proc for c in functions], [self.redis]):
            _terminate([proc for proc in group if proc and proc.poll() is None])

    def print_table(self, settings: config.Settings) -> None:
        gateway = self.children[0].url
        print(f"\nThalamus is up (Redis: {settings.redis_url_masked}):\n")
        print(f"  {'function':<18} {'url':<26} model")
        for child in self.children:
            print(f"  {child.name:<18} {child.url:<26} {child.model}")
        served = [child.model for child in self.children if child.model != "-"]
        model = "shapes" if "shapes" in served else (served[0] if served else "MODEL")  # the README's
        # keys.py must find the same Redis and prefix: say so when they are not the defaults.
        shown = settings.redis_url_masked
        env = "" if settings.redis_url_is_default else f"REDIS_URL={shlex.quote(shown)} "
        if env and shown != settings.redis_url:
            env = "REDIS_URL=<the REDIS_URL above, with its password> "
        if settings.prefix != config.Settings.prefix:
            env += f"THALAMUS_PREFIX={shlex.quote(settings.prefix)} "
        print(
            f"""
Next steps (docs: {gateway}/docs):
  {env}./keys.py -g client.json
  TOKEN=$(curl -s -X POST {gateway}/token.json -H 'Content-Type: application/json' \\
          -d @client.json | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
  curl -H "Authorization: Bearer $TOKEN" -F file=@photo.jpg {gateway}/models/{model}/predict.json  # any image

Ctrl-C stops everything.""",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="start.sh", description="Run Thalamus locally.")
    parser.add_argument(
        "--port", type=int, help=f"gateway port; functions take the next ones (default $PORT or {GATEWAY_PORT})"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    args = parser.parse_args(argv)

    if url := running_stack():
        print(f"start.sh: the stack is already up at {url} (stop it with Ctrl-C there)", file=sys.stderr)
        return 1
    if os.environ.pop("TRUSTED_PROXIES", "").strip():  # not read, so not refused either
        print("start.sh: TRUSTED_PROXIES is not used here: the gateway is the edge, and the functions believe "
              "X-Forwarded-For from the gateway only", file=sys.stderr)  # fmt: skip
    try:
        settings = config.load()
    except config.ConfigError as exc:
        print(f"start.sh: {exc}", file=sys.stderr)
        return 1
    port = args.port or settings.port or GATEWAY_PORT
    stack = Stack(args.host, port)
    models = discover_models(ROOT / "models")
    stack.plan(models)
    last = port + len(stack.children) - 1
    if port < 1 or last > 65535:
        print(f"start.sh: the stack needs ports {port}-{last}, and TCP ports run from 1 to 65535; try --port",
              file=sys.stderr)  # fmt: skip
        return 1
    busy = [p for p in stack.ports() if not port_free(args.host, p)]
    if busy:
        print(
            f"start.sh: port {busy[0]} on {args.host} is already in use "
            f"(the stack needs ports {port}-{last}; try --port)",
            file=sys.stderr,
        )
        return 1
    try:  # a bundle the token function's list would refuse, or its predict function
        modelcatalog.write(CATALOG_FILE, [ROOT / "models" / name for name in models])
    except modelcatalog.CatalogError as exc:
        print(f"start.sh: {exc}", file=sys.stderr)
        return 1

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    try:
        try:
            stack.redis = redis_server.ensure(settings, die_with_parent=True)
        except redis_server.LocalRedisError as exc:
            print(f"start.sh: {exc}", file=sys.stderr)
            return 1
        if stack.redis:
            print(
                f"start.sh: started local Redis on 127.0.0.1:6379 (data in {redis_server.DATA_DIR}; "
                "it stops with start.sh)"
            )
        PID_FILE.parent.mkdir(parents=True, exist_ok=True)
        PID_FILE.write_text(f"{os.getpid()} {stack.children[0].url}\n")
        for child in stack.children[1:] + stack.children[:1]:
            stack.spawn(child, settings)
        for child in stack.children:
            if not wait_ready(child):
                print(f"start.sh: {child.name} failed to start (see its output above)", file=sys.stderr)
                return 1
        stack.print_table(settings)
        reported: set[str] = set()
        while True:
            time.sleep(0.5)
            for child in stack.children:
                if child.proc and child.proc.poll() is not None and child.name not in reported:
                    reported.add(child.name)
                    print(
                        f"start.sh: {child.name} ({child.url}) exited with code "
                        f"{child.proc.returncode}; the rest keeps running, Ctrl-C to stop",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
