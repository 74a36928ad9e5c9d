"""Upstream connection pools: keep-alive reuse, a connection limit, and the
protocol that parses an upstream's responses.

One :class:`Upstream` per configured upstream and worker. Each endpoint keeps a
LIFO stack of idle connections (the warmest first, so that idle ones age out);
the upstream caps how many connections are open at once and queues requests
past the cap until one frees up or the connect timeout passes (503).

Exchanges (:mod:`meshgate.gateway.server`) talk to a connection through a small
set of callbacks: ``attach``, ``on_upstream_head``, ``on_upstream_body``,
``on_upstream_end``, ``on_upstream_lost``, ``on_upstream_upgrade`` and ``fail``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserUpgrade,
    HttpResponseParser,
)

from meshgate.config.model import UpstreamSettings
from meshgate.gateway.clock import CLOCK
from meshgate.gateway.tls import upstream_context
from meshgate.gateway.upstream.balancer import BALANCERS
from meshgate.gateway.upstream.health import CircuitBreaker, OutlierDetector, RetryBudget

if TYPE_CHECKING:
    from meshgate.gateway.server import Exchange

__all__ = ["Endpoint", "Notify", "Upstream", "UpstreamConnection"]


class _Leftover(Exception):  # noqa: N818 - internal control flow, never escapes
    """Raised inside the parser: bytes follow a complete response in the same read."""


def endpoint_label(host: str, port: int) -> str:
    """``host:port`` (``[v6]:port`` for an IPv6 address): how endpoints are named."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


Notify = Callable[[str, str, str, float], None]
"""(event, upstream, endpoint label, value): e.g. ("ejected", "users", "10.0.0.5:80", until)."""

log = logging.getLogger("meshgate.gateway.upstream")

_MAX_HEAD = 64 * 1024  # an upstream's response head larger than this is refused
_FORGIVE_AFTER = 10.0  # seconds without failure after which an endpoint's count resets
_STALE_AFTER = 1.0  # seconds without a latency sample after which an EWMA is refreshed


class Endpoint:
    """One address of an upstream: its idle connections, load and health.

    ``available`` is kept up to date by :meth:`refresh` whenever one of the things
    that decide it changes, so that the hot path reads one attribute.
    """

    __slots__ = (
        "address",
        "available",
        "clean_since",
        "discarded",
        "drained",
        "ejected_until",
        "ejections",
        "ewma",
        "ewma_seen",
        "failures",
        "healthy",
        "host",
        "host_line",
        "idle",
        "inflight",
        "label",
        "last_failure",
        "open",
        "port",
        "remote_until",
        "upstream",
        "weight",
    )

    def __init__(self, host: str, port: int, weight: int = 1) -> None:
        self.host = host
        self.port = port
        self.weight = weight
        self.label = endpoint_label(host, port)
        self.address = (host, port)
        self.host_line = b"Host: " + self.label.encode() + b"\r\n"
        self.idle: list[UpstreamConnection] = []
        self.open = 0
        self.upstream: Upstream | None = None
        # Load: requests in flight and an EWMA of response time (seconds), the
        # least-request balancer's inputs. A new endpoint starts at 0: optimistic,
        # so that it is tried (and measured) rather than ignored.
        self.inflight = 0
        self.ewma = 0.0
        # The EWMA as the sweep last saw it, and since when (to find stale ones).
        self.ewma_seen = (0.0, 0.0)
        # Health: passive (consecutive failures, ejection), active (probes, via the
        # supervisor), out elsewhere (ejected by another worker or gateway node, until
        # a monotonic time), and drained by an operator.
        self.failures = 0
        self.last_failure = 0.0
        self.ejected_until = 0.0
        self.ejections = 0
        self.clean_since = 0.0
        self.healthy = True
        self.remote_until = 0.0
        self.drained = False
        self.available = True
        # Connections closed rather than reused because the upstream sent bytes no
        # request asked for: a framing disagreement, which could hand one client's
        # response to another (response queue poisoning).
        self.discarded = 0

    def refresh(self) -> None:
        """Recompute :attr:`available` after a health or drain change."""
        self.available = (
            self.healthy and not self.drained and not self.remote_until and not self.ejected_until
        )

    def state(self) -> dict[str, Any]:
        """What the admin API shows for this endpoint."""
        return {
            "available": self.available,
            "healthy": self.healthy,
            "drained": self.drained,
            "ejected": bool(self.ejected_until),
            "ejections": self.ejections,
            "down_elsewhere": bool(self.remote_until),
            "inflight": self.inflight,
            "ewma_ms": round(self.ewma * 1000, 3),
            "open": self.open,
            "idle": len(self.idle),
            "discarded": self.discarded,
        }

    def __repr__(self) -> str:
        return f"Endpoint({self.label})"


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
            ex.client.pause_reading_for(2)
        elif self.tunnel is not None:
            self.tunnel.pause_reading()

    def resume_writing(self) -> None:
        ex = self.exchange
        if ex is not None:
            ex.client.resume_reading_for(2)
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


class Upstream:
    """The runtime side of one configured upstream in one worker."""

    __slots__ = (
        "available",
        "balancer",
        "breaker",
        "budget",
        "endpoints",
        "idle_timeout",
        "loop",
        "max_connections",
        "name",
        "name_bytes",
        "notify",
        "outlier",
        "sent",
        "server_name",
        "settings",
        "single",
        "ssl",
        "tasks",
        "waiters",
    )

    def __init__(
        self,
        name: str,
        settings: UpstreamSettings,
        endpoints: Sequence[Endpoint] | None = None,
        notify: Notify | None = None,
    ) -> None:
        self.name = name
        # Tells the supervisor about local health events (ejections), so that other
        # workers and gateway nodes can act on them.
        self.notify = notify
        self.name_bytes = name.encode()
        self.settings = settings
        self.endpoints: tuple[Endpoint, ...] = tuple(
            endpoints
            if endpoints is not None
            else [Endpoint(e.address.host, e.address.port, e.weight) for e in settings.endpoints]
        )
        for endpoint in self.endpoints:
            # Idle connections now belong to this upstream (they may come from the
            # previous configuration's); busy ones return to their endpoint's pool.
            for conn in endpoint.idle:
                conn.upstream = self
        for endpoint in self.endpoints:
            endpoint.upstream = self
        self.balancer = BALANCERS[settings.balancer](settings, self.endpoints)
        # With one endpoint there is nothing to balance.
        self.single = self.endpoints[0] if len(self.endpoints) == 1 else None
        self.available: tuple[Endpoint, ...] = ()
        health = settings.health
        self.outlier = (
            OutlierDetector(health.passive, self.endpoints, self.health_changed)
            if health.passive is not None and len(self.endpoints) > 1
            else None
        )
        breaker = settings.circuit_breaker
        self.breaker = CircuitBreaker(breaker) if breaker is not None else None
        self.budget = RetryBudget(settings.retries.budget)
        tls = settings.tls
        self.ssl = upstream_context(tls, f"upstreams.{name}.tls") if tls is not None else None
        self.server_name = tls.server_name if tls is not None else None
        self.sent = 0  # requests sent since the last sweep (for the retry budget)
        self.health_changed()
        self.max_connections = settings.max_connections
        self.idle_timeout = settings.idle_timeout
        self.waiters: deque[Exchange] = deque()
        # Connect tasks in flight (the loop keeps only weak references to tasks).
        self.tasks: set[asyncio.Task[None]] = set()
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def open(self) -> int:
        """Connections open to this upstream (its endpoints' counts: endpoints and
        their pools can outlive an Upstream across reloads)."""
        return sum(e.open for e in self.endpoints)

    def health_changed(self) -> None:
        """An endpoint's availability changed: rebuild the candidates balancers see."""
        self.available = tuple(e for e in self.endpoints if e.available)

    def unavailable(self) -> str:
        """Why no endpoint can take a request (the detail of a 503)."""
        service = self.settings.service
        if service is not None and not self.endpoints:
            return f"no instance of service {service!r} is registered"
        return f"no endpoint of upstream {self.name!r} is available"

    def set_endpoints(self, specs: Sequence[tuple[str, int, int]]) -> list[Endpoint]:
        """Serve from the endpoints ``specs`` ((host, port, weight) each) from now on,
        keeping those that stay with their pools, load and health; return those that
        went, whose requests in flight finish (their connections close after)."""
        current = {e.label: e for e in self.endpoints}
        endpoints = []
        for host, port, weight in specs:
            endpoint = current.pop(endpoint_label(host, port), None)
            if endpoint is None:
                endpoint = Endpoint(host, port, weight)
            endpoint.weight = weight
            endpoint.upstream = self
            endpoints.append(endpoint)
        self.endpoints = tuple(endpoints)
        settings = self.settings
        self.balancer = BALANCERS[settings.balancer](settings, self.endpoints)
        self.single = self.endpoints[0] if len(self.endpoints) == 1 else None
        passive = settings.health.passive
        self.outlier = (
            OutlierDetector(passive, self.endpoints, self.health_changed)
            if passive is not None and len(self.endpoints) > 1
            else None
        )
        self.health_changed()
        gone = list(current.values())
        for endpoint in gone:
            # Out of rotation; an exchange retrying on this upstream skips it too.
            endpoint.drained = True
            endpoint.refresh()
        return gone

    def failed(self, endpoint: Endpoint, now: float) -> None:
        """An exchange with ``endpoint`` failed (connection, timeout or 5xx)."""
        endpoint.failures += 1
        endpoint.last_failure = now
        if self.outlier is not None:
            self.outlier.failure(endpoint, now)
        if self.breaker is not None:
            self.breaker.record(False, now)

    def acquire(self, ex: Exchange) -> None:
        """Give ``ex`` a connection now (an idle one), later (a new one), or fail it."""
        breaker = self.breaker
        if breaker is not None and not breaker.allow(CLOCK.now):
            retry_after = breaker.retry_after(CLOCK.now)
            ex.fail(
                503,
                "circuit_open",
                f"upstream {self.name!r} is failing; its circuit breaker is open",
                headers=b"Retry-After: %d\r\n" % retry_after,
            )
            return
        endpoint = self.single
        if endpoint is None or not endpoint.available or ex.tried is not None:
            candidates = self.available
            tried = ex.tried
            if tried is not None:
                candidates = tuple(e for e in candidates if e not in tried) or candidates
            endpoint = self.balancer.pick(ex, candidates)
        if endpoint is None:
            ex.fail(503, "no_endpoint", self.unavailable())
            return
        idle = endpoint.idle
        while idle:
            conn = idle.pop()
            if conn.alive:
                ex.attach(conn, True)
                return
        if self.open < self.max_connections:
            self.connect(endpoint, ex)
        else:
            ex.queued_at = CLOCK.now
            self.waiters.append(ex)

    def connect(self, endpoint: Endpoint, ex: Exchange) -> None:
        """Open a new connection to ``endpoint`` for ``ex``."""
        endpoint.open += 1
        loop = self.loop
        if loop is None:
            loop = self.loop = asyncio.get_running_loop()
        task = loop.create_task(self._connect(endpoint, ex))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _connect(self, endpoint: Endpoint, ex: Exchange) -> None:
        loop = self.loop
        assert loop is not None  # noqa: S101 - set by connect()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: UpstreamConnection(self, endpoint),
                    endpoint.host,
                    endpoint.port,
                    ssl=self.ssl,
                    server_hostname=(self.server_name or endpoint.host) if self.ssl else None,
                ),
                ex.connect_timeout,
            )
        except TimeoutError:
            self._connect_failed(endpoint)
            ex.upstream_failed(
                endpoint,
                "connect_failure",
                504,
                "upstream_connect_timeout",
                f"connecting to {endpoint.label} took longer than {ex.connect_timeout:g}s",
            )
            return
        except OSError as exc:
            self._connect_failed(endpoint)
            reason = exc.strerror or str(exc) or type(exc).__name__
            ex.upstream_failed(
                endpoint,
                "connect_failure",
                502,
                "upstream_connect_failed",
                f"cannot connect to {endpoint.label}: {reason}",
            )
            return
        if ex.done:
            # The client went away while we connected; keep the connection for the next one.
            self.release(conn, True)
        else:
            ex.attach(conn, False)

    def _connect_failed(self, endpoint: Endpoint) -> None:
        endpoint.open -= 1
        self.slot_freed()

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        """Return ``conn`` after an exchange; it is pooled only when ``reusable``."""
        conn.exchange = None
        if not (reusable and conn.alive):
            if conn.alive:
                conn.transport.close()
            return
        conn.resume_reading()
        waiters = self.waiters
        while waiters:
            ex = waiters.popleft()
            if not ex.done:
                ex.attach(conn, True)
                return
        conn.idle_since = CLOCK.now
        conn.endpoint.idle.append(conn)

    def slot_freed(self) -> None:
        """A connection closed: a queued exchange may open a new one."""
        waiters = self.waiters
        while waiters and self.open < self.max_connections:
            ex = waiters.popleft()
            if ex.done:
                continue
            candidates = self.available
            if ex.tried is not None:
                candidates = tuple(e for e in candidates if e not in ex.tried) or candidates
            endpoint = self.balancer.pick(ex, candidates)
            if endpoint is None:
                ex.fail(503, "no_endpoint", self.unavailable())
                continue
            self.connect(endpoint, ex)

    def tick(self, now: float, seconds: float) -> None:
        """Per-sweep upkeep: retry budget, ejections that end, failures that fade."""
        self.budget.tick(seconds, self.sent)
        self.sent = 0
        if self.outlier is not None:
            self.outlier.tick(now)
        changed = False
        for endpoint in self.endpoints:
            if endpoint.ejected_until and now >= endpoint.ejected_until and self.outlier is None:
                # Ejected under a configuration whose detector is gone: still ends.
                endpoint.ejected_until = 0.0
                endpoint.refresh()
                changed = True
            if endpoint.remote_until and now >= endpoint.remote_until:
                endpoint.remote_until = 0.0
                endpoint.refresh()
                changed = True
            # Failures weigh on least-request's choice; a quiet spell forgives them,
            # so that an endpoint the balancer avoided is tried again.
            if endpoint.failures and now - endpoint.last_failure > _FORGIVE_AFTER:
                endpoint.failures = 0
        self._refresh_stale_latency(now)
        if changed:
            self.health_changed()

    def _refresh_stale_latency(self, now: float) -> None:
        """Give an endpoint whose latency went unmeasured for a while the best
        current latency of its peers.

        Least request steers away from a slow endpoint, and so stops measuring it:
        one slow response would otherwise starve it for good. After
        :data:`_STALE_AFTER` it competes again, so one request re-measures it; if it
        is still slow, that answer steers traffic away again.
        """
        best = 0.0
        stale = None
        for endpoint in self.endpoints:
            ewma = endpoint.ewma
            seen, since = endpoint.ewma_seen
            if ewma != seen:
                endpoint.ewma_seen = (ewma, now)
                if ewma and (not best or ewma < best):
                    best = ewma
            elif ewma and now - since > _STALE_AFTER:
                if stale is None:
                    stale = [endpoint]
                else:
                    stale.append(endpoint)
            elif ewma and (not best or ewma < best):
                best = ewma
        if stale is not None and best:
            for endpoint in stale:
                if endpoint.ewma > best:
                    endpoint.ewma = best
                endpoint.ewma_seen = (endpoint.ewma, now)

    def endpoint(self, label: str) -> Endpoint | None:
        """The endpoint at ``label`` (``host:port``), if this upstream has it."""
        for endpoint in self.endpoints:
            if endpoint.label == label:
                return endpoint
        return None

    def set_endpoint_state(self, label: str, field: str, value: object) -> bool:
        """Apply a health or drain change from the supervisor; False if no such endpoint."""
        endpoint = self.endpoint(label)
        if endpoint is None:
            return False
        if field == "healthy":
            endpoint.healthy = bool(value)
        elif field == "drained":
            endpoint.drained = bool(value)
        elif field == "remote_until":
            until = float(value)  # type: ignore[arg-type]
            if until > CLOCK.now and endpoint.available and len(self.available) <= 1:
                return True  # never take out the last endpoint standing
            endpoint.remote_until = until if until > CLOCK.now else 0.0
        else:
            raise ValueError(f"unknown endpoint field {field!r}")
        endpoint.refresh()
        self.health_changed()
        return True

    def expire_idle(self, now: float) -> None:
        """Close idle connections past the idle timeout (``now`` from the sweep)."""
        deadline = now - self.idle_timeout
        for endpoint in self.endpoints:
            idle = endpoint.idle
            # The stack's bottom holds the oldest connections.
            while idle and idle[0].idle_since < deadline:
                idle.pop(0).transport.close()

    def expire_waiters(self, now: float, slack: float) -> None:
        """Fail requests that waited for a free connection past their connect timeout."""
        waiters = self.waiters
        for ex in list(waiters):
            if ex.done:
                waiters.remove(ex)
            elif now - ex.queued_at > ex.connect_timeout + slack:
                waiters.remove(ex)
                ex.fail(
                    503,
                    "upstream_saturated",
                    f"upstream {self.name!r} is at its limit of {self.max_connections} "
                    "connections; raise max_connections or add endpoints",
                )

    def close(self, keep: frozenset[Endpoint] = frozenset()) -> None:
        """Close every idle connection, but those of the endpoints in ``keep``."""
        for endpoint in self.endpoints:
            if endpoint in keep:
                continue
            while endpoint.idle:
                endpoint.idle.pop().transport.close()

    def stats(self) -> dict[str, Any]:
        """Counters for metrics and the admin API."""
        breaker = self.breaker
        return {
            "open": self.open,
            "queued": len(self.waiters),
            "circuit": breaker.state if breaker is not None else None,
            "retry_budget": round(self.budget.tokens, 2),
            "endpoints": {e.label: e.state() for e in self.endpoints},
        }
