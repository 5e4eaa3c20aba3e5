"""A function that skips usage counting for some keys: the baseline of ``bench_auth.py``.

    BENCH_FUNCTION=predict BENCH_UNCOUNTED=pk_… python -m shared.server bench/uncounted_function.py

Serves ``functions/$BENCH_FUNCTION/main.py`` unchanged, except that requests made with the keys
listed in ``BENCH_UNCOUNTED`` (comma-separated) are not counted: the bench can then time counted
and uncounted requests in the same process, interleaved.
"""

import importlib
import os

from shared import auth

UNCOUNTED = set(os.environ.get("BENCH_UNCOUNTED", "").split(","))
_count = auth.AuthStore.record_request


def _record_request(self: auth.AuthStore, session: auth.Session, model: str | None, status: int) -> None:
    if session.public_key not in UNCOUNTED:
        _count(self, session, model, status)


auth.AuthStore.record_request = _record_request  # type: ignore[method-assign]
handle = importlib.import_module(f"functions.{os.environ['BENCH_FUNCTION']}.main").handle
