"""The access log: one JSON object per request, formatted and written off the hot path.

The data plane appends a tuple of raw values to :attr:`AccessLog.records`; every
tick the worker hands the batch to a writer thread, which formats and writes it.
Only what identifies the request is logged: never headers, tokens or bodies, and
the query string is cut off (it may carry credentials).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import sys
import threading
import time
from typing import IO

__all__ = ["AccessLog", "Record"]

log = logging.getLogger("meshgate.gateway.accesslog")

Record = tuple[str, bytes, bytes, int, str, bytes, int, float, float, str, bytes, float]
"""(client ip, method, target, status, route, request id, response bytes,
total seconds, upstream seconds, why the response was cut off or "", trace id or b"",
start as a ``perf_counter`` time)."""


class AccessLog:
    """Batches records and writes them as JSON lines from a background thread."""

    def __init__(self, path: str, worker: int = 0) -> None:
        self.path = path
        self.worker = worker
        self._tail = f',"worker":{worker},"pid":{os.getpid()}}}\n'
        self.records: list[Record] = []
        self._queue: queue.SimpleQueue[tuple[float, list[Record]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="meshgate-access-log", daemon=True)
        self._thread.start()

    def flush(self) -> None:
        """Hand the records gathered so far to the writer thread."""
        if self.records:
            batch, self.records = self.records, []
            # Hot-path stamps are perf_counter times: this makes them wall-clock ones.
            self._queue.put((time.time() - time.perf_counter(), batch))

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
                offset, batch = item
                try:
                    lines = [self.format(offset, rec) for rec in batch]
                except Exception:  # a bug must not silence the log for good
                    log.exception("could not format %d access log records", len(batch))
                    continue
                with contextlib.suppress(OSError, ValueError):
                    out.write("".join(lines))
                    out.flush()
        finally:
            if out is not sys.stdout:
                out.close()

    def format(self, offset: float, rec: Record) -> str:
        """One record as a JSON line (the fields of :data:`Record`, plus the worker).

        Written with a template rather than ``json.dumps`` of a dict, which cost the
        gateway a fifth of its capacity at full load: only a string that needs it is
        escaped (a request id or path with quotes, backslashes or non-ASCII text).
        """
        ip, method, target, status, route, rid, size, total, upstream, aborted, trace, start = rec
        return _LINE % (
            start + offset,
            ip,
            method.decode("latin-1"),
            _text(target.split(b"?", 1)[0]),
            status,
            '"' + route + '"' if route else "null",  # route names are [A-Za-z0-9_.-]
            _text(rid),
            _text(trace) if trace else "",
            size,
            total * 1000,
            upstream * 1000,
            _quoted(aborted) if aborted else "null",
            self._tail,
        )


_LINE = (
    '{"ts":%.3f,"client":"%s","method":"%s","path":"%s","status":%d,"route":%s,'
    '"request_id":"%s","trace_id":"%s","bytes":%d,"duration_ms":%.3f,"upstream_ms":%.3f,'
    '"aborted":%s%s'
)


def _quoted(text: str) -> str:
    return json.dumps(text)


def _text(raw: bytes) -> str:
    """``raw`` as the inside of a JSON string."""
    text = raw.decode("latin-1")
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return text
    return json.dumps(text)[1:-1]
