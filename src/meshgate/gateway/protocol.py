"""The client side of the data plane: a raw asyncio protocol per client connection.

A :class:`ClientConnection` parses requests with httptools (validating what the
parser lets through: Host, versions, limits, paths, upgrades), routes each one, and
builds its upstream head; each request becomes an
:class:`~meshgate.gateway.exchange.Exchange`, given an upstream connection from the
pool and streamed both ways with backpressure. Requests pipelined on one connection
are answered strictly in order: later ones are parsed and queued (reading paused)
until the earlier response is complete.

Everything that can be computed when the configuration is compiled lives on the
:class:`~meshgate.gateway.runtime.Runtime`; the code here joins pre-encoded bytes.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from time import perf_counter
from typing import TYPE_CHECKING

from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade, HttpRequestParser

from meshgate.gateway import http
from meshgate.gateway.addresses import canonical_ip
from meshgate.gateway.clock import CLOCK
from meshgate.gateway.exchange import Exchange, Reject
from meshgate.gateway.flow import BODY_BUFFER, PIPELINE, REFUSED, TUNNEL_WAIT, UPSTREAM_FULL
from meshgate.gateway.http import LAST_CHUNK, error_response
from meshgate.routing import PathError, normalize_path

if TYPE_CHECKING:
    from meshgate.gateway.proxy import UpstreamConnection
    from meshgate.gateway.runtime import CompiledRoute, Runtime
    from meshgate.gateway.worker import Worker

__all__ = [
    "BODY_BUFFER",
    "PIPELINE",
    "REFUSED",
    "TUNNEL_WAIT",
    "UPSTREAM_FULL",
    "ClientConnection",
    "SpecialHeaders",
]

log = logging.getLogger("meshgate.gateway")

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
_NO_HEADERS: list[tuple[bytes, bytes]] = []
"""What a connection between requests holds as its headers: shared, never appended to
(a request's list is made when its target arrives)."""
# A path with any of these is normalized before routing (see meshgate/routing/paths.py).
_needs_normalizing = re.compile(rb"[%;\\]|/[./]").search


def _connection_tokens(value: bytes, extra: set[bytes] | None) -> set[bytes] | None:
    """Header names listed in Connection (other than close/keep-alive/upgrade) to drop."""
    for raw in value.lower().split(b","):
        token = raw.strip()
        if token and token not in (b"close", b"keep-alive", b"upgrade"):
            if extra is None:
                extra = set()
            extra.add(token)
    return extra


class SpecialHeaders:
    """The request headers the gateway acts on (other than Host and Authorization),
    read in one pass; hop-by-hop headers, and forwarding headers from an untrusted
    peer, are not kept: dropped."""

    __slots__ = (
        "chunked",
        "content_length",
        "drop",
        "expect",
        "forwarded",
        "has_connection",
        "request_id",
        "traceparent",
        "tracestate",
        "upgrade",
        "xff",
        "xfh",
        "xfp",
    )

    def __init__(self) -> None:
        self.request_id = b""
        self.content_length: bytes | None = None
        self.chunked = b""  # the Transfer-Encoding value, codings before "chunked" kept
        self.drop: set[bytes] | None = None  # names listed in Connection
        self.upgrade = b""
        self.expect = b""
        self.has_connection = False
        # From a trusted peer only:
        self.xff = b""
        self.xfp = b""
        self.xfh = b""
        self.forwarded = b""
        # While tracing is on only (else these are forwarded as they are):
        self.traceparent = b""
        self.tracestate = b""


_NO_SPECIALS = SpecialHeaders()
"""The common case, shared: a request with none of them (never written to)."""


def _special_headers(items: list[tuple[int, bytes]], trusted: bool) -> SpecialHeaders:
    """Read the special headers of a request (``items``: kind and value)."""
    out = SpecialHeaders()
    for kind, value in items:
        if kind == http.TRACEPARENT:
            # Two traceparents are invalid (W3C trace context 3.2): a new trace.
            out.traceparent = b"-" if out.traceparent else value
        elif kind == http.TRACESTATE:
            out.tracestate = out.tracestate + b"," + value if out.tracestate else value
        elif kind == http.REQUEST_ID:
            out.request_id = value
        elif kind == http.CONTENT_LENGTH:
            out.content_length = value
        elif kind == http.TRANSFER_ENCODING:
            # Forwarded whole: codings before "chunked" (gzip, ...) stay with the body.
            out.chunked = out.chunked + b", " + value if out.chunked else value
        elif kind == http.CONNECTION:
            out.has_connection = True
            out.drop = _connection_tokens(value, out.drop)
        elif kind == http.UPGRADE:
            out.upgrade = value
        elif kind == http.EXPECT:
            out.expect = value
        elif trusted:
            if kind == http.X_FORWARDED_FOR:
                out.xff = out.xff + b", " + value if out.xff else value
            elif kind == http.X_FORWARDED_PROTO:
                out.xfp = value
            elif kind == http.X_FORWARDED_HOST:
                out.xfh = value
            elif kind == http.FORWARDED:
                out.forwarded = out.forwarded + b", " + value if out.forwarded else value
    return out


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
        self.headers: list[tuple[bytes, bytes]] = _NO_HEADERS
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
        rt = worker.runtime
        # One string, and one set of forwarding lines, per client address: an idle
        # connection holds pointers, not copies.
        self.peer_ip = ip = rt.intern_ip(ip)
        self.peer_trusted = rt.is_trusted(ip)
        self.peer_cert = bool(transport.get_extra_info("peercert"))
        self.idle_since = CLOCK.now
        self.fwd = rt.forwarded_lines(ip)

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
            if isinstance(reject, Reject):
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
            except Reject as reject:
                self.upgrading = None
                self.parsing = ex  # the request being read, as far as _refuse is concerned
                self._refuse(reject.status, reject.error, reject.detail)
                return
            if not ex.raw_body_left:
                self.upgrading = None
                ex.req_done = True
                # The connection ends with this request: later bytes are not read.
                self.pause_reading_for(REFUSED)
            return
        pending = self.tunnel_pending
        pending = pending + data if pending else data
        self.tunnel_pending = pending
        if len(pending) > _TUNNEL_PENDING_LIMIT:
            self.pause_reading_for(TUNNEL_WAIT)

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
                raise Reject(
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
            self.pause_reading_for(REFUSED)
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
        sp = _NO_SPECIALS if special is None else _special_headers(special, self.peer_trusted)
        request_id = sp.request_id
        content_length = sp.content_length
        chunked = sp.chunked
        upgrade_value = sp.upgrade
        trusted = self.peer_trusted
        ex.upgrade = upgrade = parser.should_upgrade() if upgrade_value else False
        # Without a Connection header, llhttp's keep-alive answer is the version:
        # HTTP/1.1 keeps alive unless told to close, HTTP/1.0 (or 0.9) closes
        # unless told to keep alive. Only otherwise is the (slow, 0.5 us) version
        # string needed.
        if sp.has_connection or not keep_alive:
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
        expect = sp.expect
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
            tracer.begin(ex, sp.traceparent, sp.tracestate, route.trace_ratio)
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

        extra_drop = sp.drop
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
        if trusted and (sp.xff or sp.forwarded or sp.xfp or sp.xfh):
            fwd.append(
                rt.forwarded_trusted(self.peer_ip, sp.xff, sp.xfp, sp.xfh, sp.forwarded, host)
            )
        elif host:
            if host != self.host_cached:
                # Most connections send one Host throughout: its lines are built once
                # (and shared by the connections of one client address).
                self.host_cached, self.host_fwd, self.host_line = rt.host_lines(
                    self.peer_ip, self.fwd, host
                )
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
                self.host_cached, self.host_fwd, self.host_line = rt.host_lines(
                    self.peer_ip, self.fwd, host
                )
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
            self.pause_reading_for(PIPELINE)

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
        # The exchange keeps its headers; an idle connection keeps none (on_url makes
        # the next request's list).
        self.headers = _NO_HEADERS
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
                    conn.transport.write(LAST_CHUNK)

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
            self.pause_reading_for(REFUSED)
            if self.current is None:
                self.linger()
            return
        self.closing = True
        self.pause_reading_for(REFUSED)
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
            self.pause_reading_for(REFUSED)
            asyncio.get_running_loop().call_soon(_Lingering.start, self)

    def exchange_done(self, ex: Exchange) -> None:
        if ex is not self.current:
            return
        self.current = None
        transport = self.transport
        if self.tunnel is not None:
            return
        if not ex.keep_alive or (self.closing and not self.pending):
            if ex.req_done and not self.paused & REFUSED and self.head_size <= 0:
                transport.close()
            else:
                self.linger()
            return
        pending = self.pending
        if pending:
            nxt = pending.popleft()
            self.current = nxt
            if not pending:
                self.resume_reading_for(PIPELINE)
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
