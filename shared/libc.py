"""The C library calls Python does not wrap, taken from the process itself (``CDLL(None)``):
``ctypes.util.find_library`` would import subprocess and run ``ldconfig`` at every start
(about 15 ms of a cold start). On a libc without one of them (musl has no ``mallopt`` or
``malloc_trim``) it is None, and what it tunes stays as it is."""

from __future__ import annotations

import ctypes
from typing import Any

_process = ctypes.CDLL(None, use_errno=True)


def _function(name: str, *argtypes: Any) -> Any:
    function = getattr(_process, name, None)
    if function is not None and argtypes:
        function.argtypes = argtypes
    return function


mallopt = _function("mallopt", ctypes.c_int, ctypes.c_int)
malloc_trim = _function("malloc_trim", ctypes.c_size_t)
madvise = _function("madvise", ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
