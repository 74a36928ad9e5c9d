"""The gateway's data plane: a raw asyncio protocol per client connection.

A :class:`ClientConnection` parses requests with httptools; each request becomes
an :class:`Exchange` that is routed, given an upstream connection from the pool,
and streamed both ways with backpressure. Requests pipelined on one connection
are answered strictly in order: later ones are parsed and queued (reading paused)
until the earlier response is complete.

Everything that can be computed when the configuration is compiled lives on the
:class:`~meshgate.gateway.runtime.Runtime`; the code here joins pre-encoded bytes.
"""

from __future__ import annotations

import asyncio
import logging
import re
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from random import random
from time import perf_counter
from typing import TYPE_CHECKING

from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade, HttpRequestParser

from meshgate.gateway import http
from meshgate.gateway.addresses import canonical_ip
from meshgate.gateway.clock import CLOCK
from meshgate.gateway.filters import PENDING
from meshgate.gateway.http import IDEMPOTENT_METHODS, error_response, status_line
from meshgate.gateway.metrics import BUCKETS
from meshgate.gateway.paths import PathError, normalize_path

if TYPE_CHECKING:
    from meshgate.gateway.runtime import CompiledRoute, Runtime
    from meshgate.gateway.upstream.pool import Endpoint, UpstreamConnection
    from meshgate.gateway.worker import Worker

__all__ = ["ClientConnection", "Exchange"]

log = logging.getLogger("meshgate.gateway")

# Reasons the client's reading is paused (a bit each).
_PIPELINE = 1
_UPSTREAM_FULL = 2  # used by UpstreamConnection.pause_writing
_BODY_BUFFER = 4
_REFUSED = 8
_TUNNEL_WAIT = 16  # bytes after an Upgrade request wait for the upstream's 101

_BODY_BUFFER_LIMIT = 256 * 1024
# What a client may send after an Upgrade request before the upstream agrees: a
# WebSocket client sends nothing until the 101, so this only bounds a hostile one.
_TUNNEL_PENDING_LIMIT = 64 * 1024
# Chunk extensions and trailers are read and thrown away, but a client could send them
# without end; past this many bytes (Node.js caps them at 16 KiB since CVE-2024-22019)
# the request is refused. Each chunk may spend _CHUNK_FRAMING bytes on its size line
# and CRLFs before anything counts as an extension.
_CHUNK_EXTRA_LIMIT = 16 * 1024
_CHUNK_FRAMING = 12
_ALLOW_DEFAULT = b"Allow: GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS\r\n"
_HOST_CHARS = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-:[]_"
_RID_CHARS = bytes(range(0x21, 0x7F))
_CHUNK_END = b"\r\n"
# A path with any of these is normalized before routing (see gateway/paths.py).
_needs_normalizing = re.compile(rb"[%;\\]|/[./]").search
_LAST_CHUNK = b"0\r\n\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _Reject(Exception):  # noqa: N818 - internal control flow, never escapes
    """Refuse the request being parsed with ``status`` (raised inside parser callbacks)."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail


class Exchange:
    """One request and its response.

    States: parsed -> dispatched (routed; waiting for a connection) -> attached
    (request head sent) -> response head sent -> done. ``done`` is set exactly once,
    by :meth:`finish`.
    """

    # Fields every request writes live in slots; fields only some requests touch
    # are class-level defaults, shadowed in the instance dict when set, so that
    # creating an exchange costs a handful of slot writes rather than forty.
    __slots__ = (
        "__dict__",
        "client",
        "conn",
        "done",
        "endpoint",
        "head",
        "headers",
        "http10",
        "keep_alive",
        "last_io",
        "method",
        "out",
        "req_done",
        "request_id",
        "resp_bytes",
        "resp_started",
        "reused",
        "route",
        "rt",
        "sampled",
        "status",
        "t_start",
        "t_up",
        "trace_id",
        "up_span",
        "upgrade",
        "url",
    )

    # Slots set when the head is prepared or the exchange attached.
    headers: list[tuple[bytes, bytes]]
    # Slots set by Tracer.begin once the request is routed (tracing on only).
    trace_id: bytes
    sampled: bool
    up_span: bytes
    http10: bool
    upgrade: bool
    last_io: float
    reused: bool

    aborted = ""  # why a response was cut off after its head was sent
    attempts = 0  # retries made
    has_body = False  # the request announced a body (Content-Length > 0 or chunked)
    tried: set[Endpoint] | None = None  # endpoints a retry must avoid
    upgrade_to: frozenset[bytes] = frozenset()  # the protocols a 101 may switch to
    # Trace context (hex ids) beyond the slots Tracer.begin sets when tracing is on
    # (trace_id, sampled, up_span).
    parent_span = b""  # the client's span, from its traceparent
    tracestate = b""
    replay: list[bytes] | None = None  # the body so far, kept to be sent again
    replay_size = 0
    resp_extra = b""  # header lines filters add to the response
    set_cookie = b""  # a sticky-session cookie (the last endpoint picked sets it)
    consumer: str | None = None  # the authenticated caller (set by the auth filter)
    spoofed = False  # the client sent a header the auth filter owns
    try_deadline = 0.0  # the current try's per-try timeout
    body_buf: list[bytes] | None = None
    body_size = 0
    chunks = 0  # chunks of a chunked request body so far
    chunk_wire = 0  # bytes of a chunked body as they came on the wire (framing included)
    chunked_in = False
    chunk_out = False
    deadline = 0.0
    error_bytes: bytes | None = None
    expect_continue = False
    interim = False
    no_body = False
    queued_at = 0.0
    raw_body_left = 0  # body bytes of a refused upgrade, read past the stopped parser
    retried = False
    t_up_end = 0.0
    until_close = False

    def __init__(self, client: ClientConnection, rt: Runtime, url: bytes = b"") -> None:
        self.client = client
        self.rt = rt
        self.url = url
        self.head: bytes | tuple[bytes, bytes] = b""
        self.method = b""
        self.route: CompiledRoute | None = None
        self.conn: UpstreamConnection | None = None
        self.done = False
        self.req_done = False
        self.resp_started = False
        self.keep_alive = True
        self.status = 0
        self.request_id = b""
        self.resp_bytes = 0
        self.t_start = 0.0
        self.t_up = 0.0
        self.endpoint: Endpoint | None = None
        # Response bytes held back to leave in one write with what follows them
        # in the same read from the upstream (head + body: one syscall, not two).
        self.out: list[bytes] | None = None

    # -- request side ---------------------------------------------------------

    def dispatch(self) -> None:
        """Start the exchange: answer a prepared error, run the route's filters, then
        ask the upstream for a connection."""
        error = self.error_bytes
        if error is not None:
            self.client.transport.write(error)
            self.finish()
            return
        route = self.route
        assert route is not None  # noqa: S101 - set whenever error_bytes is not
        chain = route.chain
        if chain is not None:
            verdict = chain.run(self)
            if verdict is not None:
                if verdict is not PENDING:
                    self.answer(verdict)  # type: ignore[arg-type]
                return  # else the chain calls filters_passed() or answer() later
        self.filters_passed()

    def filters_passed(self) -> None:
        """Past the filters: invite the body if asked, and find a connection."""
        if self.expect_continue:
            # Only now: a request refused by a filter never had its body invited.
            self.client.transport.write(_CONTINUE)
        self.route.upstream.acquire(self)  # type: ignore[union-attr]

    def answer(self, response: bytes) -> None:
        """Send a filter's own response (401, 429, a CORS preflight...) and end."""
        self.resp_started = True
        self.client.transport.write(response)
        self.finish()

    # -- filters change the upstream request through these --------------------------

    def append_request_lines(self, lines: bytes) -> None:
        """Add header lines (each ending in CRLF) to the upstream request."""
        head = self.head
        if isinstance(head, tuple):
            self.head = (head[0], head[1][:-2] + lines + b"\r\n")
        else:
            self.head = head[:-2] + lines + b"\r\n"

    def rewrite_request_headers(self, rewrite: Callable[[bytes], bytes]) -> None:
        """Replace the forwarded header lines with ``rewrite(lines)`` (each line ends
        in CRLF; the request line is kept)."""
        head = self.head
        if type(head) is tuple:
            line, rest = head
            self.head = (line, rewrite(rest[:-2]) + b"\r\n")
        else:
            assert type(head) is bytes  # noqa: S101 - narrowing for mypy
            split = head.index(b"\r\n") + 2
            self.head = head[:split] + rewrite(head[split:-2]) + b"\r\n"

    def _request_line(self) -> bytes:
        head = self.head
        if isinstance(head, tuple):
            return head[0]
        return head[: head.index(b"\r\n") + 2]

    def request_target(self) -> bytes:
        """The target (path and query) the upstream request carries now."""
        return self._request_line().split(b" ")[1]

    def set_request_target(self, target: bytes) -> None:
        """Forward ``target`` (path and query) instead of the one prepared."""
        line = self._request_line()
        method, _, rest = line.partition(b" ")
        new_line = method + b" " + target + b" " + rest.rpartition(b" ")[2]
        head = self.head
        if isinstance(head, tuple):
            self.head = (new_line, head[1])
        else:
            self.head = new_line + head[len(line) :]

    def attach(self, conn: UpstreamConnection, reused: bool) -> None:
        """Send the request on ``conn``: its head, then whatever body has arrived."""
        self.conn = conn
        self.reused = reused
        endpoint = self.endpoint = conn.endpoint
        endpoint.inflight += 1
        if not self.attempts and not self.retried:
            conn.upstream.sent += 1  # a first try: it feeds the retry budget
        conn.exchange = self
        conn.requests += 1
        transport = conn.transport
        head = self.head
        if type(head) is tuple:
            head = head[0] + conn.endpoint.host_line + head[1]
        assert type(head) is bytes  # noqa: S101 - narrowing for mypy; always true
        buffered = self.body_buf
        if buffered is None and not self.chunked_in:
            transport.write(head)
        else:
            # The head and whatever body arrived meanwhile leave in one write.
            parts = [head]
            if buffered:
                self.body_buf = None
                if self.chunked_in:
                    for chunk in buffered:
                        parts += (b"%x\r\n" % len(chunk), chunk, _CHUNK_END)
                else:
                    parts += buffered
            if self.req_done and self.chunked_in:
                parts.append(_LAST_CHUNK)
            transport.writelines(parts)
            self.client.resume_reading_for(_BODY_BUFFER)
        now = CLOCK.now
        self.last_io = now
        self.t_up = perf_counter()
        route = self.route
        total = route.total_timeout  # type: ignore[union-attr]
        if total and not self.deadline:
            self.deadline = now + total  # the whole exchange, retries included
        retry = route.retry  # type: ignore[union-attr]
        if retry is not None and retry.per_try:
            self.try_deadline = now + retry.per_try
        self.client.worker.inflight.add(self)

    def on_request_body(self, body: bytes) -> None:
        size = self.body_size + len(body)
        self.body_size = size
        limit = self.rt.max_body
        if limit is not None and size > limit:
            raise _Reject(413, "body_too_large", f"the request body is larger than {limit} bytes")
        if self.done:
            return
        replay = self.replay
        if replay is not None:
            self.replay_size += len(body)
            if self.replay_size > self.route.retry.buffer:  # type: ignore[union-attr]
                self.replay = None  # too large to send again: this request is not retried
            else:
                replay.append(body)
        conn = self.conn
        if conn is not None:
            if self.chunked_in:
                conn.transport.writelines((b"%x\r\n" % len(body), body, _CHUNK_END))
            else:
                conn.transport.write(body)
            return
        buffered = self.body_buf
        if buffered is None:
            buffered = self.body_buf = []
        buffered.append(body)
        if size > _BODY_BUFFER_LIMIT:
            self.client.pause_reading_for(_BODY_BUFFER)

    # -- response side --------------------------------------------------------

    def on_upstream_head(self, conn: UpstreamConnection, status: int, block: bytes) -> None:
        """The upstream's response head: ``block`` is its header lines, raw (see
        :func:`~meshgate.gateway.http.filter_response_head`)."""
        client = self.client
        rt = self.rt
        headers, clen, chunked, upgrade, connection = http.filter_response_head(
            block, rt.resp_names, rt.rid_lower
        )
        if status < 200 and status != 101:
            # Interim responses (102, 103) go to HTTP/1.1 clients as they are;
            # the parser reports their end, which must not end the exchange.
            self.interim = True
            if not self.http10:
                client.transport.write(status_line(status) + headers + b"\r\n")
            return
        if status >= 500:
            retry = self.route.retry  # type: ignore[union-attr]
            if retry is not None and status in retry.statuses and self._may_retry(True):
                # Not forwarded: the connection is mid-response, so it is dropped.
                conn.exchange = None
                conn.transport.abort()
                self.conn = None
                self._retry(conn.endpoint)
                return
        self.status = status
        self.resp_started = True
        route = self.route
        chain = route.chain  # type: ignore[union-attr]
        if chain is not None and chain.response_filters:
            # Header rules see every line, the gateway's own included; the
            # upstream's Connection line goes first (the gateway states its own).
            if connection is not None:
                headers = http.drop_connection(headers)
                connection = None
            block = b"".join(
                (headers, self.resp_extra, self.set_cookie, rt.via_resp, rt.rid_prefix)
            )
            block = chain.response(self, block + self.request_id + b"\r\n")
            # The last line's CRLF comes with what is appended below.
            out = [status_line(status)[:-2], b"\r\n" + block[:-2] if block else b""]
        else:
            out = [status_line(status), headers, rt.via_resp, rt.rid_prefix, self.request_id]
            if self.resp_extra or self.set_cookie:
                out.insert(2, self.resp_extra + self.set_cookie)  # whole lines, among the others
        append = out.append
        if status == 101:
            # Only a switch the client asked for, to a protocol the route allows:
            # anything else would open a tunnel past routing and policies.
            if not self.upgrade or (upgrade or b"").strip().lower() not in self.upgrade_to:
                self.status = 0
                self.resp_started = False
                conn.exchange = None
                conn.transport.abort()
                self.conn = None
                self._leave_endpoint(failed=conn.endpoint)
                self.fail(
                    502,
                    "upstream_invalid_response",
                    "the upstream switched to a protocol the request did not ask for",
                )
                return
            append(b"\r\nConnection: Upgrade\r\nUpgrade: " + (upgrade or b"") + b"\r\n\r\n")
            client.transport.write(b"".join(out))
            return
        keep = self.keep_alive and not client.closing
        if self.method == b"HEAD" or status in (204, 304):
            self.no_body = True
        elif not clen:
            # Without a length the upstream's body ends with chunking or, failing
            # that, with its connection.
            self.until_close = not chunked
            if self.http10:
                keep = False  # the body ends when the connection does
            else:
                self.chunk_out = True
                append(b"\r\nTransfer-Encoding: chunked")
        if not self.req_done:
            # The upstream answered before the request body was read; the rest of
            # it cannot be told apart from a next request, so the connection ends.
            keep = False
        if connection is not None and (connection != b"keep-alive" or not keep or self.http10):
            # The upstream's own Connection line states the wrong option here.
            out[1] = http.drop_connection(headers)
        if not keep:
            append(b"\r\nConnection: close\r\n\r\n")
            self.keep_alive = False
        elif self.http10:
            append(b"\r\nConnection: keep-alive\r\n\r\n")
        else:
            append(b"\r\n\r\n")
        if self.method == b"HEAD":
            client.transport.write(b"".join(out))
            # The parser would wait for a body that a HEAD response never has; and
            # since it would take what follows for one, any such bytes end the
            # connection.
            reusable = self.req_done and conn.parser.should_keep_alive()
            conn.reset_parser()
            self.conn = None
            conn.exchange = None
            if reusable and not conn.spill:
                conn.reusable = True
            elif reusable:
                conn.discard()
            else:
                conn.upstream.release(conn, False)
            self.finish()
        else:
            self.out = [b"".join(out)]

    def on_upstream_body(self, body: bytes) -> None:
        if self.done:
            return
        self.resp_bytes += len(body)
        out = self.out
        if out is not None:
            if self.chunk_out:
                out += (b"%x\r\n" % len(body), body, _CHUNK_END)
            else:
                out.append(body)
        elif self.chunk_out:
            self.client.transport.writelines((b"%x\r\n" % len(body), body, _CHUNK_END))
        else:
            self.client.transport.write(body)

    def flush(self) -> None:
        """Write the response bytes held back during one read from the upstream."""
        out = self.out
        if out is not None:
            self.out = None
            self.client.transport.writelines(out)

    def on_upstream_end(self, conn: UpstreamConnection) -> None:
        if self.interim:
            self.interim = False
            return
        if self.done:
            return
        if self.status == 101:
            # The parser ends a 101 response before it reports the upgrade;
            # bytes after the head reach the tunnel from UpstreamConnection.
            self.on_upstream_upgrade(conn, b"")
            return
        out = self.out
        if self.chunk_out:
            if out is not None:
                out.append(_LAST_CHUNK)
            else:
                self.client.transport.write(_LAST_CHUNK)
        if out is not None:
            self.out = None
            self.client.transport.writelines(out)
        self.conn = None
        conn.exchange = None
        if self.req_done and conn.parser.should_keep_alive():
            # Pooled once the whole read is parsed, and only if nothing followed this
            # response in it (UpstreamConnection.data_received).
            conn.reusable = True
        else:
            conn.upstream.release(conn, False)
        self.finish()

    def on_upstream_upgrade(self, conn: UpstreamConnection, rest: bytes) -> None:
        """The upstream switched protocols (101): both sides become a byte tunnel."""
        client = self.client
        if self.status != 101:
            self.on_upstream_error(conn, "upstream switched protocols without 101")
            conn.transport.abort()
            return
        self.t_up_end = perf_counter()
        self.conn = None
        conn.exchange = None
        conn.tunnel = client.transport
        client.tunnel = conn
        self.client.worker.inflight.discard(self)
        if rest:
            client.transport.write(rest)
        pending = client.tunnel_pending
        client.tunnel_pending = None
        if pending:
            conn.transport.write(pending)
        client.resume_reading_for(_TUNNEL_WAIT)
        self.keep_alive = False
        self.finish()

    def on_upstream_lost(self, conn: UpstreamConnection, exc: Exception | None) -> None:
        self.conn = None
        if self.done:
            return
        if not self.resp_started:
            if self._retry_stale(conn):
                return
            self.upstream_failed(
                conn.endpoint,
                "reset",
                502,
                "upstream_closed",
                f"{conn.endpoint.label} closed the connection before responding",
            )
            return
        if self.until_close:
            # A response without length or chunking ends with the connection.
            self.flush()
            if self.chunk_out:
                self.client.transport.write(_LAST_CHUNK)
            self.t_up_end = perf_counter()
            self.finish()
            return
        self._leave_endpoint(failed=conn.endpoint)
        self._abort_client("the upstream closed the connection mid-response")

    def on_upstream_error(self, conn: UpstreamConnection, detail: str) -> None:
        self.conn = None
        if self.done:
            return
        self._leave_endpoint(failed=conn.endpoint)
        if self.resp_started:
            self._abort_client(detail)
        else:
            self.fail(502, "upstream_invalid_response", detail)

    def _retry_stale(self, conn: UpstreamConnection) -> bool:
        """Resend once on a new connection when a reused one closed before answering.

        An idle keep-alive connection can be closed by the upstream just as a request
        is sent on it; the upstream never saw the request. Only requests that are
        safe to resend qualify: idempotent and without a body.
        """
        if not self.reused or self.retried or self.method not in IDEMPOTENT_METHODS:
            return False
        if self.body_size or self.chunked_in:
            return False
        self.retried = True
        self._leave_endpoint()
        self.client.worker.inflight.discard(self)
        self.route.upstream.acquire(self)  # type: ignore[union-attr]
        return True

    # -- retries --------------------------------------------------------------------

    def upstream_failed(
        self, endpoint: Endpoint, kind: str, status: int, error: str, detail: str
    ) -> None:
        """A try failed before any response reached the client: retry it, or answer.

        ``kind`` is ``connect_failure`` (the request never reached the upstream),
        ``reset`` or ``timeout``.
        """
        if self.done:
            return
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.exchange = None
            conn.transport.abort()
        retry = self.route.retry if self.route is not None else None
        if retry is not None and not self.resp_started:
            wanted = (
                retry.on_connect
                if kind == "connect_failure"
                else retry.on_reset
                if kind == "reset"
                else retry.on_timeout
            )
            if wanted and self._may_retry(kind != "connect_failure"):
                self._retry(endpoint)
                return
        self._leave_endpoint(failed=endpoint)
        self.fail(status, error, detail)

    def _may_retry(self, reached: bool) -> bool:
        """Whether this exchange may be tried again now (and take a retry from the
        budget). ``reached``: the request may have been processed by the upstream."""
        retry = self.route.retry  # type: ignore[union-attr]
        if retry is None or self.attempts >= retry.attempts or self.resp_started:
            return False
        if self.body_size and self.replay is None:
            return False  # the body is too large to send again
        # Sent twice, a non-idempotent request may act twice; only a request that says
        # it is safe (an Idempotency-Key) on a route that allows it is resent.
        if (
            reached
            and self.method not in IDEMPOTENT_METHODS
            and not (retry.idempotency_key and _has_header(self.headers, b"idempotency-key"))
        ):
            return False
        if self.deadline and CLOCK.now >= self.deadline:
            return False
        upstream = self.route.upstream  # type: ignore[union-attr]
        if not upstream.budget.try_spend():
            self.route.stats.budget_exhausted += 1  # type: ignore[union-attr]
            return False
        return True

    def _retry(self, failed: Endpoint) -> None:
        """Try again on another endpoint after a backoff with full jitter."""
        self._leave_endpoint(failed=failed)
        self.attempts += 1
        self.route.stats.retries += 1  # type: ignore[union-attr]
        tried = self.tried
        if tried is None:
            tried = self.tried = set()
        tried.add(failed)
        self.client.worker.inflight.discard(self)
        self.try_deadline = 0.0
        if self.replay is not None:
            self.body_buf = list(self.replay)  # the whole body goes again
        retry = self.route.retry  # type: ignore[union-attr]
        delay = random() * min(retry.backoff_max, retry.backoff_base * 2 ** (self.attempts - 1))  # type: ignore[union-attr]  # noqa: S311
        asyncio.get_running_loop().call_later(delay, self._retry_now)

    def _retry_now(self) -> None:
        if not self.done:
            self.route.upstream.acquire(self)  # type: ignore[union-attr]

    def _leave_endpoint(self, failed: Endpoint | None = None) -> None:
        """This try is over: the endpoint it used has one request less in flight, and
        a failure to count."""
        endpoint = self.endpoint
        if endpoint is not None:
            self.endpoint = None
            endpoint.inflight -= 1
        if failed is not None:
            failed.upstream.failed(failed, CLOCK.now)  # type: ignore[union-attr]

    def _abort_client(self, detail: str, reason: str = "upstream_failed") -> None:
        log.debug("aborting client connection: %s", detail)
        self.aborted = reason
        self.out = None
        self.keep_alive = False
        self.status = self.status or 502
        self.client.transport.abort()
        self.finish()

    # -- errors and timeouts ----------------------------------------------------

    def fail(self, status: int, error: str, detail: str, *, headers: bytes = b"") -> None:
        """End the exchange with an error response (or by closing, if one already started)."""
        if self.done:
            return
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.exchange = None
            conn.transport.abort()
        if self.resp_started:
            self._abort_client(detail)
            return
        route = self.route
        self.status = status
        # A request whose body is still arriving ends the connection: what is left
        # of it would otherwise be read and thrown away.
        self.keep_alive = self.keep_alive and (self.req_done or not self.has_body)
        self.client.transport.write(
            error_response(
                status,
                error,
                detail,
                request_id=self.request_id,
                request_id_header=self.rt.rid_name,
                route=route.name if route is not None else None,
                upstream=route.upstream.name if route is not None else None,
                close=not self.keep_alive,
                # Lines filters added (CORS, RateLimit) belong on errors too: a
                # browser must be able to read a 502 from an allowed origin.
                extra_headers=headers + self.resp_extra,
                instance=self.url,
            )
        )
        self.finish()

    @property
    def read_timeout(self) -> float:
        route = self.route
        return route.read_timeout if route is not None else 60.0

    @property
    def connect_timeout(self) -> float:
        route = self.route
        return route.connect_timeout if route is not None else 5.0

    def timed_out(self, which: str) -> None:
        route = self.route
        total = route.total_timeout if route is not None else None
        seconds = self.read_timeout if which == "read" else (total or 0.0)
        self.fail(
            504,
            "upstream_timeout",
            f"the upstream sent nothing for {seconds:g}s"
            if which == "read"
            else f"the exchange took longer than {seconds:g}s",
        )

    # -- the end ------------------------------------------------------------------

    def finish(self) -> None:
        """Record the exchange and let the connection go on to its next request."""
        if self.done:
            return
        self.done = True
        client = self.client
        worker = client.worker
        worker.inflight.discard(self)
        route = self.route
        end = perf_counter()
        # The upstream's part ends with its response, which is now unless it
        # ended earlier (a tunnel, a response delimited by the connection's end).
        t_up = self.t_up
        upstream_time = ((self.t_up_end or end) - t_up) if t_up else 0.0
        status = self.status
        total = end - self.t_start
        stats = route.stats if route is not None else self.rt.unrouted
        # RouteStats.observe, inlined: this runs for every request.
        stats.by_class[status // 100 if 100 <= status < 600 else 5] += 1
        stats.duration_buckets[bisect_left(BUCKETS, total)] += 1
        stats.duration_sum += total
        gateway_time = total - upstream_time
        if gateway_time < 0.0:
            gateway_time = 0.0
        stats.gateway_buckets[bisect_left(BUCKETS, gateway_time)] += 1
        stats.gateway_sum += gateway_time
        if upstream_time:
            stats.upstream_buckets[bisect_left(BUCKETS, upstream_time)] += 1
            stats.upstream_sum += upstream_time
        aborted = self.aborted
        if aborted:
            stats.aborted += 1
        endpoint = self.endpoint
        tracer = self.rt.tracer
        if (
            tracer is not None
            and route is not None
            and (self.sampled or (tracer.errors and (status >= 500 or aborted)))
        ):
            tracer.end(self, end, endpoint.label if endpoint is not None else "")
        if endpoint is not None:
            # The last try's endpoint: its load, latency and health.
            self.endpoint = None
            endpoint.inflight -= 1
            if status < 500:
                endpoint.failures = 0
                if upstream_time:
                    ewma = endpoint.ewma
                    endpoint.ewma = ewma + (upstream_time - ewma) * 0.3 if ewma else upstream_time
                breaker = endpoint.upstream.breaker  # type: ignore[union-attr]
                if breaker is not None:
                    breaker.record(True, CLOCK.now)
            else:
                endpoint.upstream.failed(endpoint, CLOCK.now)  # type: ignore[union-attr]
        access = worker.access_log
        if access is not None:
            access.records.append(
                (
                    client.peer_ip,
                    self.method,
                    self.url,
                    status,
                    route.name if route is not None else "",
                    self.request_id,
                    self.resp_bytes,
                    total,
                    upstream_time,
                    aborted,
                )
            )
        if self.keep_alive and client.current is self and not client.closing and not client.pending:
            # The common case of ClientConnection.exchange_done, inlined.
            client.current = None
            client.idle_since = CLOCK.now
            return
        client.exchange_done(self)


def _has_header(headers: list[tuple[bytes, bytes]], name: bytes) -> bool:
    """Whether ``headers`` has one called ``name`` (lowercase)."""
    return any(key.lower() == name for key, _ in headers)


def _connection_tokens(value: bytes, extra: set[bytes] | None) -> set[bytes] | None:
    """Header names listed in Connection (other than close/keep-alive/upgrade) to drop."""
    for raw in value.lower().split(b","):
        token = raw.strip()
        if token and token not in (b"close", b"keep-alive", b"upgrade"):
            if extra is None:
                extra = set()
            extra.add(token)
    return extra


_NO_SPECIALS = (b"", None, b"", None, b"", b"", False, b"", b"", b"", b"", b"", b"")


def _special_headers(
    items: list[tuple[int, bytes]], trusted: bool
) -> tuple[
    bytes,
    bytes | None,
    bytes,
    set[bytes] | None,
    bytes,
    bytes,
    bool,
    bytes,
    bytes,
    bytes,
    bytes,
    bytes,
    bytes,
]:
    """The request headers the gateway acts on (other than Host), read in one pass.

    Returns (request id, Content-Length, Transfer-Encoding, names listed in Connection,
    Upgrade, Expect, whether Connection was sent, from a trusted peer the
    X-Forwarded-For, -Proto, -Host and Forwarded values, and (while tracing is on)
    traceparent and tracestate). Hop-by-hop headers and
    forwarding headers from an untrusted peer are simply not returned: dropped.
    """
    request_id = b""
    content_length: bytes | None = None
    chunked = b""
    extra_drop: set[bytes] | None = None
    upgrade_value = b""
    expect = b""
    has_connection = False
    xff = xfp = xfh = forwarded = b""
    traceparent = tracestate = b""
    for kind, value in items:
        if kind == http.TRACEPARENT:
            # Two traceparents are invalid (W3C trace context 3.2): a new trace.
            traceparent = b"-" if traceparent else value
        elif kind == http.TRACESTATE:
            tracestate = tracestate + b"," + value if tracestate else value
        elif kind == http.REQUEST_ID:
            request_id = value
        elif kind == http.CONTENT_LENGTH:
            content_length = value
        elif kind == http.TRANSFER_ENCODING:
            # Forwarded whole: codings before "chunked" (gzip, ...) stay with the body.
            chunked = chunked + b", " + value if chunked else value
        elif kind == http.CONNECTION:
            has_connection = True
            extra_drop = _connection_tokens(value, extra_drop)
        elif kind == http.UPGRADE:
            upgrade_value = value
        elif kind == http.EXPECT:
            expect = value
        elif trusted:
            if kind == http.X_FORWARDED_FOR:
                xff = xff + b", " + value if xff else value
            elif kind == http.X_FORWARDED_PROTO:
                xfp = value
            elif kind == http.X_FORWARDED_HOST:
                xfh = value
            elif kind == http.FORWARDED:
                forwarded = forwarded + b", " + value if forwarded else value
    return (
        request_id,
        content_length,
        chunked,
        extra_drop,
        upgrade_value,
        expect,
        has_connection,
        xff,
        xfp,
        xfh,
        forwarded,
        traceparent,
        tracestate,
    )


_LINGER_IDLE = 2.0  # seconds without a byte from the client
_LINGER_TOTAL = 10.0
_LINGER_BYTES = 64 << 20


class _Lingering(asyncio.Protocol):
    """A connection the gateway has answered and is closing while the client still
    sends (an oversized head or body, a refused request): the write side is shut
    (FIN after the answer), and what the client sends is read and discarded for a
    bounded time and size, then the connection closes. Closing at once would make
    the kernel answer the unread bytes with a reset, and a client still writing would
    never read the answer (nginx's lingering close).
    """

    __slots__ = ("client", "last", "left", "loop", "timer", "transport", "until")

    def __init__(self, client: ClientConnection) -> None:
        self.client = client
        self.transport = client.transport
        self.loop = asyncio.get_running_loop()
        now = self.loop.time()
        self.last = now
        self.until = now + _LINGER_TOTAL
        self.left = _LINGER_BYTES
        self.timer = self.loop.call_later(_LINGER_IDLE, self._check)

    @classmethod
    def start(cls, client: ClientConnection) -> None:
        transport = client.transport
        if transport.is_closing():
            return
        lingering = cls(client)
        transport.set_protocol(lingering)
        if transport.can_write_eof():
            transport.write_eof()  # sent once the answer has left
        client.paused = 0
        transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.last = self.loop.time()
        self.left -= len(data)
        if self.left <= 0:
            self.transport.close()

    def eof_received(self) -> bool:
        return False  # the client is done: close

    def _check(self) -> None:
        now = self.loop.time()
        if now - self.last >= _LINGER_IDLE or now >= self.until:
            self.transport.close()
            return
        self.timer = self.loop.call_later(
            min(_LINGER_IDLE - (now - self.last), self.until - now), self._check
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()
        self.client.connection_lost(exc)


class ClientConnection(asyncio.Protocol):
    """One client connection: parses requests and runs their exchanges in order."""

    __slots__ = (
        "body_seen",
        "closing",
        "current",
        "fwd",
        "head_size",
        "head_started",
        "headers",
        "host_cached",
        "host_fwd",
        "host_line",
        "idle_since",
        "lingering",
        "parser",
        "parsing",
        "paused",
        "peer_cert",
        "peer_ip",
        "peer_trusted",
        "pending",
        "transport",
        "tunnel",
        "tunnel_pending",
        "upgrading",
        "worker",
    )

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = HttpRequestParser(self)
        self.current: Exchange | None = None
        self.parsing: Exchange | None = None
        self.pending: deque[Exchange] | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_size = 0
        self.head_started = 0.0
        self.body_seen = 0.0
        self.upgrading: Exchange | None = None
        self.lingering = False
        self.idle_since = 0.0
        self.paused = 0
        self.closing = False
        self.peer_ip = ""
        self.peer_trusted = False
        self.peer_cert = False  # a client certificate the listener verified (mTLS)
        self.fwd: tuple[bytes, bytes, bytes] = (b"", b"", b"")
        self.host_cached = b""
        self.host_fwd = b""
        self.host_line = b""
        self.tunnel: UpstreamConnection | None = None
        self.tunnel_pending: bytes | None = None

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        worker = self.worker
        worker.connections.add(self)
        peer = transport.get_extra_info("peername")
        ip = peer[0] if isinstance(peer, tuple) else "unix"
        if ip[:7] == "::ffff:":
            # An IPv4 client of a dual-stack listener: judged (allow and deny
            # lists, trusted proxies, rate-limit keys) by its IPv4 address.
            ip = canonical_ip(ip) or ip
        self.peer_ip = ip
        self.peer_trusted = worker.runtime.is_trusted(ip)
        self.peer_cert = bool(transport.get_extra_info("peercert"))
        self.idle_since = CLOCK.now
        self.fwd = worker.runtime.forwarded_lines(ip)

    def data_received(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.transport.write(data)
            return
        if self.tunnel_pending is not None:
            self._after_upgrade(data)
            return
        size = self.head_size
        if size >= 0:
            if size == 0:
                self.head_started = CLOCK.now  # a request head begins
            self.head_size = size + len(data)
        else:
            self.body_seen = CLOCK.now  # body bytes: the client is not stalling
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            # The request asked to switch protocols (or was a CONNECT): the parser
            # stops after its head, and reads no more requests on this connection.
            self.tunnel_pending = b""
            self._after_upgrade(data[exc.args[0] :])
            return
        except HttpParserCallbackError as exc:
            reject = exc.__context__
            if isinstance(reject, _Reject):
                self._refuse(reject.status, reject.error, reject.detail)
                return
            # The callback's exception is the context, not the one being handled.
            log.error(  # noqa: TRY400
                "internal error while parsing a request", exc_info=reject or exc
            )
            self._refuse(500, "internal_error", "the gateway failed to handle the request")
            return
        except HttpParserError as exc:
            self._refuse(400, "bad_request", f"malformed HTTP request: {exc}")
            return
        after = self.head_size
        if after > 0 and after > self.worker.runtime.max_head:
            self._refuse(
                431,
                "headers_too_large",
                f"the request head is larger than {self.worker.runtime.max_head} bytes",
            )
        elif size < 0 and after < 0:
            ex = self.parsing
            if ex is not None and ex.chunked_in:
                self._count_chunked(ex, len(data))

    def _count_chunked(self, ex: Exchange, received: int) -> None:
        """Hold a chunked body's extensions and trailers to their limits: they count
        against ``max_body_bytes`` like the body, and at most 16 KiB of them in all."""
        wire = ex.chunk_wire = ex.chunk_wire + received
        extra = wire - ex.body_size - _CHUNK_FRAMING * ex.chunks
        if extra > _CHUNK_EXTRA_LIMIT:
            self._refuse(
                400,
                "bad_chunk",
                f"the chunk extensions and trailers are over {_CHUNK_EXTRA_LIMIT} bytes;"
                " send the body without them",
            )
            return
        limit = self.worker.runtime.max_body
        if limit is not None and extra > 0 and ex.body_size + extra > limit:
            self._refuse(
                413,
                "body_too_large",
                f"the request body, chunk extensions included, is larger than {limit} bytes",
            )

    def _after_upgrade(self, data: bytes) -> None:
        """Bytes after an Upgrade (or CONNECT) request's head, before any tunnel.

        The body of an upgrade the route does not allow (sent as a plain request) is
        read here, since the parser stopped at the head. Anything else waits for the
        upstream's 101 (it is the tunnel's first bytes), at most
        ``_TUNNEL_PENDING_LIMIT`` of it: then reading pauses until the upstream answers.
        """
        self.body_seen = CLOCK.now
        ex = self.upgrading
        if ex is not None:
            left = ex.raw_body_left
            body = data[:left]
            ex.raw_body_left = left - len(body)
            try:
                ex.on_request_body(body)
            except _Reject as reject:
                self.upgrading = None
                self.parsing = ex  # the request being read, as far as _refuse is concerned
                self._refuse(reject.status, reject.error, reject.detail)
                return
            if not ex.raw_body_left:
                self.upgrading = None
                ex.req_done = True
                # The connection ends with this request: later bytes are not read.
                self.pause_reading_for(_REFUSED)
            return
        pending = self.tunnel_pending
        pending = pending + data if pending else data
        self.tunnel_pending = pending
        if len(pending) > _TUNNEL_PENDING_LIMIT:
            self.pause_reading_for(_TUNNEL_WAIT)

    def eof_received(self) -> bool | None:
        tunnel = self.tunnel
        if tunnel is not None and tunnel.alive and tunnel.transport.can_write_eof():
            tunnel.transport.write_eof()
            return True
        # HTTP clients do not half-close: an EOF means the client went away, and
        # an exchange in flight is aborted (logged as 499), as nginx does.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        worker = self.worker
        worker.connections.discard(self)
        tunnel = self.tunnel
        if tunnel is not None:
            self.tunnel = None
            if tunnel.alive:
                tunnel.transport.close()
            return
        ex = self.current
        if ex is not None and not ex.done:
            conn = ex.conn
            if conn is not None:
                ex.conn = None
                conn.exchange = None
                conn.transport.abort()
            if ex.resp_started:
                ex.aborted = "client_closed"
            ex.status = ex.status or 499  # the client closed the request
            ex.finish()
        self.current = None
        self.pending = None
        worker.connection_closed(self)

    def pause_writing(self) -> None:
        ex = self.current
        if ex is not None and ex.conn is not None:
            ex.conn.pause_reading()
        elif self.tunnel is not None:
            self.tunnel.pause_reading()

    def resume_writing(self) -> None:
        ex = self.current
        if ex is not None and ex.conn is not None:
            ex.conn.resume_reading()
        elif self.tunnel is not None:
            self.tunnel.resume_reading()

    # -- reading flow control

    def pause_reading_for(self, reason: int) -> None:
        if not self.paused:
            self.transport.pause_reading()
        self.paused |= reason

    def resume_reading_for(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and not self.transport.is_closing():
                self.transport.resume_reading()

    # -- httptools callbacks

    # No on_message_begin: llhttp reports a request's target before anything else,
    # so on_url starts the exchange (one parser callback less per request).
    def on_url(self, url: bytes) -> None:
        ex = self.parsing
        if ex is None:
            self.parsing = Exchange(self, self.worker.runtime, url)
            self.headers = []
        else:
            ex.url += url  # the target arrived in pieces

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        """Route the request and pre-build its upstream head (or an error), then
        start it, or queue it behind the response in progress.

        One long function on purpose: this runs for every request, and in
        CPython each call layer costs about as much as a dozen lines of it.
        """
        ex = self.parsing
        rt = self.worker.runtime
        if self.head_size > rt.max_head:
            # The cheap count includes whatever followed the head in the same
            # read; only a head that really is too large is refused.
            size = len(ex.url) if ex is not None else 0
            size += sum(len(n) + len(v) + 4 for n, v in self.headers)
            if size > rt.max_head:
                raise _Reject(
                    431,
                    "headers_too_large",
                    f"the request head is larger than {rt.max_head} bytes",
                )
        self.head_size = -1
        self.body_seen = CLOCK.now
        if ex is None or self.closing:
            # After a request that ends the connection, later pipelined ones are
            # not answered (RFC 9112 section 9.6).
            self.parsing = None
            self.pause_reading_for(_REFUSED)
            return
        ex.t_start = perf_counter()
        ex.headers = headers = self.headers
        parser = self.parser
        method = parser.get_method()
        ex.method = method
        keep_alive = parser.should_keep_alive()
        url = ex.url
        if len(headers) > rt.max_headers or len(url) > rt.max_url:
            if len(headers) > rt.max_headers:
                detail = f"more than {rt.max_headers} headers"
                self._prepare_error(ex, 431, "too_many_headers", detail)
            else:
                detail = f"the request target is longer than {rt.max_url} bytes"
                self._prepare_error(ex, 414, "uri_too_long", detail)
            self._start(ex)
            return

        kinds = rt.req_kinds
        # fwd[0] and fwd[1] are filled last with the request line and Host.
        fwd: list[bytes] = [b"", b""]
        append = fwd.append
        host = b""
        authorization = False
        special: list[tuple[int, bytes]] | None = None
        for name, value in headers:
            lname = name.lower()
            kind = kinds.get(lname)
            if kind is None:
                proxy = lname[:6]
                if proxy not in {b"proxy-", b"proxy_"}:
                    append(name + b": " + value + b"\r\n")
            elif kind == http.HOST:
                if host:
                    # Two Host headers: which one counts is ambiguous (RFC 9112 3.2).
                    self._prepare_error(ex, 400, "bad_host", "more than one Host header")
                    self._start(ex)
                    return
                host = value
            elif kind == http.AUTHORIZATION:
                if authorization:
                    # The gateway would verify one and the upstream might read the
                    # other (nginx refuses these too).
                    self._prepare_error(
                        ex,
                        400,
                        "bad_authorization",
                        "more than one Authorization header; send one credential",
                    )
                    self._start(ex)
                    return
                authorization = True
                append(name + b": " + value + b"\r\n")
            elif special is None:
                special = [(kind, value)]
            else:
                special.append((kind, value))
        # Headers other than Host that the gateway acts on are rare in the bulk
        # of traffic; they get a second, slower pass.
        (
            request_id,
            content_length,
            chunked,
            extra_drop,
            upgrade_value,
            expect,
            has_connection,
            xff,
            xfp,
            xfh,
            forwarded,
            traceparent,
            tracestate,
        ) = _NO_SPECIALS if special is None else _special_headers(special, self.peer_trusted)
        trusted = self.peer_trusted
        ex.upgrade = upgrade = parser.should_upgrade() if upgrade_value else False
        # Without a Connection header, llhttp's keep-alive answer is the version:
        # HTTP/1.1 keeps alive unless told to close, HTTP/1.0 (or 0.9) closes
        # unless told to keep alive. Only otherwise is the (slow, 0.5 us) version
        # string needed.
        if has_connection or not keep_alive:
            version = parser.get_http_version()
            if version not in ("1.1", "1.0"):
                ex.http10 = True
                ex.keep_alive = False
                self._prepare_error(
                    ex,
                    505,
                    "http_version_not_supported",
                    f"HTTP/{version} is not supported; send HTTP/1.1 or HTTP/1.0",
                )
                self._start(ex)
                return
            http10 = version == "1.0"
        else:
            http10 = False
        ex.http10 = http10
        if chunked and http10:
            # Transfer-Encoding in HTTP/1.0 may be a smuggling attempt: the
            # connection closes after this request (RFC 9112 section 6.1).
            keep_alive = False
        ex.keep_alive = keep_alive
        if upgrade or not keep_alive:
            # An upgrade either becomes a tunnel or ends the connection.
            ex.keep_alive = False
            self.closing = True
        if host and host != self.host_cached and host.translate(None, _HOST_CHARS):
            self._prepare_error(ex, 400, "bad_host", "the Host header is not a valid host")
            self._start(ex)
            return
        if not host and not ex.http10:
            self._prepare_error(ex, 400, "missing_host", "an HTTP/1.1 request needs a Host header")
            self._start(ex)
            return
        if request_id and (len(request_id) > 200 or request_id.translate(None, _RID_CHARS)):
            request_id = b""
        if not request_id:
            # Worker.next_request_id, inlined: it runs for nearly every request.
            worker = self.worker
            worker.rid_count = count = worker.rid_count + 1
            request_id = worker.rid_prefix + b"%016x" % count
        ex.request_id = request_id
        if expect:
            if expect.lower() != b"100-continue":
                self._prepare_error(
                    ex, 417, "expectation_failed", "only 'Expect: 100-continue' is supported"
                )
                self._start(ex)
                return
            ex.expect_continue = not ex.http10
        if (
            content_length is not None
            and rt.max_body is not None
            and int(content_length) > rt.max_body
        ):
            detail = f"the request body is larger than {rt.max_body} bytes"
            self._prepare_error(ex, 413, "body_too_large", detail)
            self._start(ex)
            return

        # Route on the normalized path.
        q = url.find(b"?")
        if q >= 0:
            path, query = url[:q], url[q:]
        else:
            path, query = url, b""
        raw_path = path
        if not path.startswith(b"/"):
            if url == b"*" and method == b"OPTIONS":
                path = fwd_path = b"*"
            else:
                self._prepare_error(
                    ex, 400, "bad_target", "the request target must be an absolute path"
                )
                self._start(ex)
                return
        # One regex search (in C) is cheaper than even two bytes.find() calls.
        elif _needs_normalizing(path) is not None:
            try:
                fwd_path, path = normalize_path(path, rt.encoded_slashes)
            except PathError as exc:
                self._prepare_error(ex, 400, "bad_path", str(exc))
                self._start(ex)
                return
        router = rt.router
        route_host = b""
        if router.needs_host and host:
            route_host = host.lower()
            colon = route_host.rfind(b":")
            if colon >= 0 and route_host.find(b"]", colon) < 0:
                route_host = route_host[:colon]
            if route_host.endswith(b"."):
                route_host = route_host[:-1]  # "example.com." is "example.com"
        found = router.match(method, path, route_host, headers)
        if found is None:
            self._prepare_error(
                ex,
                404,
                "no_route",
                f"no route matches {method.decode()} {path.decode('latin-1')}",
            )
            self._start(ex)
            return
        matched, groups = found
        route: CompiledRoute = matched.target  # type: ignore[assignment]
        ex.route = route
        tracer = rt.tracer
        # Every routed exchange has its trace context (finish() may record it).
        trace_line = (
            tracer.begin(ex, traceparent, tracestate, route.trace_ratio)
            if tracer is not None
            else b""
        )
        # TRACE echoes the request, credentials included (cross-site tracing);
        # CONNECT would make the gateway a tunnel to anywhere.
        if method in {b"TRACE", b"CONNECT"} and (method == b"CONNECT" or matched.methods is None):
            if method == b"CONNECT":
                ex.keep_alive = False  # the parser reads no request after it
            self._prepare_error(
                ex,
                405,
                "method_not_allowed",
                f"{method.decode()} is not allowed here"
                + ("" if method == b"CONNECT" else "; a route must list it in match.methods"),
                headers=_ALLOW_DEFAULT,
            )
            self._start(ex)
            return
        if upgrade:
            # Only the protocols the route allows are tunnelled; any other upgrade
            # (h2c above all) goes on as a plain request without its Upgrade.
            allowed = route.upgrades
            wanted = [
                token
                for raw in upgrade_value.split(b",")
                if (token := raw.strip()) and token.lower() in allowed
            ]
            if wanted:
                if chunked or (content_length is not None and content_length != b"0"):
                    self._prepare_error(
                        ex,
                        400,
                        "bad_upgrade",
                        "an Upgrade request cannot carry a body; send it without one",
                    )
                    self._start(ex)
                    return
                upgrade_value = b", ".join(wanted)
                ex.upgrade_to = frozenset(token.lower() for token in wanted)
            else:
                ex.upgrade = upgrade = False
                if chunked:
                    # The parser stops at the head of an upgrade request; a chunked
                    # body after it cannot be read safely.
                    self._prepare_error(
                        ex,
                        400,
                        "bad_upgrade",
                        "this route does not allow Upgrade: "
                        + upgrade_value.decode("latin-1")
                        + "; send the request without Upgrade, or with Content-Length",
                    )
                    self._start(ex)
                    return
                if content_length is not None and content_length != b"0":
                    ex.raw_body_left = int(content_length)
                    self.upgrading = ex
        if route.rewrites:
            target = matched.upstream_path(path, groups) + query
        elif path is raw_path:
            target = url  # forwarded exactly as received
        else:
            target = fwd_path + query

        if extra_drop:
            fwd[2:] = [f for f in fwd[2:] if f.split(b":", 1)[0].lower() not in extra_drop]
        if ex.upgrade and upgrade_value:
            fwd.append(b"Connection: Upgrade\r\nUpgrade: " + upgrade_value + b"\r\n")
        if content_length is not None:
            fwd.append(b"Content-Length: " + content_length + b"\r\n")
        elif chunked:
            fwd.append(b"Transfer-Encoding: " + chunked + b"\r\n")
        if chunked:
            ex.chunked_in = True
        if chunked or (content_length is not None and content_length != b"0"):
            ex.has_body = True
        retry = route.retry
        if (
            retry is not None
            and (chunked or content_length)
            and (content_length is None or int(content_length) <= retry.buffer)
        ):
            ex.replay = []  # keep the body while it fits, to send it again on a retry

        # X-Forwarded-* and Forwarded: kept and extended from a trusted peer,
        # replaced from anyone else.
        if trusted and (xff or forwarded or xfp or xfh):
            fwd.append(rt.forwarded_trusted(self.peer_ip, xff, xfp, xfh, forwarded, host))
        elif host:
            if host != self.host_cached:
                # Most connections send one Host throughout: build its lines once.
                xf_start, fwd_start, _ = self.fwd
                self.host_cached = host
                self.host_fwd = xf_start + host + fwd_start + host + b'"\r\n'
                self.host_line = b"Host: " + host + b"\r\n"
            fwd.append(self.host_fwd)
        else:
            fwd.append(self.fwd[2])
        if trace_line:
            fwd.append(trace_line)
        fwd += (
            rt.via_req_10 if ex.http10 else rt.via_req_11,
            rt.rid_prefix,
            request_id,
            b"\r\n\r\n",
        )
        fwd[0] = method + b" " + target + b" HTTP/1.1\r\n"
        if route.host_line is not None:
            fwd[1] = route.host_line
        elif route.preserve_host and host:
            if host != self.host_cached:
                self.host_cached = host
                xf_start, fwd_start, _ = self.fwd
                self.host_fwd = xf_start + host + fwd_start + host + b'"\r\n'
                self.host_line = b"Host: " + host + b"\r\n"
            fwd[1] = self.host_line
        if fwd[1]:
            ex.head = b"".join(fwd)
        else:
            # The endpoint's address, known once a connection is chosen.
            ex.head = (fwd[0], b"".join(fwd[2:]))
        if self.current is None and not ex.expect_continue and route.chain is None:
            self.current = ex
            route.upstream.acquire(ex)
        else:
            self._start(ex)

    def _start(self, ex: Exchange) -> None:
        """Run ``ex`` now if the connection is free, else queue it (pipelining)."""
        if self.current is None:
            self.current = ex
            ex.dispatch()
        else:
            pending = self.pending
            if pending is None:
                pending = self.pending = deque()
            pending.append(ex)
            self.pause_reading_for(_PIPELINE)

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        if ex is not None:
            ex.on_request_body(body)

    def on_chunk_header(self) -> None:
        ex = self.parsing
        if ex is not None:
            ex.chunks += 1

    def on_message_complete(self) -> None:
        ex = self.parsing
        self.parsing = None
        self.head_size = 0
        if ex is not None:
            if self.upgrading is ex:
                # An upgrade sent on as a plain request: the parser skipped its body,
                # which is read in _after_upgrade.
                self.head_size = -1  # a body is arriving (for the slow-body sweep)
                return
            ex.req_done = True
            if ex.chunked_in:
                conn = ex.conn
                if conn is not None and not ex.done:
                    conn.transport.write(_LAST_CHUNK)

    # -- request preparation: everything between the parsed head and dispatch

    def _prepare_error(
        self, ex: Exchange, status: int, error: str, detail: str, *, headers: bytes = b""
    ) -> None:
        if not ex.request_id:
            ex.request_id = self.worker.next_request_id()
        ex.status = status
        # A refused request may still have a body on the wire; only a request
        # without one leaves the connection in a known state.
        close = status in (400, 408, 413, 414, 431, 505) or not ex.keep_alive
        if close:
            ex.keep_alive = False
            self.closing = True
        ex.error_bytes = error_response(
            status,
            error,
            detail,
            request_id=ex.request_id,
            request_id_header=ex.rt.rid_name,
            close=close,
            extra_headers=headers,
            instance=ex.url,
        )

    def _refuse(self, status: int, error: str, detail: str) -> None:
        """Refuse the request being read: answer in turn, then close the connection."""
        if self.lingering:
            return  # a response closed the connection already: nothing more is sent
        ex = self.parsing
        if ex is None and self.closing:
            # What follows a request that ends the connection is not answered.
            self.pause_reading_for(_REFUSED)
            if self.current is None:
                self.linger()
            return
        self.closing = True
        self.pause_reading_for(_REFUSED)
        self.parsing = None
        if ex is not None and ex.done:
            # Already answered (by a filter, or an early error): nothing more to say,
            # but the connection ends.
            if self.current is None:
                self.linger()
            return
        if ex is not None and ex.t_start:
            if ex is self.current:
                # Its head was fine and it was dispatched; its body was not.
                ex.keep_alive = False
                ex.fail(status, error, detail)
                return
            # Queued behind another response: answer with the error in its turn.
            ex.route = None
            self._prepare_error(ex, status, error, detail)
            return
        ex = Exchange(self, self.worker.runtime)
        ex.t_start = perf_counter()
        self._prepare_error(ex, status, error, detail)
        if self.current is None:
            self.current = ex
            ex.dispatch()
        else:
            if self.pending is None:
                self.pending = deque()
            self.pending.append(ex)

    # -- between exchanges

    def linger(self) -> None:
        """Close once the answer is out, reading what the client still sends meanwhile.

        The client may still be sending: closing now would make the kernel reset the
        connection, and the answer could be lost unread. Started on the next loop turn,
        outside the parser's callbacks (the parser may be mid-read).
        """
        if not self.lingering:
            self.lingering = True
            self.pause_reading_for(_REFUSED)
            asyncio.get_running_loop().call_soon(_Lingering.start, self)

    def exchange_done(self, ex: Exchange) -> None:
        if ex is not self.current:
            return
        self.current = None
        transport = self.transport
        if self.tunnel is not None:
            return
        if not ex.keep_alive or (self.closing and not self.pending):
            if ex.req_done and not self.paused & _REFUSED and self.head_size <= 0:
                transport.close()
            else:
                self.linger()
            return
        pending = self.pending
        if pending:
            nxt = pending.popleft()
            self.current = nxt
            if not pending:
                self.resume_reading_for(_PIPELINE)
            nxt.dispatch()
            return
        self.idle_since = CLOCK.now
        if self.worker.draining:
            transport.close()

    def expire(self, now: float, rt: Runtime) -> None:
        """Close the connection if it idled, or sent its head or body too slowly (sweep)."""
        if self.tunnel is not None:
            return
        ex = self.parsing
        if ex is None and self.upgrading is not None:
            ex = self.parsing = self.upgrading  # its body is read past the parser
        if (
            ex is not None
            and self.head_size < 0
            and not self.paused  # not waiting for the client while we hold it back
            and now - self.body_seen > rt.body_timeout + 0.1
        ):
            self.upgrading = None
            self._refuse(408, "request_timeout", "the request body stopped arriving")
            return
        if self.parsing is self.upgrading:
            self.parsing = None
        if self.current is not None:
            return
        if self.head_size > 0:
            if now - self.head_started > rt.header_timeout + 0.1:
                self._refuse(408, "request_timeout", "the request head took too long to arrive")
        elif now - self.idle_since > rt.keepalive_timeout + 0.1:
            self.transport.close()
