"""Upstream connection pools: endpoints, keep-alive reuse, a connection limit, and the
accounting of each endpoint's successes and failures.

One :class:`Upstream` per configured upstream and worker. Each endpoint keeps a
LIFO stack of idle connections (the warmest first, so that idle ones age out);
the upstream caps how many connections are open at once and queues requests
past the cap until one frees up or the connect timeout passes (503).

The connection itself and the exchange's side of it live in
:mod:`meshgate.gateway.proxy`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from meshgate.config.model import UpstreamSettings
from meshgate.gateway.clock import CLOCK
from meshgate.gateway.proxy import UpstreamConnection
from meshgate.gateway.tls import upstream_context
from meshgate.gateway.upstream.balancer import BALANCERS
from meshgate.gateway.upstream.health import CircuitBreaker, OutlierDetector, RetryBudget

if TYPE_CHECKING:
    from meshgate.gateway.exchange import Exchange

__all__ = [
    "EWMA_WEIGHT",
    "Endpoint",
    "Notify",
    "Upstream",
    "record_failure",
    "record_success",
]


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


EWMA_WEIGHT = 0.3
"""The weight of a new latency sample in an endpoint's moving average."""


def record_success(
    endpoint: Endpoint, latency: float, breaker: CircuitBreaker | None, now: float
) -> None:
    """The success half of an endpoint's accounting: its failure run ends, its latency
    average moves, its breaker hears of it (the gateway's pools and the service
    client alike)."""
    endpoint.failures = 0
    if latency:
        ewma = endpoint.ewma
        endpoint.ewma = ewma + (latency - ewma) * EWMA_WEIGHT if ewma else latency
    if breaker is not None:
        breaker.record(True, now)


def record_failure(
    endpoint: Endpoint, now: float, outlier: OutlierDetector | None, breaker: CircuitBreaker | None
) -> None:
    """The failure half: counted, heard by the outlier detector and the breaker."""
    endpoint.failures += 1
    endpoint.last_failure = now
    if outlier is not None:
        outlier.failure(endpoint, now)
    if breaker is not None:
        breaker.record(False, now)


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

    def succeeded(self, endpoint: Endpoint, latency: float, now: float) -> None:
        """An exchange with ``endpoint`` got a response below 500 after ``latency``
        seconds (0: not measured). The data plane's ``Exchange.finish`` does the same
        inline, for speed."""
        record_success(endpoint, latency, self.breaker, now)

    def failed(self, endpoint: Endpoint, now: float) -> None:
        """An exchange with ``endpoint`` failed (connection, timeout or 5xx)."""
        record_failure(endpoint, now, self.outlier, self.breaker)

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
