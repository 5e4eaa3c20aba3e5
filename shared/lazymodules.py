"""Packages a server imports but does not use: their code runs on first use, not at start.

redis-py's ``redis/__init__.py`` begins with ``from redis import asyncio``, so every process
that imports redis also runs its asyncio client (client, connections, cluster, sentinel), which
the functions never use (they use the blocking one): 15 of the 116 ms ``import redis`` took on
a slow day here, at every cold start. :func:`defer` makes such a package a module whose name,
path and spec exist at once, so that ``from redis import asyncio`` and imports of its
submodules (``redis.commands.core`` imports ``redis.asyncio.observability.recorder``) work as
before, and whose own ``__init__`` runs the first time anything else is read from it (``from
redis.asyncio import Redis`` too: a package's ``__init__`` may define any name).

``importlib.util.LazyLoader`` cannot do this: it runs the module on any attribute read,
``__path__`` included, which importing a submodule does, and redis-py's own modules import one
while ``redis.client`` is half made (a circular import error).
"""

from __future__ import annotations

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


class _Deferred(types.ModuleType):
    """A package whose ``__init__`` may not have run yet: reading a name it lacks runs it."""

    def __getattr__(self, name: str) -> Any:
        with _running:
            if self.__name__ in _pending:
                _pending.discard(self.__name__)
                try:
                    self.__spec__.loader.exec_module(self)  # type: ignore[union-attr]
                except BaseException:
                    _pending.add(self.__name__)
                    raise
                self.__class__ = types.ModuleType  # type: ignore[assignment]  # a plain module from now on
        return types.ModuleType.__getattribute__(self, name)


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
