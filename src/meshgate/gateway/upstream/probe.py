"""Active health checks: the supervisor probes each endpoint over HTTP.

Probing once per gateway node (not once per worker) keeps the load on upstreams
independent of the worker count; the supervisor pushes every change to all workers.
A probe is ``GET <path>`` with ``Connection: close`` (over TLS, verified as the
gateway's requests are, when the upstream has ``tls``); a 2xx or 3xx answer within
the timeout is a success. ``unhealthy_threshold`` failures in a row take an endpoint
out, ``healthy_threshold`` successes in a row bring it back. Endpoints start
healthy, so a gateway serves at once when it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from meshgate.config.model import ActiveHealthSettings, Config
from meshgate.gateway.tls import upstream_context
from meshgate.gateway.upstream.pool import endpoint_label

if TYPE_CHECKING:
    from meshgate.gateway.runtime import EndpointSpec

__all__ = ["EndpointHealth", "Prober", "probe_once"]

log = logging.getLogger("meshgate.gateway.health")

Changed = Callable[[str, str, bool], None]
"""Called with (upstream, endpoint label, healthy) when an endpoint's state flips."""


@dataclass
class EndpointHealth:
    """The active-check state of one endpoint."""

    healthy: bool = True
    successes: int = 0
    failures: int = 0
    last_error: str | None = None
    checks: int = 0


async def probe_once(
    host: str,
    port: int,
    path: str,
    timeout: float,
    *,
    context: ssl.SSLContext | None = None,
    server_name: str | None = None,
) -> str | None:
    """Probe ``host:port`` (over TLS with ``context``); None when healthy, else what
    went wrong."""
    label = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                host,
                port,
                ssl=context,
                server_hostname=(server_name or host) if context is not None else None,
            )
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {label}\r\nUser-Agent: meshgate-health\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            line = await reader.readline()
    except TimeoutError:
        return f"no answer within {timeout:g}s"
    except ssl.SSLError as exc:
        return f"TLS handshake failed: {exc.reason or exc}"
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    parts = line.split()
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return f"not an HTTP response: {line[:60]!r}"
    status = int(parts[1])
    if 200 <= status < 400:
        return None
    return f"status {status}"


@dataclass
class _Target:
    upstream: str
    host: str
    port: int
    label: str
    settings: ActiveHealthSettings
    context: ssl.SSLContext | None = None
    server_name: str | None = None
    state: EndpointHealth = field(default_factory=EndpointHealth)
    task: asyncio.Task[None] | None = None


class Prober:
    """Runs the active checks of every upstream that asks for them."""

    def __init__(self, changed: Changed) -> None:
        self._changed = changed
        self._targets: dict[tuple[str, str], _Target] = {}

    def configure(
        self, config: Config, dynamic: Mapping[str, Sequence[EndpointSpec]] | None = None
    ) -> None:
        """(Re)start probes for ``config``, whose service upstreams have the
        endpoints in ``dynamic``; endpoints that stay keep their state."""
        wanted: dict[tuple[str, str], _Target] = {}
        for name, upstream in config.upstreams.items():
            active = upstream.health.active
            if active is None:
                continue
            tls = upstream.tls
            context = upstream_context(tls, f"upstreams.{name}.tls") if tls is not None else None
            server_name = tls.server_name if tls is not None else None
            if upstream.service is not None:
                hosts = [(h, p) for h, p, _ in (dynamic or {}).get(name, ())]
            else:
                hosts = [(e.address.host, e.address.port) for e in upstream.endpoints]
            for host, port in hosts:
                label = endpoint_label(host, port)
                key = (name, label)
                old = self._targets.get(key)
                target = _Target(name, host, port, label, active, context, server_name)
                if old is not None:
                    target.state = old.state
                wanted[key] = target
        for key, old in self._targets.items():
            if old.task is not None:
                old.task.cancel()
            if key not in wanted and not old.state.healthy:
                # No longer probed: it counts as healthy again.
                self._changed(old.upstream, old.label, True)
        self._targets = wanted
        for target in wanted.values():
            target.task = asyncio.get_running_loop().create_task(self._run(target))

    def states(self) -> dict[tuple[str, str], EndpointHealth]:
        """Every probed endpoint's state."""
        return {key: target.state for key, target in self._targets.items()}

    async def _run(self, target: _Target) -> None:
        settings = target.settings
        # Spread first probes over the interval so that they do not all fire at once.
        await asyncio.sleep(random.random() * min(settings.interval, 1.0))  # noqa: S311
        while True:
            error = await probe_once(
                target.host,
                target.port,
                settings.path,
                settings.timeout,
                context=target.context,
                server_name=target.server_name,
            )
            self._record(target, error)
            await asyncio.sleep(settings.interval)

    def _record(self, target: _Target, error: str | None) -> None:
        state = target.state
        settings = target.settings
        state.checks += 1
        state.last_error = error
        if error is None:
            state.successes += 1
            state.failures = 0
            if not state.healthy and state.successes >= settings.healthy_threshold:
                state.healthy = True
                log.warning("upstream %s: %s is healthy again", target.upstream, target.label)
                self._changed(target.upstream, target.label, True)
        else:
            state.failures += 1
            state.successes = 0
            if state.healthy and state.failures >= settings.unhealthy_threshold:
                state.healthy = False
                log.warning(
                    "upstream %s: %s is unhealthy (%s)", target.upstream, target.label, error
                )
                self._changed(target.upstream, target.label, False)

    def stop(self) -> None:
        """Cancel every probe."""
        for target in self._targets.values():
            if target.task is not None:
                target.task.cancel()
