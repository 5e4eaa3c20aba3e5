"""JSON request bodies, parsed with a bound on the memory they may take and clear errors for
what is not JSON, too deep or has numbers Python will not read; and JSON files read at start."""

from __future__ import annotations

import gc
import json
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from shared.errors import BadRequest

NON_BMP_LEADS = (b"\xf0", b"\xf1", b"\xf2", b"\xf3", b"\xf4")  # lead bytes of 4-byte UTF-8 characters


def json_cost(text: bytes) -> int:
    """Bytes of memory parsing ``text`` and turning its lists into an array may take, estimated
    without parsing it. Python's objects are much larger than their JSON (``[1.5],`` is 6 bytes
    of text and ~130 of list, float and slot): the text decoded (1, 2 or 4 bytes a character) and
    the strings in it, ~150 bytes a container (~115 of list or dict, ~35 more while NumPy reads
    nested lists into an array), ~100 a dict entry, ~50 a string and ~40 a value (a float, its
    slot and its place in the array). Against the peak resident memory of parsing and converting
    3.7 MB documents of 17 shapes (``[[1.5]]`` repeated, deep nesting, dicts, strings), measured:
    1.0-8× what they took."""
    # memchr for each lead byte: a character class searched with re took ~6 ns a byte
    width = 1 if text.isascii() else 4 if any(lead in text for lead in NON_BMP_LEADS) else 2
    containers = text.count(b"[") + text.count(b"{")
    entries, strings, values = text.count(b":"), text.count(b'"'), text.count(b",")
    return 2 * width * len(text) + 150 * containers + 100 * entries + 25 * strings + 40 * values


def checked_cost(text: bytes, what: str, max_cost: int) -> int:
    """:func:`json_cost` of ``text``; BadRequest, saying what to send instead, past ``max_cost``."""
    cost = json_cost(text)
    if cost > max_cost:
        raise BadRequest(
            f"{what} would take ~{cost >> 20} MiB of memory to parse (limit {max_cost >> 20} MiB): send images "
            "as b64 or BYTES, tensors as V2 binary data (binary_data_size), or fewer examples"
        )
    return cost


def parse(data: bytes | memoryview, what: str = "body") -> Any:
    """``data`` parsed as JSON, or BadRequest saying why not (deep nesting included)."""
    if not len(data):
        raise BadRequest(f"{what} is empty; send a JSON object")
    text = bytes(data) if isinstance(data, memoryview) else data
    try:
        with _collector_paused():
            return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"{what} is not valid JSON ({exc})") from None
    except ValueError as exc:  # Python's bound on the digits of an int (sys.set_int_max_str_digits)
        if "digits" not in str(exc):
            raise BadRequest(f"{what} is not valid JSON") from None
        raise BadRequest(
            f"{what}: number too long (an integer of over {sys.get_int_max_str_digits()} digits)"
        ) from None
    except RecursionError:
        raise BadRequest(f"{what} is nested too deeply") from None


class _CollectorPause:
    """The cyclic garbage collector off while any thread parses JSON (it is one for the process,
    so overlapping parses keep it off until the last ends), on again then, if it was on before.
    json.loads makes no cycle, but each list and dict it makes counts towards the next
    collection, which walks them all again, several times over a large document; paused, they are
    walked once, by the first collection after it (at a later allocation). 800,000 empty lists
    (2.4 MB of JSON): 162 ms with it on, 88 ms paused, that collection included; a 4 MB FP32
    tensor 78 ms, 62 ms. Counted under a lock: with a plain "was it on? off; ...; back on if it
    was", two threads could leave it off for good (a red team did, 20 times in 500 trials), and
    the process would then never collect a cycle again."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parsing = 0
        self._resume = False

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._parsing == 0:
                self._resume = gc.isenabled()
                gc.disable()
            self._parsing += 1
        try:
            yield
        finally:
            with self._lock:
                self._parsing -= 1
                if self._parsing == 0 and self._resume:
                    gc.enable()


_collector_paused = _CollectorPause()


def read_file(path: Path, error: type[Exception], where: str = "") -> Any:
    """The JSON document in the file at ``path``; ``error`` (a StartupError, as a rule) saying it is
    missing or not JSON, after ``where`` (what names the file: a setting)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{where}{path} not found") from None
    except (OSError, ValueError) as exc:
        raise error(f"{where}{path} is not valid JSON ({exc})") from None
