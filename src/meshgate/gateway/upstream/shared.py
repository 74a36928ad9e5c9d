"""Health shared between gateway nodes through Redis.

Each node's supervisor writes the endpoints it finds out (ejected by outlier
detection, or failing active checks) into one Redis hash per upstream, with the time
until which they are out, and announces changes on a channel. Every node reads the
others' entries and takes those endpoints out of rotation too, until that time. An
entry is refreshed while its endpoint stays out and simply expires otherwise, so a
node that dies cannot leave an endpoint out forever. When Redis is unreachable,
each node keeps its own view and retries; nothing blocks the data plane.

Keys: ``{prefix}:health:{upstream}`` (hash: ``label|node`` -> UNIX time) and the
channel ``{prefix}:health``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from meshgate.config.model import Config

__all__ = ["SharedHealth"]

log = logging.getLogger("meshgate.gateway.health")

_POLL = 2.0  # seconds between full reads, in case a change announcement was missed
_ACTIVE_HOLD = 10.0  # how long an actively-unhealthy entry lasts unless refreshed

Changed = Callable[[str, str, float], None]
"""Called with (upstream, endpoint label, out until as time.monotonic(); 0: back)."""


class SharedHealth:
    """One node's link to the shared health in Redis."""

    def __init__(self, changed: Changed) -> None:
        self.node = os.urandom(6).hex()
        self._changed = changed
        self._upstreams: dict[str, tuple[str, str]] = {}  # name -> (url, prefix)
        self._clients: dict[str, Any] = {}
        self._local: dict[tuple[str, str], float] = {}  # (upstream, label) -> until (wall)
        # Endpoints this node's active checks find unhealthy: their entries are
        # refreshed while that lasts; ejections keep the end time they were given.
        self._unhealthy: set[tuple[str, str]] = set()
        self._remote: dict[tuple[str, str], float] = {}
        self._task: asyncio.Task[None] | None = None
        self.error: str | None = None

    def configure(self, config: Config) -> None:
        """Share the upstreams that ask for it (``health.shared``)."""
        self._upstreams = {
            name: (up.health.shared.redis, up.health.shared.key_prefix)
            for name, up in config.upstreams.items()
            if up.health.shared is not None
        }
        if self._upstreams and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def report(self, upstream: str, label: str, until: float | None) -> None:
        """This node finds ``label`` out until ``until`` (UNIX time), or back (None)."""
        if upstream not in self._upstreams:
            return
        key = (upstream, label)
        if until is None:
            self._local.pop(key, None)
        else:
            self._local[key] = until
        if self._task is not None:
            asyncio.get_running_loop().create_task(self._publish(upstream))

    def report_unhealthy(self, upstream: str, label: str, healthy: bool) -> None:
        """Active checks: out (refreshed while it lasts), or back."""
        key = (upstream, label)
        if healthy:
            self._unhealthy.discard(key)
        else:
            self._unhealthy.add(key)
        self.report(upstream, label, None if healthy else time.time() + _ACTIVE_HOLD)

    async def stop(self) -> None:
        """Remove this node's entries and close the connections."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._local.clear()
        for upstream in self._upstreams:
            with contextlib.suppress(Exception):
                await self._publish(upstream)
        for client in self._clients.values():
            with contextlib.suppress(Exception):
                await client.aclose()

    # -- internals

    def _client(self, url: str) -> Any:
        client = self._clients.get(url)
        if client is None:
            try:
                import redis.asyncio as redis  # noqa: PLC0415 - optional dependency
            except ImportError:  # pragma: no cover - checked at startup
                raise RuntimeError(
                    "health.shared needs the redis package: pip install 'meshgate[redis]'"
                ) from None
            client = self._clients[url] = redis.from_url(
                url, socket_timeout=2, socket_connect_timeout=2
            )
        return client

    async def _publish(self, upstream: str) -> None:
        url, prefix = self._upstreams[upstream]
        key = f"{prefix}:health:{upstream}"
        now = time.time()
        mine = {
            f"{label}|{self.node}": str(until)
            for (name, label), until in self._local.items()
            if name == upstream and until > now
        }
        try:
            client = self._client(url)
            fields = [f for f in await client.hkeys(key) if f.decode().endswith(f"|{self.node}")]
            async with client.pipeline(transaction=True) as pipe:
                stale = [f for f in fields if f.decode() not in mine]
                if stale:
                    pipe.hdel(key, *stale)
                if mine:
                    pipe.hset(key, mapping=mine)
                pipe.expire(key, 3600)
                pipe.publish(f"{prefix}:health", upstream)
                await pipe.execute()
            self._ok()
        except Exception as exc:  # noqa: BLE001 - any Redis failure is just logged
            self._failed(exc)

    async def _read(self, upstream: str) -> None:
        url, prefix = self._upstreams[upstream]
        entries = await self._client(url).hgetall(f"{prefix}:health:{upstream}")
        now_wall = time.time()
        now_mono = time.monotonic()
        seen: dict[str, float] = {}
        for raw_field, raw_until in entries.items():
            label, _, node = raw_field.decode().rpartition("|")
            until = float(raw_until)
            if node != self.node and until > now_wall:
                seen[label] = max(seen.get(label, 0.0), until)
        for label, until in seen.items():
            key = (upstream, label)
            if self._remote.get(key) != until:
                self._remote[key] = until
                self._changed(upstream, label, now_mono + (until - now_wall))
        for key in [k for k in self._remote if k[0] == upstream and k[1] not in seen]:
            del self._remote[key]
            self._changed(upstream, key[1], 0.0)

    async def _run(self) -> None:
        """Poll every upstream's entries, refresh ours, and follow announcements."""
        listeners = {
            url: asyncio.get_running_loop().create_task(self._listen(url, prefix))
            for url, prefix in set(self._upstreams.values())
        }
        try:
            while True:
                now = time.time()
                for key, until in list(self._local.items()):
                    if key in self._unhealthy:
                        # Still failing its checks: keep the entry alive.
                        self._local[key] = max(until, now + _ACTIVE_HOLD)
                    elif until <= now:
                        del self._local[key]  # an ejection that is over
                for upstream in self._upstreams:
                    try:
                        await self._publish(upstream)
                        await self._read(upstream)
                        self._ok()
                    except Exception as exc:  # noqa: BLE001
                        self._failed(exc)
                await asyncio.sleep(_POLL)
        finally:
            for task in listeners.values():
                task.cancel()

    async def _listen(self, url: str, prefix: str) -> None:
        while True:
            try:
                pubsub = self._client(url).pubsub()
                await pubsub.subscribe(f"{prefix}:health")
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        upstream = message["data"].decode()
                        if upstream in self._upstreams:
                            await self._read(upstream)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                self._failed(exc)
                await asyncio.sleep(_POLL)

    def _ok(self) -> None:
        if self.error is not None:
            log.warning("shared health: Redis is reachable again")
            self.error = None

    def _failed(self, exc: Exception) -> None:
        message = f"{type(exc).__name__}: {exc}"
        if self.error != message:
            log.warning("shared health: Redis unavailable (%s); keeping this node's view", message)
        self.error = message
