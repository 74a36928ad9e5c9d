"""JSON logs for services: one object per line, with the request's id and trace.

``configure_logging("users")`` sends every record of the process to stderr as one
JSON line: the SDK's, the service's own (``logging.getLogger("shop.users")``), and
uvicorn's (its ``uvicorn``/``uvicorn.error`` loggers lose their own handlers and
formats). Each line has ``ts``, ``level``, ``service``, ``instance``, ``logger`` and
``message``; inside a request also ``request_id``, and inside a trace ``trace_id`` and
``span_id`` (of the span current in the OpenTelemetry context: the request's server
span, a query's, a call's, or the caller's own when tracing is off); then
any ``extra=`` fields, and ``exception`` (the traceback) when there is one.

Records are formatted and written by a thread of their own: the code that logs only
puts the record on a queue (with the request's context, taken at that moment), so
that a slow or blocked stderr (a full pipe to ``meshgate up``) never stalls the
event loop. :func:`flush` waits until what was logged is written; it runs at exit.
"""

from __future__ import annotations

import atexit
import copy
import json
import logging
import os
import queue
import sys
import threading
import time
from logging.handlers import QueueHandler, QueueListener
from typing import IO, Any

from opentelemetry import trace

from meshgate.service.context import current_request_id

__all__ = ["JsonFormatter", "configure_logging", "flush", "set_instance"]

_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)
_CONTEXT = "_meshgate_context"
"""The attribute of a queued record that holds its request's context."""
_UVICORN = ("uvicorn", "uvicorn.error", "uvicorn.asgi")


def _context() -> dict[str, str]:
    found: dict[str, str] = {}
    request_id = current_request_id.get()
    if request_id is not None:
        found["request_id"] = request_id
    span = trace.get_current_span().get_span_context()
    if span.is_valid:
        found["trace_id"] = f"{span.trace_id:032x}"
        found["span_id"] = f"{span.span_id:016x}"
    return found


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON; ``extra=`` fields are kept.

    The request's context is the one the record was queued with (see the module), or
    else the current one (a formatter called in the code that logs)."""

    def __init__(self, service: str, instance: str | None = None) -> None:
        super().__init__()
        self.service = service
        self.instance = instance
        """This process's instance (``users-1``); None until known (then left out)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
        }
        if self.instance is not None:
            entry["instance"] = self.instance
        entry["logger"] = record.name
        entry["message"] = record.getMessage()
        context = getattr(record, _CONTEXT, None)
        entry.update(_context() if context is None else context)
        entry.update(
            (key, value)
            for key, value in record.__dict__.items()
            if key not in _STANDARD and not key.startswith("_") and key not in entry
        )
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, default=str, ensure_ascii=False)


class _ContextQueueHandler(QueueHandler):
    """Queues a copy of the record, its message made and its traceback rendered (a
    traceback must not outlive its frames), with the request's context."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        prepared = copy.copy(record)
        prepared.message = record.getMessage()
        prepared.msg = prepared.message
        prepared.args = None
        if record.exc_info:
            prepared.exc_text = logging.Formatter().formatException(record.exc_info)
            prepared.exc_info = None
        setattr(prepared, _CONTEXT, _context())
        return prepared


class _Flush:
    """A marker put on the queue: set when everything before it was written."""

    def __init__(self) -> None:
        self.done = threading.Event()


class _Listener(QueueListener):
    def handle(self, record: Any) -> None:
        if isinstance(record, _Flush):
            for handler in self.handlers:
                handler.flush()
            record.done.set()
            return
        super().handle(record)


class _Installed:
    def __init__(self, handler: _ContextQueueHandler, listener: _Listener, fmt: JsonFormatter):
        self.handler = handler
        self.listener = listener
        self.formatter = fmt
        self.queue: queue.SimpleQueue[Any] = handler.queue  # type: ignore[assignment]


_installed: _Installed | None = None
_lock = threading.Lock()


def configure_logging(
    service: str,
    level: int | str = "INFO",
    stream: IO[str] | None = None,
    *,
    instance: str | None = None,
) -> None:
    """Send every log record of the process to ``stream`` (stderr) as JSON lines,
    written by a background thread; calling it again replaces the earlier set-up.

    ``instance`` names this process in every line (default: ``MESHGATE_INSTANCE``,
    which ``meshgate up`` sets, else the registry's instance id once the service is
    bound: see :func:`set_instance`).
    """
    global _installed
    formatter = JsonFormatter(service, instance or os.environ.get("MESHGATE_INSTANCE") or None)
    writer = logging.StreamHandler(stream or sys.stderr)
    writer.setFormatter(formatter)
    records: queue.SimpleQueue[Any] = queue.SimpleQueue()
    handler = _ContextQueueHandler(records)
    listener = _Listener(records, writer)
    root = logging.getLogger()
    with _lock:
        previous, _installed = _installed, _Installed(handler, listener, formatter)
        if previous is not None:
            root.removeHandler(previous.handler)
            previous.listener.stop()
        listener.start()
        root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())
    for name in _UVICORN:
        # uvicorn's default configuration gives them handlers and formats of their own.
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # The SDK writes one access line per request (meshgate.access); uvicorn's would be
    # a second, in another format. httpx's line per request would log every registry
    # heartbeat.
    logging.getLogger("uvicorn.access").handlers.clear()
    logging.getLogger("uvicorn.access").disabled = True
    logging.getLogger("httpx").setLevel(logging.WARNING)


def set_instance(instance: str) -> None:
    """Name this process ``instance`` in the lines of :func:`configure_logging`, unless
    it was named already (``instance=``, ``MESHGATE_INSTANCE``)."""
    installed = _installed
    if installed is not None and installed.formatter.instance is None:
        installed.formatter.instance = instance


def flush(timeout: float = 5.0) -> bool:
    """Wait until every record logged so far is written; False if that took longer
    than ``timeout`` seconds (the stream is blocked)."""
    installed = _installed
    if installed is None:
        return True
    marker = _Flush()
    installed.queue.put(marker)
    return marker.done.wait(timeout)


@atexit.register
def _stop() -> None:
    installed = _installed
    if installed is not None:
        flush(2.0)
