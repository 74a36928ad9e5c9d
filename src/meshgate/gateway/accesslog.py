"""The access log: one JSON object per request, formatted and written off the hot path.

The data plane appends a tuple of raw values to :attr:`AccessLog.records`; every
tick the worker hands the batch to a writer thread, which formats and writes it.
Only what identifies the request is logged: never headers, tokens or bodies, and
the query string is cut off (it may carry credentials).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import sys
import threading
import time
from typing import IO, Any

__all__ = ["AccessLog", "Record"]

Record = tuple[str, bytes, bytes, int, str, bytes, int, float, float, str]
"""(client ip, method, target, status, route, request id, response bytes,
total seconds, upstream seconds, why the response was cut off or "")."""


class AccessLog:
    """Batches records and writes them as JSON lines from a background thread."""

    def __init__(self, path: str, worker: int = 0) -> None:
        self.path = path
        self.worker = worker
        self.records: list[Record] = []
        self._queue: queue.SimpleQueue[tuple[float, list[Record]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="meshgate-access-log", daemon=True)
        self._thread.start()

    def flush(self) -> None:
        """Hand the records gathered so far to the writer thread."""
        if self.records:
            batch, self.records = self.records, []
            self._queue.put((time.time(), batch))

    def close(self) -> None:
        """Write what is left and stop the writer thread."""
        self.flush()
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _open(self) -> IO[str]:
        if self.path == "-":
            return sys.stdout
        return open(self.path, "a", encoding="utf-8", buffering=1 << 16)

    def _run(self) -> None:
        out = self._open()
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    break
                stamp, batch = item
                lines = [self.format(stamp, rec) for rec in batch]
                with contextlib.suppress(OSError, ValueError):
                    out.write("".join(lines))
                    out.flush()
        finally:
            if out is not sys.stdout:
                out.close()

    def format(self, stamp: float, rec: Record) -> str:
        """One record as a JSON line."""
        ip, method, target, status, route, rid, size, total, upstream, aborted = rec
        entry: dict[str, Any] = {
            "ts": round(stamp, 3),
            "client": ip,
            "method": method.decode("latin-1"),
            "path": target.split(b"?", 1)[0].decode("latin-1"),
            "status": status,
            "route": route or None,
            "request_id": rid.decode("latin-1"),
            "bytes": size,
            "duration_ms": round(total * 1000, 3),
            "upstream_ms": round(upstream * 1000, 3),
            "aborted": aborted or None,
            "worker": self.worker,
            "pid": os.getpid(),
        }
        return json.dumps(entry, separators=(",", ":")) + "\n"
