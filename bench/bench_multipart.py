"""What splitting a multipart upload costs: werkzeug's streaming parser against shared.multipart.

    .venv/bin/python bench/bench_multipart.py [--runs 100]

One file part per body, with a boundary as requests (urllib3) makes one (32 hex digits): the
bench's 640x480 JPEG first, then random bytes (as incompressible as a photo's JPEG) up to
MAX_UPLOAD_BYTES. Both parsers run behind Flask's form parser
interface (``FormDataParser.parse`` on the body in memory, as a function holds it) and the file
is read back, as a handler reads it. Median µs of --runs parses, the two parsers alternated, and
how many temporary files werkzeug made (it spills a file part over 500 KB to ``tempfile``'s
folder: in a pod, the 16 Mi in-memory ``/tmp``).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

from bench_predict import sample_photo
from werkzeug.formparser import FormDataParser

from shared.multipart import FormParser


def parse_time(parser: FormDataParser, body: bytes, boundary: str) -> float:
    started = time.perf_counter()
    _, _, files = parser.parse(io.BytesIO(body), "multipart/form-data", len(body), {"boundary": boundary})
    files["file"].read()
    return time.perf_counter() - started


def counting_temporary_files() -> tuple[list[int], Callable[[], None]]:
    """Count tempfile.TemporaryFile calls (werkzeug's spill) until the returned undo is called."""
    made, real = [0], tempfile.TemporaryFile

    def counted(*args: Any, **kwargs: Any) -> Any:
        made[0] += 1
        return real(*args, **kwargs)

    tempfile.TemporaryFile = counted  # type: ignore[assignment]
    return made, lambda: setattr(tempfile, "TemporaryFile", real)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args()
    uploads = {"the bench's JPEG": sample_photo()}
    for size in (100_000, 1_000_000, 10_000_000):
        uploads[f"{size // 1000:,} KB"] = os.urandom(size)
    print("| upload | body | werkzeug | shared.multipart | werkzeug's temporary files |")
    print("|---|---|---|---|---|")
    for name, content in uploads.items():
        boundary = os.urandom(16).hex()
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="p.jpg"\r\n'
        body = head.encode() + b"Content-Type: image/jpeg\r\n\r\n" + content + f"\r\n--{boundary}--\r\n".encode()
        made, undo = counting_temporary_files()
        times: dict[str, list[float]] = {"werkzeug": [], "ours": []}
        try:
            for _ in range(args.runs):
                times["werkzeug"].append(parse_time(FormDataParser(), body, boundary))
                times["ours"].append(parse_time(FormParser(), body, boundary))
        finally:
            undo()
        wz, ours = (statistics.median(times[k]) * 1e6 for k in ("werkzeug", "ours"))
        print(f"| {name} | {len(body):,} B | {wz:,.0f} µs | {ours:,.0f} µs | {made[0] / args.runs:.0f} per upload |")


if __name__ == "__main__":
    main()
