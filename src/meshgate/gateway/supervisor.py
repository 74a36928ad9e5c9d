"""The gateway's control plane: supervises worker processes and serves the admin API.

The supervisor reserves the listen port (a bound, non-listening SO_REUSEPORT
socket, so that ``port: 0`` resolves once and the kernel never queues a
connection on it), starts one worker process per CPU (or as configured), each
with its own SO_REUSEPORT listener on that port, restarts a worker that dies with
exponential backoff, merges the workers' metrics for the admin listener, and on
SIGTERM or SIGINT tells every worker to drain before it exits itself.

It also hosts the service registry (``/v1/registry`` on the admin listener) and
follows it: the instances of a service become the endpoints of every upstream
that names the service, pushed to the workers as they change.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from meshgate._files import file_signature
from meshgate.config.loader import loads
from meshgate.config.model import Address, Config
from meshgate.errors import ConfigError, MeshgateError, SupervisorError
from meshgate.gateway import messages
from meshgate.gateway.admin import create_admin_app
from meshgate.gateway.metrics import merge_snapshots
from meshgate.gateway.runtime import EndpointSpec, compile_config
from meshgate.gateway.tls import admin_context
from meshgate.gateway.tokens import AdminToken
from meshgate.gateway.upstream.pool import endpoint_label
from meshgate.gateway.upstream.probe import Prober
from meshgate.gateway.upstream.shared import SharedHealth
from meshgate.gateway.worker import listen_socket, worker_main
from meshgate.providers import Provider, ServiceEndpoints
from meshgate.providers.registry import RegistryProvider

if TYPE_CHECKING:
    from meshgate.registry.store import Registry

__all__ = ["Supervisor"]

log = logging.getLogger("meshgate.gateway")

_READY_TIMEOUT = 30.0
_MAX_BACKOFF = 30.0
_STABLE_AFTER = 10.0  # a worker up this long resets its crash backoff


@dataclass
class _WorkerSlot:
    index: int
    process: BaseProcess | None = None
    control: Connection | None = None
    pid: int = 0
    started: float = 0.0
    ready: asyncio.Future[None] | None = None
    restarts: int = 0
    crashes_in_row: int = 0
    exits: list[int] = field(default_factory=list)


def _restart_only_changes(old: Config, new: Config) -> list[str]:
    """Settings that changed but only apply at the next start of the gateway."""
    changed = []
    if old.gateway.workers != new.gateway.workers:
        changed.append("gateway.workers")
    if old.gateway.admin != new.gateway.admin:
        changed.append("gateway.admin")
    if old.gateway.registry != new.gateway.registry:
        changed.append("gateway.registry")
    old_tls, new_tls = old.gateway.tls, new.gateway.tls
    if (old_tls is None) != (new_tls is None):
        changed.append("gateway.tls")
    elif (
        old_tls is not None
        and new_tls is not None
        and old_tls.redirect_http != new_tls.redirect_http
    ):
        changed.append("gateway.tls.redirect_http")
    return changed


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handling: the supervisor owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Supervisor:
    """Runs a gateway: worker processes, restarts, admin API, graceful stop."""

    def __init__(
        self,
        config_text: str,
        source: str = "<config>",
        *,
        workers: int | None = None,
        log_level: int = logging.INFO,
    ) -> None:
        self.config: Config = loads(config_text, source)
        self.source = source
        self.worker_count = workers or self.config.gateway.worker_count
        self.log_level = log_level
        self.port = 0
        self.admin_port = 0
        self.redirect_port = 0
        self._redirect: socket.socket | None = None
        self.started = time.time()
        self.reloads = 0
        self.last_reload: float | None = None
        self.last_reload_error: str | None = None
        self.restart_pending: list[str] = []
        self.reload_failures = 0
        # Endpoint state the supervisor pushes to every worker, by (upstream, label):
        # {"healthy": False} from active checks, {"drained": True} from an operator,
        # {"remote_until": t} when another worker or gateway node ejected it.
        self._flags: dict[tuple[str, str], dict[str, Any]] = {}
        self.prober = Prober(self._on_probe)
        self.shared = SharedHealth(self._on_shared)
        self._watch: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._slots = [_WorkerSlot(i) for i in range(self.worker_count)]
        self._ctx = multiprocessing.get_context("spawn")
        self._stopping = False
        self._started = False
        self._stopped = asyncio.Event()
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._last_counts: dict[int, tuple[int, dict[str, Any]]] = {}
        self._retired_counts: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        self._admin: _EmbeddedServer | None = None
        self._admin_task: asyncio.Task[None] | None = None
        self.token: AdminToken | None = None
        self.registry: Registry | None = None
        self.registry_token: AdminToken | None = None
        # The registry's instances by service, and what each service upstream was
        # last given (sorted (host, port, weight)), as the workers know it.
        self._instances: ServiceEndpoints = {}
        self._dynamic: dict[str, tuple[EndpointSpec, ...]] = {}
        self._follow: asyncio.Task[None] | None = None

    # -- lifecycle

    async def start(self) -> None:
        """Bind, start the workers and the admin API; return once all are ready."""
        gw = self.config.gateway
        loop = asyncio.get_running_loop()
        if any(u.health.shared is not None for u in self.config.upstreams.values()):
            try:
                import redis.asyncio  # noqa: F401, PLC0415 - only checking it is there
            except ImportError:
                raise SupervisorError(
                    "health.shared needs Redis support: pip install 'meshgate[redis]'"
                ) from None
        try:
            # Everything a worker will build, built here first: a bad certificate
            # is a configuration error, not a worker that dies while starting.
            compile_config(self.config)
        except ConfigError as exc:
            raise SupervisorError(str(exc)) from None
        self._reservation = self._reserve(gw.listen, "gateway.listen")
        self.port = self._reservation.getsockname()[1]
        if gw.tls is not None and gw.tls.redirect_http is not None:
            try:
                self._redirect = self._reserve(gw.tls.redirect_http, "gateway.tls.redirect_http")
            except SupervisorError:
                self._reservation.close()
                raise
            self.redirect_port = self._redirect.getsockname()[1]
        await self._start_admin()
        try:
            for slot in self._slots:
                self._spawn(slot)
            waits = [slot.ready for slot in self._slots if slot.ready is not None]
            await asyncio.wait_for(asyncio.gather(*waits), _READY_TIMEOUT)
        except TimeoutError:
            await self.stop()
            raise SupervisorError(
                f"workers did not start within {_READY_TIMEOUT:g}s; see the log above"
            ) from None
        except BaseException:
            await self.stop()
            raise
        self._started = True
        self._configure_health()
        self._watch = loop.create_task(self._watch_file())
        if self.registry is not None:
            self._follow = loop.create_task(self._follow_registry())
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._background(self.reload_file()))

    @staticmethod
    def _reserve(address: Address, where: str) -> socket.socket:
        """Hold ``address`` for the workers' SO_REUSEPORT listeners."""
        try:
            # An exclusive bind first: it fails if anything (another gateway's
            # SO_REUSEPORT workers included) holds the address, which SO_REUSEPORT
            # alone would silently share.
            probe = listen_socket(address.host, address.port, reuse_port=False, listen=False)
            port = probe.getsockname()[1]
            probe.close()
            return listen_socket(address.host, port, listen=False)
        except OSError as exc:
            raise SupervisorError(
                f"cannot listen on {address}: {exc.strerror}; "
                f"pick another {where} or stop what uses it"
            ) from None

    async def run(self) -> None:
        """Start, then serve until asked to stop; drain and exit."""
        await self.start()
        await self.serve()

    async def serve(self) -> None:
        """After :meth:`start`: serve until asked to stop, then drain and exit."""
        await self._stopped.wait()
        await self.stop()

    def request_stop(self) -> None:
        """Begin a graceful stop (what SIGTERM does)."""
        self._stopped.set()

    async def stop(self) -> None:
        """Drain every worker, wait for them to exit, and stop the admin API."""
        if self._stopping:
            return
        self._stopping = True
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        if self._watch is not None:
            self._watch.cancel()
        if self._follow is not None:
            self._follow.cancel()
        self.prober.stop()
        await self.shared.stop()
        for slot in self._slots:
            self._send(slot, (messages.DRAIN,))
        deadline = time.monotonic() + self.config.gateway.drain_timeout + 5
        for slot in self._slots:
            proc = slot.process
            if proc is None:
                continue
            while proc.is_alive() and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # a process exit has no awaitable; poll
            if proc.is_alive():
                log.warning("worker %d did not drain in time; killing it", slot.index)
                proc.kill()
            proc.join(timeout=5)
            self._forget(slot)
        if self._admin is not None:
            self._admin.should_exit = True
            if self._admin_task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await self._admin_task
        if self.registry is not None:
            await self.registry.close()
        self._reservation.close()
        if self._redirect is not None:
            self._redirect.close()
        self._stopped.set()

    # -- workers

    def _spawn(self, slot: _WorkerSlot) -> None:
        loop = asyncio.get_running_loop()
        parent, child = self._ctx.Pipe()
        gw = self.config.gateway
        proc = self._ctx.Process(
            target=worker_main,
            kwargs={
                "index": slot.index,
                "config": self.config,
                "host": gw.listen.host,
                "port": self.port,
                "control": child,
                "log_level": self.log_level,
                "redirect_port": self.redirect_port,
            },
            name=f"meshgate-worker-{slot.index}",
            # Never outlive the supervisor, even when it fails before a clean stop.
            daemon=True,
        )
        proc.start()
        child.close()
        slot.process = proc
        slot.control = parent
        slot.pid = proc.pid or 0
        slot.started = time.monotonic()
        slot.ready = loop.create_future()
        loop.add_reader(parent.fileno(), self._on_message, slot)
        loop.add_reader(proc.sentinel, self._on_exit, slot)

    def _forget(self, slot: _WorkerSlot) -> None:
        loop = asyncio.get_running_loop()
        if slot.control is not None:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(slot.control.fileno())
            slot.control.close()
            slot.control = None
        if slot.process is not None:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(slot.process.sentinel)

    def _on_message(self, slot: _WorkerSlot) -> None:
        control = slot.control
        if control is None:
            return
        try:
            while control.poll():
                message = control.recv()
                kind = message[0]
                if kind == messages.READY:
                    self._sync(slot)
                    if slot.ready is not None and not slot.ready.done():
                        slot.ready.set_result(None)
                elif kind == messages.EJECTED:
                    self._on_ejected(slot, message[1], message[2], message[3])
                elif kind == messages.REPLY:
                    fut = self._pending.pop(message[1], None)
                    if fut is not None and not fut.done():
                        fut.set_result(message[2])
        except (EOFError, OSError):
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(control.fileno())

    def _on_exit(self, slot: _WorkerSlot) -> None:
        proc = slot.process
        if proc is None:
            return
        proc.join(timeout=1)
        code = proc.exitcode
        self._forget(slot)
        slot.process = None
        if self._stopping:
            return
        if not self._started and slot.ready is not None and not slot.ready.done():
            # Dying before the gateway ever served: restarting would only repeat it.
            slot.ready.set_exception(
                SupervisorError(f"worker {slot.index} exited with code {code} while starting")
            )
            return
        slot.exits.append(code if code is not None else -1)
        uptime = time.monotonic() - slot.started
        slot.crashes_in_row = 1 if uptime > _STABLE_AFTER else slot.crashes_in_row + 1
        delay = min(_MAX_BACKOFF, 0.1 * 2 ** (slot.crashes_in_row - 1))
        log.error(
            "worker %d (pid %d) exited with code %s after %.1fs; restarting in %.1fs",
            slot.index,
            slot.pid,
            code,
            uptime,
            delay,
        )
        slot.restarts += 1
        asyncio.get_running_loop().call_later(delay, self._restart, slot)

    def _restart(self, slot: _WorkerSlot) -> None:
        if not self._stopping and slot.process is None:
            self._spawn(slot)

    def _send(self, slot: _WorkerSlot, message: tuple[Any, ...]) -> bool:
        if slot.control is None:
            return False
        try:
            slot.control.send(message)
        except (OSError, ValueError):
            return False
        return True

    async def _ask_all(self, kind: str, *args: Any, timeout: float = 5.0) -> list[Any]:
        return list((await self._ask_each(kind, *args, timeout=timeout)).values())

    async def _ask_each(
        self, kind: str, *args: Any, timeout: float = 5.0
    ) -> dict[tuple[int, int], Any]:
        """Every live worker's reply, keyed by (slot index, pid); silent ones are left out."""
        loop = asyncio.get_running_loop()
        futures: dict[tuple[int, int], asyncio.Future[Any]] = {}
        for slot in self._slots:
            req = next(self._ids)
            fut: asyncio.Future[Any] = loop.create_future()
            if self._send(slot, (kind, req, *args)):
                self._pending[req] = fut
                futures[(slot.index, slot.pid)] = fut
        if not futures:
            return {}
        done, _ = await asyncio.wait(futures.values(), timeout=timeout)
        return {key: f.result() for key, f in futures.items() if f in done}

    # -- operations used by the admin API

    async def metrics(self) -> dict[str, Any]:
        """Every worker's metrics, merged; counters never go down.

        A worker's counters die with it. The last counters each worker reported are
        kept, and those of a worker that was replaced stay in the sum, so that a
        restart does not look like a counter reset (at most what it counted since the
        last scrape is lost).
        """
        replies = await self._ask_each(messages.METRICS)
        for (index, pid), snapshot in replies.items():
            last = self._last_counts.get(index)
            if last is not None and last[0] != pid:
                merged = merge_snapshots([*self._retired_counts, last[1]])
                self._retired_counts = [{"routes": merged["routes"]}]
            self._last_counts[index] = (pid, {"routes": snapshot.get("routes", [])})
        answered = {index for index, _ in replies}
        silent = [c for i, (_, c) in self._last_counts.items() if i not in answered]
        merged = merge_snapshots([*self._retired_counts, *silent, *replies.values()])
        merged["extra"] = self.reload_metrics()
        return merged

    async def reload_file(self) -> dict[str, Any]:
        """Re-read the configuration file and apply it (SIGHUP)."""
        try:
            text = await asyncio.to_thread(Path(self.source).read_text, encoding="utf-8")
        except OSError as exc:
            return self._reload_failed(f"cannot read {self.source}: {exc}")
        return await self.apply(text)

    async def apply(self, text: str) -> dict[str, Any]:
        """Validate ``text`` and swap it into every worker; invalid config changes nothing."""
        try:
            config = loads(text, self.source)
        except ConfigError as exc:
            return self._reload_failed(str(exc))
        if config.gateway.listen != self.config.gateway.listen:
            return self._reload_failed(
                "gateway.listen cannot change on reload; restart the gateway to move it"
            )
        try:
            # Compile here first: what would fail in a worker fails before any
            # worker has swapped, so the workers never disagree.
            compile_config(config)
        except ConfigError as exc:
            return self._reload_failed(str(exc))
        except Exception as exc:
            log.exception("the configuration validated but did not compile")
            return self._reload_failed(f"the configuration cannot be compiled: {exc}")
        live = [s for s in self._slots if s.control is not None]
        replies = await self._ask_all(messages.RELOAD, config)
        errors = [r["error"] for r in replies if not r.get("ok")]
        if len(replies) < len(live):
            errors.append(
                f"{len(live) - len(replies)} of {len(live)} workers did not confirm the "
                "reload in time; check the log, then reload again"
            )
        if errors:
            return self._reload_failed("; ".join(errors))
        restart = _restart_only_changes(self.config, config)
        self.config = config
        self.reloads += 1
        self.last_reload = time.time()
        self.last_reload_error = None
        log.info("configuration reloaded (%d workers)", len(replies))
        if restart:
            log.warning("changes to %s take effect when the gateway restarts", ", ".join(restart))
        self.restart_pending = sorted(set(self.restart_pending) | set(restart))
        self._dynamic = {k: v for k, v in self._dynamic.items() if k in self._service_upstreams()}
        self._configure_health()
        for slot in self._slots:
            self._sync(slot)
        self._apply_instances()
        return {"ok": True, "reloads": self.reloads, "restart_required": restart}

    def _reload_failed(self, error: str) -> dict[str, Any]:
        self.last_reload_error = error
        self.reload_failures += 1
        log.error("reload refused; the old configuration keeps serving:\n%s", error)
        return {"ok": False, "error": error}

    def status(self) -> dict[str, Any]:
        """What runs, for the admin API and ``meshgate`` commands."""
        return {
            "listen": str(self.config.gateway.listen.model_copy(update={"port": self.port})),
            "uptime_seconds": round(time.time() - self.started, 3),
            "config_source": self.source,
            "reloads": self.reloads,
            "last_reload": self.last_reload,
            "last_reload_error": self.last_reload_error,
            "restart_required": self.restart_pending,
            "registry": self._registry_status(),
            "workers": [
                {
                    "index": s.index,
                    "pid": s.pid,
                    "alive": bool(s.process and s.process.is_alive()),
                    "restarts": s.restarts,
                    "exit_codes": s.exits[-5:],
                }
                for s in self._slots
            ],
        }

    # -- endpoint health and drain

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _configure_health(self) -> None:
        self.prober.configure(self.config, self._dynamic)
        self.shared.configure(self.config)
        # Forget state about endpoints the configuration no longer has.
        known = {(name, label) for name in self.config.upstreams for label in self._labels(name)}
        self._flags = {k: v for k, v in self._flags.items() if k in known}

    def _labels(self, upstream: str) -> list[str]:
        """The endpoints of ``upstream`` now: configured, or its service's instances."""
        settings = self.config.upstreams.get(upstream)
        if settings is None:
            return []
        if settings.service is not None:
            return [endpoint_label(host, port) for host, port, _ in self._dynamic.get(upstream, ())]
        return [str(e.address) for e in settings.endpoints]

    def _set_flag(self, upstream: str, label: str, field: str, value: Any, skip: int = -1) -> None:
        self._flags.setdefault((upstream, label), {})[field] = value
        for slot in self._slots:
            if slot.index != skip:
                self._send(slot, (messages.ENDPOINT, upstream, label, field, value))

    def _sync(self, slot: _WorkerSlot) -> None:
        """Send a (new or restarted, or reloaded) worker every service's instances
        and every endpoint flag."""
        for upstream, specs in self._dynamic.items():
            self._send(slot, (messages.ENDPOINTS, upstream, specs))
        now = time.monotonic()
        for (upstream, label), flags in self._flags.items():
            for name, value in flags.items():
                if name == "remote_until" and value <= now:
                    continue
                self._send(slot, (messages.ENDPOINT, upstream, label, name, value))

    def _on_probe(self, upstream: str, label: str, healthy: bool) -> None:
        self._set_flag(upstream, label, "healthy", healthy)
        self.shared.report_unhealthy(upstream, label, healthy)

    def _on_ejected(self, slot: _WorkerSlot, upstream: str, label: str, until: float) -> None:
        # One worker's outlier detector took it out: the others follow, and so do
        # the other gateway nodes when health is shared.
        self._set_flag(upstream, label, "remote_until", until, skip=slot.index)
        self.shared.report(upstream, label, time.time() + (until - time.monotonic()))

    def _on_shared(self, upstream: str, label: str, until: float) -> None:
        self._set_flag(upstream, label, "remote_until", until)

    def endpoint_exists(self, upstream: str, label: str) -> bool:
        """Whether the configuration has ``label`` in ``upstream``."""
        return label in self._labels(upstream)

    def set_drained(self, upstream: str, label: str, drained: bool) -> None:
        """Take ``label`` out of rotation (in-flight requests finish) or put it back.

        Raises:
            KeyError: no such upstream or endpoint.
        """
        if not self.endpoint_exists(upstream, label):
            raise KeyError(f"{upstream}/{label}")
        self._set_flag(upstream, label, "drained", drained)
        log.warning("upstream %s: %s %s", upstream, label, "drained" if drained else "enabled")

    async def upstreams(self) -> dict[str, Any]:
        """Every endpoint's state, merged over the workers."""
        replies = await self._ask_all(messages.UPSTREAMS)
        probes = self.prober.states()
        out: dict[str, Any] = {}
        for name, settings in self.config.upstreams.items():
            endpoints = {}
            for label in self._labels(name):
                flags = self._flags.get((name, label), {})
                probe = probes.get((name, label))
                per_worker = [r[name]["endpoints"].get(label, {}) for r in replies if name in r]
                endpoints[label] = {
                    "available": all(w.get("available", True) for w in per_worker),
                    "healthy": flags.get("healthy", True),
                    "last_check_error": probe.last_error if probe is not None else None,
                    "drained": flags.get("drained", False),
                    "ejected_in_workers": sum(1 for w in per_worker if w.get("ejected")),
                    "down_elsewhere": flags.get("remote_until", 0.0) > time.monotonic(),
                    "inflight": sum(w.get("inflight", 0) for w in per_worker),
                    "open_connections": sum(w.get("open", 0) for w in per_worker),
                    "idle_connections": sum(w.get("idle", 0) for w in per_worker),
                    "ewma_ms": max((w.get("ewma_ms", 0.0) for w in per_worker), default=0.0),
                }
            out[name] = {
                "balancer": settings.balancer,
                **({"service": settings.service} if settings.service is not None else {}),
                "circuit": sorted({r[name]["circuit"] for r in replies if name in r} - {None}),
                # Each worker has its own budget: the least of them says how close
                # retries are to being refused.
                "retry_budget": min(
                    (r[name]["retry_budget"] for r in replies if name in r), default=None
                ),
                "endpoints": endpoints,
            }
        return {"upstreams": out, "shared_health_error": self.shared.error}

    async def _watch_file(self) -> None:
        """Reload when the configuration file changes (checked every second)."""
        path = Path(self.source)

        last = file_signature(path)
        while True:
            await asyncio.sleep(1.0)
            current = file_signature(path)
            if current is not None and current != last:
                last = current
                log.info("%s changed; reloading", self.source)
                await self.reload_file()

    def reload_metrics(self) -> list[Metric]:
        """Reload and worker-restart metrics, from the supervisor's own counters."""
        reloads = CounterMetricFamily("meshgate_gateway_reloads", "Configuration reloads applied.")
        reloads.add_metric([], self.reloads)
        failed = CounterMetricFamily(
            "meshgate_gateway_reload_failures", "Reloads refused (the old config kept serving)."
        )
        failed.add_metric([], self.reload_failures)
        last = GaugeMetricFamily(
            "meshgate_gateway_last_reload_timestamp_seconds",
            "When the configuration was last reloaded (UNIX time; 0: never).",
        )
        last.add_metric([], self.last_reload or 0.0)
        ok = GaugeMetricFamily(
            "meshgate_gateway_last_reload_success",
            "1 if the last reload attempt succeeded (or none was made), 0 if it was refused.",
        )
        ok.add_metric([], 0.0 if self.last_reload_error else 1.0)
        restarts = CounterMetricFamily(
            "meshgate_gateway_worker_restarts", "Worker processes restarted after exiting."
        )
        restarts.add_metric([], sum(s.restarts for s in self._slots))
        return [reloads, failed, last, ok, restarts]

    # -- registry

    async def _start_registry(self) -> None:
        """The registry the admin listener serves, when the configuration enables it."""
        settings = self.config.gateway.registry
        if not settings.enabled:
            return
        from meshgate.registry.memory import MemoryRegistry  # noqa: PLC0415

        registry: Registry
        if settings.redis is not None:
            try:
                from meshgate.registry.redis import RedisRegistry  # noqa: PLC0415
            except ImportError as exc:
                raise SupervisorError(str(exc)) from None
            registry = RedisRegistry(settings.redis, prefix=settings.key_prefix)
        elif settings.persist:
            default = Path.home() / ".meshgate" / f"registry-{self.admin_port}.sqlite"
            registry = MemoryRegistry(settings.path or default)
        else:
            registry = MemoryRegistry()
        try:
            await registry.start()
        except MeshgateError as exc:
            raise SupervisorError(f"gateway.registry: {exc}") from None
        self.registry = registry
        self.registry_token = AdminToken.of(
            settings.token, settings.token_file, f"registry-{self.admin_port}.token"
        )

    def _registry_status(self) -> dict[str, Any] | None:
        if self.registry is None:
            return None
        return {
            "services": {name: len(group) for name, group in sorted(self._instances.items())},
            "token_file": None if self.registry_token is None else _path(self.registry_token),
        }

    def _service_upstreams(self) -> dict[str, str]:
        """Upstream name -> the service whose instances it sends to."""
        return {
            name: up.service for name, up in self.config.upstreams.items() if up.service is not None
        }

    async def _follow_registry(self) -> None:
        """Keep the service upstreams' endpoints equal to the registry's instances."""
        assert self.registry is not None  # noqa: S101 - started only with a registry
        await self._follow_provider(RegistryProvider(self.registry))

    async def _follow_provider(self, provider: Provider) -> None:
        """Keep the service upstreams' endpoints equal to what ``provider`` says."""
        async for endpoints in provider.watch():
            self._instances = endpoints
            self._apply_instances()

    def _apply_instances(self) -> None:
        """Tell the workers of every service upstream whose instances changed."""
        changed = False
        for upstream, service in self._service_upstreams().items():
            specs = self._instances.get(service, ())
            if self._dynamic.get(upstream) == specs:
                continue
            old = {(h, p) for h, p, _ in self._dynamic.get(upstream, ())}
            new = {(h, p) for h, p, _ in specs}
            self._dynamic[upstream] = specs
            changed = True
            for host, port in sorted(new - old):
                log.info(
                    "upstream %s: instance %s of %s joined",
                    upstream,
                    endpoint_label(host, port),
                    service,
                )
            for host, port in sorted(old - new):
                log.info(
                    "upstream %s: instance %s of %s left",
                    upstream,
                    endpoint_label(host, port),
                    service,
                )
            for slot in self._slots:
                self._send(slot, (messages.ENDPOINTS, upstream, specs))
        if changed:
            self._configure_health()

    # -- admin

    async def _start_admin(self) -> None:
        admin = self.config.gateway.admin
        try:
            sock = listen_socket(admin.listen.host, admin.listen.port, reuse_port=False)
        except OSError as exc:
            self._reservation.close()
            raise SupervisorError(
                f"cannot listen on gateway.admin.listen {admin.listen}: {exc.strerror}; "
                "pick another port"
            ) from None
        self.admin_port = sock.getsockname()[1]
        self.token = AdminToken.resolve(admin, self.admin_port)
        try:
            await self._start_registry()
        except BaseException:
            sock.close()
            self._reservation.close()
            raise
        app = create_admin_app(
            self, self.token, registry=self.registry, registry_token=self.registry_token
        )
        context = None
        if admin.tls is not None:
            try:
                context = admin_context(admin.tls)
            except ConfigError as exc:
                sock.close()
                self._reservation.close()
                raise SupervisorError(str(exc)) from None
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            loop="none",
            ssl_context_factory=None if context is None else lambda _config, _default: context,
        )
        self._admin = _EmbeddedServer(config)
        self._admin_task = asyncio.get_running_loop().create_task(self._admin.serve([sock]))


def _path(token: AdminToken) -> str | None:
    return None if token.path is None else str(token.path)
