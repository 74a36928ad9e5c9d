"""A gateway worker: one event loop serving client connections with one runtime.

:class:`Worker` is the per-process state the data plane reads (runtime, open
connections, in-flight exchanges, metrics, access log) plus the periodic sweep
that enforces timeouts, so that no request pays for a timer of its own.

:func:`worker_main` is the entry point of a worker process started by the
supervisor: it binds its own SO_REUSEPORT listener and answers control messages
(metrics, reload, drain) on a pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

from meshgate.config.model import Config
from meshgate.errors import ConfigError
from meshgate.gateway import messages
from meshgate.gateway.accesslog import AccessLog
from meshgate.gateway.clock import CLOCK
from meshgate.gateway.exchange import Exchange
from meshgate.gateway.metrics import WorkerMetrics
from meshgate.gateway.protocol import ClientConnection
from meshgate.gateway.redirect import RedirectProtocol
from meshgate.gateway.runtime import EndpointSpec, Runtime
from meshgate.gateway.tls import TlsTerminator
from meshgate.gateway.tracing import Tracer, resolve_endpoint
from meshgate.gateway.upstream.pool import Endpoint

__all__ = ["Worker", "listen_socket", "worker_main"]

log = logging.getLogger("meshgate.gateway.worker")

_TICK = 0.1  # seconds between timeout sweeps of in-flight exchanges
_SLOW_TICKS = 10  # client and pool expiry run every this many ticks


def listen_socket(
    host: str, port: int, *, reuse_port: bool = True, listen: bool = True
) -> socket.socket:
    """A TCP socket bound to ``host:port`` (SO_REUSEPORT so that workers can share it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(4096)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _tracer(config: Config, index: int) -> Tracer | None:
    """The worker's tracer, or None when tracing is off (no endpoint known)."""
    settings = config.gateway.tracing
    url = resolve_endpoint(settings)
    return Tracer(settings, url, worker=index) if url is not None else None


class Worker:
    """The state one worker's data plane shares across connections."""

    def __init__(self, config: Config, *, index: int = 0, access_log: bool | None = None) -> None:
        self.index = index
        self.metrics = WorkerMetrics()
        # Where health events (ejections) go: the supervisor, once connected.
        self.events: Callable[[tuple[Any, ...]], None] | None = None
        tls = config.gateway.tls
        self.tls = TlsTerminator(tls) if tls is not None else None
        # The endpoints of service upstreams (the registry's instances), by upstream,
        # as the supervisor last sent them: they outlive reloads.
        self.dynamic: dict[str, tuple[EndpointSpec, ...]] = {}
        self.tracer = _tracer(config, index)
        self.runtime = Runtime(
            config, self.metrics, self._scheme, notify=self._notify, tracer=self.tracer
        )
        self.connections: set[ClientConnection] = set()
        self.inflight: set[Exchange] = set()
        self.draining = False
        settings = config.gateway.access_log
        enabled = settings.enabled if access_log is None else access_log
        self.access_log: AccessLog | None = AccessLog(settings.path, index) if enabled else None
        self.servers: list[asyncio.AbstractServer] = []
        self.reloads = 0
        self.rid_prefix = os.urandom(8).hex().encode()
        self.rid_count = 0
        if self.tracer is not None:
            self.tracer.rid_prefix = self.rid_prefix
        self._ticks = 0
        self._last_tick = CLOCK.now
        self._timer: asyncio.TimerHandle | None = None
        self._idle = asyncio.Event()
        # Endpoints a reload removed that still had connections in use: their
        # connections close as the exchanges on them end.
        self._orphans: set[Endpoint] = set()

    @property
    def _scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    def _notify(self, event: str, upstream: str, label: str, value: float) -> None:
        if self.events is not None:
            self.events((event, upstream, label, value))

    def set_endpoint_state(self, upstream: str, label: str, field: str, value: object) -> None:
        """Apply a health or drain change pushed by the supervisor."""
        target = self.runtime.upstreams.get(upstream)
        if target is not None:
            target.set_endpoint_state(label, field, value)

    def upstream_stats(self) -> dict[str, Any]:
        """Every upstream's pool, circuit and endpoint state, for the admin API."""
        return {name: up.stats() for name, up in self.runtime.upstreams.items()}

    def next_request_id(self) -> bytes:
        """A new request id: 32 hex digits, unique per worker start and request."""
        self.rid_count += 1
        return self.rid_prefix + b"%016x" % self.rid_count

    # -- serving

    async def serve(self, sock: socket.socket) -> asyncio.AbstractServer:
        """Accept connections on a bound, listening socket."""
        loop = asyncio.get_running_loop()
        CLOCK.tick()  # the clock may have stood still while nothing was serving
        self._last_tick = CLOCK.now
        server = await loop.create_server(
            lambda: ClientConnection(self),
            sock=sock,
            ssl=self.tls.context if self.tls is not None else None,
            ssl_handshake_timeout=self.runtime.header_timeout if self.tls is not None else None,
        )
        self.servers.append(server)
        if self._timer is None:
            self._timer = loop.call_later(_TICK, self._tick)
        return server

    async def serve_redirect(self, sock: socket.socket, https_port: int) -> None:
        """Answer plain HTTP on ``sock`` with redirects to HTTPS on ``https_port``."""
        loop = asyncio.get_running_loop()
        timeout = self.runtime.header_timeout
        server = await loop.create_server(lambda: RedirectProtocol(https_port, timeout), sock=sock)
        self.servers.append(server)

    def _tick(self) -> None:
        previous = CLOCK.now
        now = CLOCK.tick()
        # Hot-path stamps come from CLOCK, which lags real time by at most the gap
        # since the last tick (longer than _TICK when the loop was busy): allowing
        # that much slack means no timeout ever fires early.
        slack = max(_TICK, now - previous)
        # Stamps on the hot path come from CLOCK, up to one tick old: allowing one
        # tick of slack means a timeout never fires early (at most one tick late).
        for ex in list(self.inflight):
            if ex.done:
                self.inflight.discard(ex)
            elif ex.deadline and now > ex.deadline + slack:
                ex.timed_out("total")
            elif ex.try_deadline and now > ex.try_deadline + slack and not ex.resp_started:
                endpoint = ex.endpoint
                if endpoint is not None:
                    seconds = ex.route.retry.per_try  # type: ignore[union-attr]
                    ex.upstream_failed(
                        endpoint,
                        "timeout",
                        504,
                        "upstream_timeout",
                        f"{endpoint.label} did not answer within the per-try timeout {seconds:g}s",
                    )
            elif now - ex.last_io > ex.read_timeout + slack:
                ex.timed_out("read")
        rt = self.runtime
        elapsed = now - self._last_tick
        self._last_tick = now
        for upstream in rt.upstreams.values():
            if upstream.waiters:
                upstream.expire_waiters(now, slack)
            upstream.tick(now, elapsed)
        self._ticks += 1
        if self._ticks % _SLOW_TICKS == 0:
            for conn in list(self.connections):
                conn.expire(now, rt)
            for upstream in rt.upstreams.values():
                upstream.expire_idle(now - _TICK)
            if self._orphans:
                self._close_orphans()
        if self.access_log is not None:
            self.access_log.flush()
        if self.tracer is not None:
            self.tracer.flush()
        self._timer = asyncio.get_running_loop().call_later(_TICK, self._tick)

    def apply(self, config: Config) -> None:
        """Swap in a new configuration; requests in flight finish on the old one.

        Endpoints that stay keep their pooled connections and health; only the
        idle connections of endpoints that went away are closed.
        """
        old = self.runtime
        tls = config.gateway.tls
        if self.tls is not None and tls is not None:
            self.tls.update(tls)  # raises before anything changed if a file is bad
        if config.gateway.tracing != old.config.gateway.tracing:
            if self.tracer is not None:
                self.tracer.close()
            self.tracer = _tracer(config, self.index)
            if self.tracer is not None:
                self.tracer.rid_prefix = self.rid_prefix
        self.runtime = Runtime(
            config,
            self.metrics,
            self._scheme,
            notify=self._notify,
            previous=old,
            dynamic=self.dynamic,
            tracer=self.tracer,
        )
        self.reloads += 1
        live = self.runtime.endpoints()
        old.close(keep=live)
        self._orphans |= old.endpoints() - live
        self._orphans -= live  # an endpoint removed once and added back
        self._close_orphans()
        settings = config.gateway.access_log
        if settings != old.config.gateway.access_log:
            if self.access_log is not None:
                self.access_log.close()
            self.access_log = AccessLog(settings.path, self.index) if settings.enabled else None

    def set_endpoints(self, upstream: str, specs: Sequence[EndpointSpec]) -> None:
        """The instances of a service upstream changed: serve from ``specs`` now.
        Requests in flight on an instance that went finish there."""
        self.dynamic[upstream] = tuple(specs)
        target = self.runtime.upstreams.get(upstream)
        if target is None or target.settings.service is None:
            return
        gone = target.set_endpoints(specs)
        if gone:
            self._orphans.update(gone)
            self._close_orphans()

    def _close_orphans(self) -> None:
        for endpoint in list(self._orphans):
            while endpoint.idle:
                endpoint.idle.pop().transport.close()
            if not endpoint.open:
                self._orphans.discard(endpoint)

    def connection_closed(self, conn: ClientConnection) -> None:
        if self.draining and not self.connections:
            self._idle.set()

    def gauges(self) -> dict[str, Any]:
        rt = self.runtime
        return {
            "connections": len(self.connections),
            "inflight": len(self.inflight),
            "upstreams": {name: up.stats() for name, up in rt.upstreams.items()},
            "reloads": self.reloads,
            "tracing": self.tracer.stats() if self.tracer is not None else None,
        }

    def snapshot(self) -> dict[str, Any]:
        """Metrics as plain data, for the supervisor to merge."""
        return self.metrics.snapshot(self.gauges())

    async def drain(self, timeout: float) -> None:
        """Stop accepting, finish in-flight requests (up to ``timeout``), then close all."""
        self.draining = True
        for server in self.servers:
            server.close()
        for conn in list(self.connections):
            conn.closing = True
            if conn.current is None and conn.parsing is None and conn.tunnel is None:
                conn.transport.close()
        if self.connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout)
        for conn in list(self.connections):
            conn.transport.abort()
        self.close()

    def close(self) -> None:
        """Release everything the worker holds (timer, pools, access log)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for server in self.servers:
            server.close()
        self.runtime.close()
        self._close_orphans()
        if self.access_log is not None:
            self.access_log.close()
            self.access_log = None
        if self.tracer is not None:
            self.tracer.close()
            self.tracer = None


# ---------------------------------------------------------------------------- process


def _tune_malloc() -> None:
    """Keep glibc from returning and regrowing the heap on every large read.

    Bodies move in buffers of up to a few hundred KiB; with the default dynamic
    thresholds glibc trims the heap after freeing one and grows it again for the
    next (two brk calls per read), which halves throughput on large bodies.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # pragma: no cover - not glibc
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_trim_threshold, 128 * 1024 * 1024)
    libc.mallopt(m_mmap_threshold, 16 * 1024 * 1024)


def worker_main(
    *,
    redirect_port: int = 0,
    index: int,
    config: Config,
    host: str,
    port: int,
    control: Connection,
    log_level: int = logging.INFO,
) -> None:
    """Entry point of a worker process (spawned by the supervisor)."""
    logging.basicConfig(
        level=log_level, format=f"%(asctime)s worker-{index} %(levelname)s %(name)s: %(message)s"
    )
    # Ctrl-C reaches the whole process group; the supervisor decides what it means.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _tune_malloc()
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up, absent on some platforms

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(_worker_async(index, config, host, port, control, redirect_port))


async def _worker_async(  # noqa: PLR0917 - private, called once, positionally
    index: int,
    config: Config,
    host: str,
    port: int,
    control: Connection,
    redirect_port: int = 0,
) -> None:
    loop = asyncio.get_running_loop()
    worker = Worker(config, index=index)
    sock = listen_socket(host, port)
    await worker.serve(sock)
    tls = config.gateway.tls
    if tls is not None and tls.redirect_http is not None:
        redirect = tls.redirect_http
        await worker.serve_redirect(listen_socket(redirect.host, redirect_port), port)
    done = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()

    def spawn_drain() -> None:
        task = loop.create_task(drain())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def drain() -> None:
        if not worker.draining:
            await worker.drain(worker.runtime.config.gateway.drain_timeout)
            done.set()

    def on_control() -> None:
        try:
            while control.poll():
                message = control.recv()
                handle(message)
        except (EOFError, OSError):
            # The supervisor is gone: nobody can stop us cleanly any more.
            loop.remove_reader(control.fileno())
            spawn_drain()

    def handle(message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == messages.METRICS:
            control.send((messages.REPLY, message[1], worker.snapshot()))
        elif kind == messages.RELOAD:
            try:
                worker.apply(message[2])
            except ConfigError as exc:
                control.send((messages.REPLY, message[1], {"ok": False, "error": str(exc)}))
            except Exception as exc:
                # The supervisor compiled this configuration before sending it, so
                # this is a bug; the old configuration keeps serving regardless.
                log.exception("worker %d could not apply the configuration", index)
                reply = {"ok": False, "error": f"worker {index} failed to apply it: {exc!r}"}
                control.send((messages.REPLY, message[1], reply))
            else:
                control.send((messages.REPLY, message[1], {"ok": True, "reloads": worker.reloads}))
        elif kind == messages.DRAIN:
            spawn_drain()
        elif kind == messages.ENDPOINT:
            worker.set_endpoint_state(*message[1:5])
        elif kind == messages.ENDPOINTS:
            worker.set_endpoints(message[1], message[2])
        elif kind == messages.UPSTREAMS:
            control.send((messages.REPLY, message[1], worker.upstream_stats()))

    def send_event(event: tuple[Any, ...]) -> None:
        with contextlib.suppress(OSError, ValueError):
            control.send(event)

    worker.events = send_event
    loop.add_reader(control.fileno(), on_control)
    loop.add_signal_handler(signal.SIGTERM, spawn_drain)
    control.send((messages.READY, index, os.getpid()))
    await done.wait()
    with contextlib.suppress(OSError):
        control.send((messages.EXITED, index))
