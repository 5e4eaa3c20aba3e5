"""Two versions of the predict function side by side: paired rounds, ratios of the second to the first.

    .venv/bin/python bench/bench_pair.py OLD [NEW] [--rounds 8] [--seconds 10] [--requests 300]
                                         [--model reference] [--photo drawing|detailed] [--v1]
                                         [--cpus N]

OLD and NEW are git revisions of this repository (NEW: the working tree's tracked files as they
are, uncommitted changes included); each is copied into a temporary folder. This machine's speed drifts by
tens of percent within minutes, so figures taken minutes apart cannot tell a change of a few
percent: here both servers are started alike (this venv's Python, one Redis, the same bundle, the
same token, JSON access lines at INFO as the images log) and measured in turns, the order swapped
every round. Each round, for each server: its cold start (spawn to the first 200, each tree's
bytecode compiled first, as the images hold it), --requests sequential warm requests on one
keep-alive connection (p50), then ``wrk`` at 8 connections for --seconds (requests/s, and the
server's CPU time per request); ``--requests 0 --seconds 0`` measures cold starts alone. Prints
each round, then per figure the median of the rounds' NEW/OLD ratios and their interquartile
range: one round's ratio may be off by tens of percent, so judge a change by the range over 8
rounds or more, and against the machine's own spread: ``bench_pair.py HEAD`` with no uncommitted
changes, the same tree against itself. The request is the bench's 640x480 JPEG as a multipart
upload, or with --v1 as TF Serving V1 JSON (the image in base64). With --cpus N both servers run
under a CPU quota of N, as a pod's ``limits.cpu`` sets (every manifest's: 1).
"""

from __future__ import annotations

import argparse
import base64
import compileall
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import bench_predict
import replica

from local import ROOT
from local.helpers import RedisServer, cpu_cgroup, free_port, remove_cgroup
from shared.auth import AuthStore
from shared.config import Settings

FIGURES = ("cold_ms", "p50", "rps", "cpu_ms")
SHOWN = {"cold_ms": "cold start {:.0f} ms", "p50": "p50 {:.2f} ms", "rps": "{:.0f} req/s", "cpu_ms": "CPU {:.2f} ms"}


def checkout(revision: str | None, into: Path) -> Path:
    """The project at ``revision`` (None: the working tree, uncommitted changes included) in ``into``."""
    into.mkdir(parents=True)
    if revision is None:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
        for name in filter(None, files.split(b"\0")):
            source, target = ROOT / name.decode(), into / name.decode()
            if source.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(source.read_bytes())
    else:
        archive = subprocess.run(["git", "archive", revision], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    compileall.compile_dir(into, quiet=1)
    return into


def target(tree: Path, model: str, bundle: Path, env: dict[str, str], body: bytes, headers: dict[str, str],
           v1: bool) -> bench_predict.Target:  # fmt: skip
    """The predict function of ``tree``, served as bench_predict.py serves this checkout's."""
    command = [sys.executable, "-P", str(tree / "shared/server.py"), str(tree / "functions/predict/main.py"),
               "--host", "127.0.0.1", "--port", "{port}"]  # fmt: skip
    function = {**env, "MODEL_NAME": model, "MODEL_DIR": str(bundle), "WORKERS": "1", "PYTHONPATH": str(tree)}
    path = f"/v1/models/{model}:predict" if v1 else f"/models/{model}/predict.json"
    return bench_predict.Target(str(tree), command, function, path, body, headers)


def measure(server: bench_predict.Target, tree: Path, args: argparse.Namespace) -> dict[str, float]:
    port = free_port()
    command = bench_predict.command_of(server, port)
    proc, cold = replica.spawn_until_ok(
        command, port, server.path, server.body, server.headers, env=server.env, cwd=tree
    )
    figures = {"cold_ms": cold * 1000}
    try:
        if args.requests:
            figures["p50"], _ = bench_predict.warm(port, server, args.requests)
        if args.seconds:
            loaded = bench_predict.load(port, proc, server, args.seconds, 8)
            if loaded["errors"]:
                raise SystemExit(f"bench_pair.py: {loaded['errors']:.0f} errors under load from {tree}")
            figures.update(rps=loaded["rps"], cpu_ms=loaded["cpu_ms"])
    finally:
        bench_predict.stop(server, proc, port)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", help="a git revision")
    parser.add_argument("new", nargs="?", help="a git revision (default: the working tree)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=10, help="wrk duration per server and round (0: no load)")
    parser.add_argument("--requests", type=int, default=300, help="sequential requests per server and round (0: none)")
    parser.add_argument("--model", default="reference", help="reference (the issue's network) or a demo model")
    parser.add_argument("--photo", choices=sorted(bench_predict.PHOTOS), default="drawing")
    parser.add_argument("--v1", action="store_true", help="send TF Serving V1 JSON instead of multipart")
    parser.add_argument("--cpus", type=float, help="both servers under this CPU quota, as a pod's limits.cpu (root)")
    args = parser.parse_args()
    if args.seconds and not shutil.which("wrk"):
        raise SystemExit("bench_pair.py: wrk is missing (Debian: apt-get install wrk)")
    for revision in filter(None, (args.old, args.new)):
        if subprocess.run(["git", "rev-parse", "--verify", "-q", revision], cwd=ROOT, capture_output=True).returncode:
            raise SystemExit(f"bench_pair.py: no such revision: {revision}")

    if args.model == "reference":
        import reference_model  # noqa: PLC0415 (bench/ sibling, builds on first use)

        bundle = reference_model.build()
    else:
        bundle = ROOT / "models" / args.model
    photo = bench_predict.sample_photo(args.photo)
    if args.v1:
        body = json.dumps({"instances": [{"b64": base64.b64encode(photo).decode()}]}).encode()
        content_type = "application/json"
    else:
        body, content_type = bench_predict.multipart(photo)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        trees = checkout(args.old, tmp / "old"), checkout(args.new, tmp / "new")
        redis_server = RedisServer(free_port(), tmp / "redis").start()
        auth = AuthStore(Settings(redis_url=redis_server.url))
        try:
            group = cpu_cgroup(f"thalamus-pair-{os.getpid()}", args.cpus) if args.cpus else None
        except OSError as exc:
            redis_server.stop()
            raise SystemExit(f"bench_pair.py: --cpus needs a cgroup with a cpu controller (root): {exc}") from None
        try:
            pair = auth.create_key()
            headers = {
                "Content-Type": content_type,
                "Authorization": f"Bearer {auth.issue_token(pair.public_key, pair.secret_key, 'bench').token}",
            }
            env = {**os.environ, "REDIS_URL": redis_server.url, "LOG_LEVEL": "INFO", "LOG_FORMAT": "json"}
            servers = [target(tree, bundle.name, bundle, env, body, headers, args.v1) for tree in trees]
            for server in servers:
                server.cgroup = group
            ratios: dict[str, list[float]] = {figure: [] for figure in FIGURES}
            print(f"{args.old} against {args.new or 'the working tree'}: {bundle.name}, {args.photo} "
                  f"({len(photo)} B), {'V1 JSON' if args.v1 else 'multipart'}", flush=True)  # fmt: skip
            for round_ in range(args.rounds):
                order = (0, 1) if round_ % 2 == 0 else (1, 0)
                results = {i: measure(servers[i], trees[i], args) for i in order}
                for figure in results[0]:
                    ratios[figure].append(results[1][figure] / results[0][figure])
                shown = [f"{name} " + ", ".join(SHOWN[figure].format(value) for figure, value in r.items())
                         for name, r in zip(("old", "new"), (results[0], results[1]), strict=True)]  # fmt: skip
                print(f"round {round_ + 1}: " + " | ".join(shown), flush=True)
        finally:
            auth.purge()
            redis_server.stop()
            if group is not None:
                remove_cgroup(group)
    names = {"cold_ms": "cold start", "p50": "warm p50", "rps": "req/s (8 conns)", "cpu_ms": "CPU per request"}
    for figure, values in ratios.items():
        if not values:
            continue
        quartiles = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
        print(f"{names[figure]:>16}: x{statistics.median(values):.3f} [{quartiles[0]:.3f}-{quartiles[-1]:.3f}]")


if __name__ == "__main__":
    main()
