"""JSON logs for services: one object per line, with the request's id and trace.

``configure_logging("users")`` sends every record of the process to stderr as JSON
with the service name and, inside a request, its ``request_id``, ``trace_id`` and
``span_id``, so that one request can be followed through every service's log.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any

from meshgate.service.context import current_request_id, current_trace

__all__ = ["JsonFormatter", "configure_logging"]

_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys() | {"message", "asctime"}
)


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON; ``extra=`` fields are kept."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = current_request_id.get()
        if request_id is not None:
            entry["request_id"] = request_id
        trace = current_trace.get()
        if trace is not None:
            entry["trace_id"] = trace.trace_id
            entry["span_id"] = trace.span_id
        entry.update(
            (key, value)
            for key, value in record.__dict__.items()
            if key not in _STANDARD and not key.startswith("_")
        )
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(
    service: str, level: int | str = "INFO", stream: IO[str] | None = None
) -> None:
    """Send the process's log records to ``stream`` (stderr) as JSON lines."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_meshgate", False):
            root.removeHandler(old)
    handler._meshgate = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())
    # uvicorn's access log duplicates the service's own request metrics and logs,
    # and httpx's line per request would log every registry heartbeat.
    logging.getLogger("uvicorn.access").disabled = True
    logging.getLogger("httpx").setLevel(logging.WARNING)
