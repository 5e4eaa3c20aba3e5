"""Packages a server defers (shared/lazymodules.py): their code runs on the first name read from
them, once, whichever thread reads it; until then imports of them and of their submodules work.

Each test runs in a Python of its own: deferring changes how that process imports."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from local import ROOT


def run(script: str, *paths: Path, **env: str) -> str:
    """``script`` in a new Python with the project and ``paths`` importable; its stdout."""
    path = ":".join([str(ROOT), *map(str, paths)])
    done = subprocess.run(
        [sys.executable, "-P", "-c", textwrap.dedent(script)],
        capture_output=True, text=True, timeout=30, env={"PYTHONPATH": path, **env},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def package(root: Path, init: str, **modules: str) -> Path:
    """A package ``pkg`` under ``root`` with ``init`` as its ``__init__`` and ``modules`` beside it."""
    (root / "pkg").mkdir()
    (root / "pkg" / "__init__.py").write_text(textwrap.dedent(init))
    for name, text in modules.items():
        (root / "pkg" / f"{name}.py").write_text(textwrap.dedent(text))
    return root


def test_redis_serves_with_its_asyncio_client_unrun_until_it_is_used(redis_url):
    out = run(f"""
        import sys
        from shared import lazymodules
        lazymodules.defer("redis.asyncio")
        import redis
        print("redis.asyncio.client" in sys.modules)
        client = redis.Redis.from_url({redis_url!r})
        client.set("thalamus-test:lazy", "1")
        print(client.get("thalamus-test:lazy"), client.delete("thalamus-test:lazy"))
        print("redis.asyncio.client" in sys.modules)
        from redis.asyncio import Redis
        import redis.asyncio.client
        print(Redis is redis.asyncio.client.Redis is redis.asyncio.Redis, type(redis.asyncio).__name__)
    """)
    assert out.split("\n")[:4] == ["False", "b'1' 1", "False", "True module"]


def test_the_first_read_runs_the_package_once_and_every_thread_waits_for_it(tmp_path):
    root = package(
        tmp_path,
        """
        import time
        with open(__file__ + ".runs", "a") as runs:
            runs.write("x")
        time.sleep(0.3)  # long enough for every thread to read meanwhile
        value = 42
    """,
    )
    out = run("""
        import threading
        from shared import lazymodules
        lazymodules.defer("pkg")
        import pkg
        seen = []
        readers = [threading.Thread(target=lambda: seen.append(pkg.value)) for _ in range(8)]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join()
        print(seen)
    """, root)  # fmt: skip
    assert out.strip() == str([42] * 8)
    assert (root / "pkg" / "__init__.py.runs").read_text() == "x"


def test_submodules_import_before_the_package_runs(tmp_path):
    """As redis-py's own modules import ``redis.asyncio.observability.recorder``; the package runs
    on the first other name read from it, and imports its own submodules as it always did."""
    root = package(
        tmp_path,
        "print('package ran')\nfrom pkg.helper import NAME\nfrom pkg import other\n",
        helper="NAME = 'helper'\n",
        other="NAME = 'other'\n",
    )
    out = run("""
        from shared import lazymodules
        lazymodules.defer("pkg")
        import pkg.helper
        from pkg.helper import NAME
        print("helper imported:", NAME, pkg.helper.NAME)
        print(pkg.NAME, pkg.other.NAME)
    """, root)  # fmt: skip
    assert out.split("\n")[:3] == ["helper imported: helper helper", "package ran", "helper other"]


def test_a_submodule_the_package_imports_is_there_to_read_as_it_was():
    out = run("""
        from shared import lazymodules
        lazymodules.defer("redis.asyncio")
        import redis
        print(redis.asyncio.client.Redis.__name__, redis.asyncio.connection.Connection.__name__)
    """)
    assert out.strip() == "Redis Connection"


def test_a_submodule_importing_its_siblings_from_the_package_leaves_it_unrun(tmp_path):
    """redis.asyncio.client starts with ``from redis.asyncio import _himport_exec``: run there,
    the package would import the half-made client again."""
    root = package(
        tmp_path,
        "print('package ran')\nfrom pkg.b import B\n",
        b="from pkg import c\nB = 'b' + c.C\n",
        c="C = 'c'\n",
    )
    out = run("""
        import sys
        from shared import lazymodules
        lazymodules.defer("pkg", "redis.asyncio")
        import pkg.b
        print(pkg.b.B)
        import redis.asyncio.client, redis.asyncio.cluster, redis.asyncio.sentinel
        print(type(sys.modules["redis.asyncio"]).__name__)
        print(pkg.B, redis.asyncio.Redis is redis.asyncio.client.Redis)
    """, root)  # fmt: skip
    assert out.split("\n")[:4] == ["bc", "_Deferred", "package ran", "bc True"]


def test_a_thread_importing_a_submodule_while_another_runs_the_package_does_not_hang(tmp_path):
    root = package(
        tmp_path,
        "import pkg.b\nNAME = 'pkg'\n",
        b="import time\ntime.sleep(0.3)\nfrom pkg import c\n",
        c="",
    )
    out = run("""
        import threading, time
        from shared import lazymodules
        lazymodules.defer("pkg")
        import pkg
        importer = threading.Thread(target=lambda: __import__("pkg.b"))
        importer.start()
        time.sleep(0.1)  # the importer holds pkg.b's import lock, and asks for pkg.c next
        print(pkg.NAME)  # runs the package, which imports pkg.b
        importer.join()
        print(pkg.b.c.__name__)
    """, root)  # fmt: skip
    assert out.split("\n")[:2] == ["pkg", "pkg.c"]


def test_a_package_that_fails_partway_serves_nothing_it_made_before_failing(tmp_path):
    root = package(tmp_path, "value = 1\nimport not_installed_dependency\nlater = 2\n")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "__init__.py").write_text("import os\nvalue = 1\nos.no_such_thing\n")
    out = run("""
        from shared import lazymodules
        lazymodules.defer("pkg", "other")
        import pkg, other
        for read in (lambda: pkg.later, lambda: pkg.value, lambda: hasattr(other, "value")):
            for attempt in range(2):
                try:
                    print("read", read())
                except ImportError as exc:
                    print(type(exc).__name__)
    """, root)  # fmt: skip
    assert out.split("\n")[:6] == ["ModuleNotFoundError"] * 4 + ["ImportError"] * 2


def test_a_missing_name_a_failing_package_and_a_missing_package_fail_as_they_would(tmp_path):
    root = package(tmp_path, "raise ImportError('pkg cannot start here')\n")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "__init__.py").write_text("present = 1\n")
    out = run("""
        from shared import lazymodules
        lazymodules.defer("pkg", "other", "absent", "json")
        import json, other, pkg
        for attempt in range(2):  # the second read fails as the first did: not a half-made module
            try:
                pkg.anything
            except ImportError as exc:
                print("ImportError:", exc)
        try:
            other.missing
        except AttributeError as exc:
            print("AttributeError:", exc)
        try:
            import absent
        except ModuleNotFoundError as exc:
            print("ModuleNotFoundError:", exc)
        print(json.dumps([other.present]), type(json).__name__)  # a plain module: imported as usual
    """, root)  # fmt: skip
    assert out.split("\n")[:5] == [
        "ImportError: pkg cannot start here",
        "ImportError: pkg cannot start here",
        "AttributeError: module 'other' has no attribute 'missing'",
        "ModuleNotFoundError: No module named 'absent'",
        "[1] module",
    ]
