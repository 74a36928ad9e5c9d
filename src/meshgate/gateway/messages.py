"""The messages between the gateway supervisor and its workers, over a pipe each.

Every message is a tuple whose first item is its kind. A request the supervisor asks
(:data:`METRICS`, :data:`RELOAD`, :data:`UPSTREAMS`) carries a request number, and the
worker answers it with ``(REPLY, number, payload)``. Both sides match on these names;
no kind is written as a literal anywhere else.
"""

from __future__ import annotations

__all__ = [
    "DRAIN",
    "EJECTED",
    "ENDPOINT",
    "ENDPOINTS",
    "EXITED",
    "METRICS",
    "READY",
    "RELOAD",
    "REPLY",
    "UPSTREAMS",
]

# -- supervisor to worker

METRICS = "metrics"
"""``(METRICS, number)``: the worker's metrics snapshot, as a reply."""
RELOAD = "reload"
"""``(RELOAD, number, config)``: apply this validated, compiled-once
:class:`~meshgate.config.Config` (never re-parsed in the worker); the reply is
``{"ok": bool, "reloads": n}`` or ``{"ok": False, "error": text}``."""
UPSTREAMS = "upstreams"
"""``(UPSTREAMS, number)``: every upstream's pool and endpoint state, as a reply."""
DRAIN = "drain"
"""``(DRAIN,)``: stop accepting, finish what is in flight, exit."""
ENDPOINT = "endpoint"
"""``(ENDPOINT, upstream, label, field, value)``: a health or drain change of one endpoint."""
ENDPOINTS = "endpoints"
"""``(ENDPOINTS, upstream, specs)``: a service upstream's registered instances now."""

# -- worker to supervisor

READY = "ready"
"""``(READY, index, pid)``: serving."""
REPLY = "reply"
"""``(REPLY, number, payload)``: the answer to a request."""
EJECTED = "ejected"
"""``(EJECTED, upstream, label, seconds)``: the worker's outlier detector ejected an
endpoint (the supervisor tells the other workers and gateway nodes)."""
EXITED = "exited"
"""``(EXITED, index)``: the worker is about to exit, drained."""
