"""Packages a server imports but does not use: their code runs on first use, not at start.

redis-py's ``redis/__init__.py`` begins with ``from redis import asyncio``, so every process
that imports redis also runs its asyncio client (client, connections, cluster, sentinel), which
the functions never use (they use the blocking one): 15 of the 116 ms ``import redis`` took on
a slow day here, at every cold start. :func:`defer` makes such a package a module whose name,
path and spec exist at once, so that ``from redis import asyncio`` and imports of its
submodules (``redis.commands.core`` imports ``redis.asyncio.observability.recorder``) work as
before, and whose own ``__init__`` runs the first time anything else is read from it (``from
redis.asyncio import Redis`` too: a package's ``__init__`` may define any name; ``from
redis.asyncio import client`` imports the submodule alone, as redis-py's own submodules do).
It runs once, whichever threads read from it; a thread that reads a name while another is
running the package waits for it. If it fails, every read fails as the import would have
(an AttributeError it raises as an ImportError, which ``hasattr`` does not swallow).

Limits, none of which the servers meet (tests/test_server.py checks that no request runs the
asyncio client): until it runs, ``dir()`` of the package shows only what is imported of it;
an import hook placed on ``sys.meta_path`` before :func:`defer` (an APM agent's, say) does not
see the package load; and a submodule that reads a name of the package itself while another
thread is running the package waits for that thread, which may be waiting for it.

``importlib.util.LazyLoader`` cannot do this: it runs the module on any attribute read,
``__path__`` included, which importing a submodule does, and redis-py's own modules import one
while ``redis.client`` is half made (a circular import error).
"""

from __future__ import annotations

import importlib._bootstrap
import importlib.machinery
import sys
import threading
import types
from collections.abc import Sequence
from typing import Any

# Taken by the first reader of a deferred package while its code runs: another thread waits for
# the module instead of seeing it half made. Reentrant: the code itself reads names it is making.
_running = threading.RLock()
_pending: set[str] = set()  # deferred packages whose code has not started
# What ``from package import name`` runs to see whether ``name`` is a submodule to import.
_FROM_IMPORT = importlib._bootstrap._handle_fromlist.__code__  # type: ignore[attr-defined]  # not in typeshed


class _Deferred(types.ModuleType):
    """A package whose ``__init__`` may not have run yet: reading a name it lacks runs it."""

    def __getattr__(self, name: str) -> Any:
        if sys._getframe(1).f_code is _FROM_IMPORT and _is_submodule(self, name):
            # ``from package import submodule`` (redis.asyncio.client's own ``from redis.asyncio
            # import _himport_exec``) asks this first: no such name yet lets the import system
            # import the submodule alone, under its own lock, as it would after the package ran.
            # Running the package here, inside that import, would import the half-made module
            # again (an ImportError), or wait for a thread that waits for this one.
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        with _running:
            if self.__name__ in _pending:
                _pending.discard(self.__name__)
                before = dict(self.__dict__)
                try:
                    self.__spec__.loader.exec_module(self)  # type: ignore[union-attr]
                except BaseException as exc:
                    # As a failed import leaves no module: nothing it made before failing is
                    # served, and the next read runs it again (and fails again).
                    self.__dict__.clear()
                    self.__dict__.update(before)
                    _pending.add(self.__name__)
                    if isinstance(exc, AttributeError):  # which hasattr() and getattr(x, n, default) would swallow
                        raise ImportError(f"{self.__name__} failed to run: {exc}", name=self.__name__) from exc
                    raise
                self.__class__ = types.ModuleType  # type: ignore[assignment]  # a plain module from now on
        return types.ModuleType.__getattribute__(self, name)


def _is_submodule(package: types.ModuleType, name: str) -> bool:
    path = package.__dict__.get("__path__")
    if not name.isidentifier() or path is None:
        return False
    return importlib.machinery.PathFinder.find_spec(f"{package.__name__}.{name}", path) is not None


# Loader and finder by their methods, not importlib.abc's classes: importing importlib.abc loads
# importlib.resources and tempfile, at every start, for nothing.
class _DeferringLoader:
    """Makes the module the package's own loader would, and leaves its code for later."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__spec__.loader = module.__loader__ = self.loader  # type: ignore[union-attr]  # the real one, for later
        _pending.add(module.__name__)
        module.__class__ = _Deferred


class _DeferringFinder:
    def __init__(self, names: frozenset[str]) -> None:
        self.names = names

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.names:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)  # found as sys.path finds it
        if spec is None or spec.loader is None or spec.submodule_search_locations is None:
            return spec  # not an installed package: imported as usual (or not found, as usual)
        spec.loader = _DeferringLoader(spec.loader)  # type: ignore[assignment]  # a loader by its methods
        return spec


def defer(*packages: str) -> None:
    """Run each of ``packages``' ``__init__`` only when a name is first read from it.

    Call before anything imports them; already imported ones stay as they are.
    """
    sys.meta_path.insert(0, _DeferringFinder(frozenset(packages) - sys.modules.keys()))
