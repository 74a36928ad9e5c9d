"""The upstream side of the data plane: the connection to an endpoint, and what an
exchange does with it (send the request, relay the response, tunnel after a 101).

An :class:`UpstreamConnection` parses one response at a time with httptools and hands
it to the exchange attached to it through a small set of callbacks:
``on_upstream_head``, ``on_upstream_body``, ``on_upstream_end``, ``on_upstream_lost``,
``on_upstream_upgrade`` and ``on_upstream_error``: the half of
:class:`~meshgate.gateway.exchange.Exchange` that is written here, as functions its
class body takes as methods. A connection goes back to its endpoint's pool only once
the read that ended its response has been parsed, and only if nothing followed the
response in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from time import perf_counter
from typing import TYPE_CHECKING

from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserUpgrade,
    HttpResponseParser,
)

from meshgate.gateway import http
from meshgate.gateway.clock import CLOCK
from meshgate.gateway.flow import BODY_BUFFER, TUNNEL_WAIT, UPSTREAM_FULL
from meshgate.gateway.http import CHUNK_END, IDEMPOTENT_METHODS, LAST_CHUNK, status_line

if TYPE_CHECKING:
    from meshgate.gateway.exchange import Exchange
    from meshgate.gateway.upstream.pool import Endpoint, Upstream

__all__ = ["UpstreamConnection"]

log = logging.getLogger("meshgate.gateway.upstream")

_MAX_HEAD = 64 * 1024  # an upstream's response head larger than this is refused


class _Leftover(Exception):  # noqa: N818 - internal control flow, never escapes
    """Raised inside the parser: bytes follow a complete response in the same read."""


# ---------------------------------------------------------------------------- the
# exchange's upstream side: methods of Exchange (assigned in its class body, so that
# calling them costs no more than any method), written here beside the connection
# that calls them.


def attach(self: Exchange, conn: UpstreamConnection, reused: bool) -> None:
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
                    parts += (b"%x\r\n" % len(chunk), chunk, CHUNK_END)
            else:
                parts += buffered
        if self.req_done and self.chunked_in:
            parts.append(LAST_CHUNK)
        transport.writelines(parts)
        self.client.resume_reading_for(BODY_BUFFER)
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


# -- response side --------------------------------------------------------


def on_upstream_head(self: Exchange, conn: UpstreamConnection, status: int, block: bytes) -> None:
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
        block = b"".join((headers, self.resp_extra, self.set_cookie, rt.via_resp, rt.rid_prefix))
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


def on_upstream_body(self: Exchange, body: bytes) -> None:
    if self.done:
        return
    self.resp_bytes += len(body)
    out = self.out
    if out is not None:
        if self.chunk_out:
            out += (b"%x\r\n" % len(body), body, CHUNK_END)
        else:
            out.append(body)
    elif self.chunk_out:
        self.client.transport.writelines((b"%x\r\n" % len(body), body, CHUNK_END))
    else:
        self.client.transport.write(body)


def flush(self: Exchange) -> None:
    """Write the response bytes held back during one read from the upstream."""
    out = self.out
    if out is not None:
        self.out = None
        self.client.transport.writelines(out)


def on_upstream_end(self: Exchange, conn: UpstreamConnection) -> None:
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
            out.append(LAST_CHUNK)
        else:
            self.client.transport.write(LAST_CHUNK)
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


def on_upstream_upgrade(self: Exchange, conn: UpstreamConnection, rest: bytes) -> None:
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
    client.resume_reading_for(TUNNEL_WAIT)
    self.keep_alive = False
    self.finish()


def on_upstream_lost(self: Exchange, conn: UpstreamConnection, exc: Exception | None) -> None:
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
            self.client.transport.write(LAST_CHUNK)
        self.t_up_end = perf_counter()
        self.finish()
        return
    self._leave_endpoint(failed=conn.endpoint)
    self._abort_client("the upstream closed the connection mid-response")


def on_upstream_error(self: Exchange, conn: UpstreamConnection, detail: str) -> None:
    self.conn = None
    if self.done:
        return
    self._leave_endpoint(failed=conn.endpoint)
    if self.resp_started:
        self._abort_client(detail)
    else:
        self.fail(502, "upstream_invalid_response", detail)


def _retry_stale(self: Exchange, conn: UpstreamConnection) -> bool:
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


class UpstreamConnection(asyncio.Protocol):
    """A connection to one endpoint; carries one exchange at a time."""

    __slots__ = (
        "alive",
        "endpoint",
        "exchange",
        "head_buf",
        "idle_since",
        "in_head",
        "parser",
        "paused",
        "requests",
        "reusable",
        "spill",
        "transport",
        "tunnel",
        "upstream",
    )

    def __init__(self, upstream: Upstream, endpoint: Endpoint) -> None:
        self.upstream = upstream
        self.endpoint = endpoint
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        # No on_header callback: a callback per header costs more than the rest of
        # the response's handling; the raw head is read from head_buf instead.
        self.parser = HttpResponseParser(self)
        self.exchange: Exchange | None = None
        # The response head as it arrives; the parser validates it, and the raw
        # bytes are forwarded from here rather than rebuilt header by header.
        self.head_buf = b""
        self.in_head = True
        self.alive = False
        self.paused = False
        self.requests = 0
        self.idle_since = 0.0
        # A response ended in the read being parsed and the connection may carry the
        # next request: it goes back to the pool once the whole read is parsed, and
        # only if nothing followed the response in it.
        self.reusable = False
        # Bytes followed the last response head in its read (a HEAD response has none).
        self.spill = False
        # The client transport while tunnelling (after 101 Switching Protocols).
        self.tunnel: asyncio.Transport | None = None

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.alive = True

    def data_received(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.write(data)
            return
        ex = self.exchange
        if ex is None:
            # An idle connection must stay silent; anything it says is a protocol
            # error, and the connection cannot be trusted for the next request.
            self.discard()
            return
        ex.last_io = CLOCK.now
        if self.in_head:
            buf = self.head_buf = self.head_buf + data if self.head_buf else data
            if len(buf) > _MAX_HEAD and buf.find(b"\r\n\r\n", 0, _MAX_HEAD) < 0:
                self.transport.abort()
                self.exchange = None
                detail = f"the upstream's response head is over {_MAX_HEAD} bytes"
                ex.on_upstream_error(self, detail)
                return
        try:
            self.parser.feed_data(data)
            if ex.out is not None:
                ex.flush()
            if self.reusable:
                # Upstream.release's common case, inlined: back to the idle stack.
                self.reusable = False
                upstream = self.upstream
                if upstream.waiters:
                    upstream.release(self, True)
                else:
                    if self.paused:
                        self.resume_reading()
                    self.idle_since = CLOCK.now
                    self.endpoint.idle.append(self)
        except HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _Leftover):
                self.reusable = False
                self.discard()
                return
            self._invalid(exc)
        except HttpParserUpgrade as exc:
            rest = data[exc.args[0] :]
            current = self.exchange
            if current is not None:
                current.on_upstream_upgrade(self, rest)
            elif self.tunnel is not None and rest:
                self.tunnel.write(rest)
        except HttpParserError as exc:
            self._invalid(exc)

    def _invalid(self, exc: Exception) -> None:
        current = self.exchange
        self.reusable = False
        self.transport.abort()
        if current is not None:
            self.exchange = None
            current.on_upstream_error(self, f"invalid response from upstream: {exc}")

    def discard(self) -> None:
        """Close the connection for bytes no request asked for (counted)."""
        self.endpoint.discarded += 1
        log.warning(
            "closed a connection to %s: it sent bytes no request asked for", self.endpoint.label
        )
        self.transport.abort()

    def on_message_begin(self) -> None:
        if self.reusable:
            # A second response right after the one just delivered: the upstream read
            # something as a request that the gateway did not send as one.
            raise _Leftover

    def eof_received(self) -> bool | None:
        if self.tunnel is not None:
            self.tunnel.write_eof() if self.tunnel.can_write_eof() else self.tunnel.close()
            return True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        upstream = self.upstream
        self.endpoint.open -= 1
        ex = self.exchange
        if ex is not None:
            self.exchange = None
            ex.on_upstream_lost(self, exc)
        elif self.tunnel is not None:
            self.tunnel.close()
        else:
            with contextlib.suppress(ValueError):
                self.endpoint.idle.remove(self)
        upstream.slot_freed()

    def pause_writing(self) -> None:
        ex = self.exchange
        if ex is not None:
            ex.client.pause_reading_for(UPSTREAM_FULL)
        elif self.tunnel is not None:
            self.tunnel.pause_reading()

    def resume_writing(self) -> None:
        ex = self.exchange
        if ex is not None:
            ex.client.resume_reading_for(UPSTREAM_FULL)
        elif self.tunnel is not None:
            self.tunnel.resume_reading()

    # -- httptools callbacks

    def on_headers_complete(self) -> None:
        buf = self.head_buf
        end = buf.find(b"\r\n\r\n")
        block = buf[buf.find(b"\r\n") + 2 : end]
        status = self.parser.get_status_code()

        if status < 200 and status != 101:
            self.head_buf = buf[end + 4 :]  # the final response's head may follow
        else:
            self.head_buf = b""
            self.in_head = False
            self.spill = len(buf) > end + 4
        ex = self.exchange
        if ex is not None:
            ex.on_upstream_head(self, status, block)

    def on_body(self, body: bytes) -> None:
        ex = self.exchange
        if ex is not None:
            out = ex.out
            if out is not None and not ex.chunk_out:
                # Exchange.on_upstream_body's common case, inlined.
                ex.resp_bytes += len(body)
                out.append(body)
            else:
                ex.on_upstream_body(body)

    def on_message_complete(self) -> None:
        if not self.in_head:
            self.in_head = True
        ex = self.exchange
        if ex is not None:
            ex.on_upstream_end(self)

    # -- flow control, driven by the client side

    def pause_reading(self) -> None:
        if not self.paused and self.alive:
            self.paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.paused and self.alive:
            self.paused = False
            self.transport.resume_reading()

    def reset_parser(self) -> None:
        """Start a fresh parser: after a response whose end the parser cannot see (HEAD)."""
        self.parser = HttpResponseParser(self)
        self.head_buf = b""
        self.in_head = True
