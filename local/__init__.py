"""What only a laptop runs: the ``./start.sh`` supervisor, the local gateway, the embedded Redis,
the routing table the gateway shares with the Istio manifest, and the helpers tests and benches
share. No image copies this package; it may import ``shared``, never the other way round."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> Callable[[], None]:
    """A ``preexec_fn`` for a child that must not outlive this process: Linux sends the child
    SIGTERM when its parent dies, even by SIGKILL (``PR_SET_PDEATHSIG``)."""
    parent = os.getpid()

    def arm() -> None:
        with contextlib.suppress(OSError, AttributeError):  # not Linux: nothing to arm
            ctypes.CDLL("libc.so.6").prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return arm
