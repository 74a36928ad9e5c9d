"""The registry contract every backend implements, and the parts they share.

The index
    A registry keeps one integer index, bumped by every change: a new instance, an
    instance registering again with a different spec, a deregistration, an eviction.
    A plain heartbeat (or registering again with the same spec) changes nothing and
    does not bump it. Each service also keeps its *modify index*: the registry index
    at its last change, so that a watcher of one service is not woken by another.
    The index only grows; it survives restarts (SQLite) and is shared (Redis).

Watching
    ``wait(index, service)`` returns as soon as the (service's) index is past
    ``index``, or the current snapshot at the timeout; ``changes()`` loops on it.
    Watchers get *states*, not events: two changes that land between two reads come
    as one snapshot, but the last state is always delivered, and an index never
    comes twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

from meshgate.registry.errors import RegistryClosedError, RegistryError, RegistryUnavailableError
from meshgate.registry.model import Instance, InstanceSpec, Snapshot, check_name

__all__ = ["Registry"]

log = logging.getLogger("meshgate.registry")

DEFAULT_WAIT = 30.0
"""How long ``wait`` waits for a change when not told."""
_CHANGES_WAIT = 60.0
_RETRY_FIRST = 0.1
_RETRY_CAP = 5.0


@runtime_checkable
class Registry(Protocol):
    """A service registry: instances register with a TTL, heartbeat, deregister,
    and watchers hear of every change.

    Service names and instance ids are validated (:class:`InvalidNameError`). A
    backend that cannot reach its store raises :class:`RegistryUnavailableError`
    and recovers when the store is back; a closed registry raises
    :class:`RegistryClosedError`.
    """

    evictions: int
    """Instances this registry evicted because they missed their TTL (with a shared
    store, those this node's reaper evicted); see :mod:`meshgate.registry.metrics`."""

    async def start(self) -> None:
        """Load persisted state or connect, and start the reaper. Call once before use."""

    async def close(self) -> None:
        """Stop the reaper, release waiting watchers (with :class:`RegistryClosedError`)
        and close the store. Idempotent."""

    async def register(self, service: str, instance_id: str, spec: InstanceSpec) -> Instance:
        """Register (or refresh) an instance; its TTL starts now.

        Registering again with the same spec is a heartbeat; with another spec it
        replaces the spec (and bumps the index)."""
        ...

    async def heartbeat(self, service: str, instance_id: str) -> Instance | None:
        """Extend the instance's TTL; None if it is not registered (never was, was
        deregistered, or its TTL lapsed): the caller must register it again."""
        ...

    async def deregister(self, service: str, instance_id: str) -> bool:
        """Remove an instance; False if it was not registered."""
        ...

    async def snapshot(self, service: str | None = None) -> Snapshot:
        """The current instances of ``service`` (or of every service)."""
        ...

    async def wait(
        self, index: int, service: str | None = None, timeout: float = DEFAULT_WAIT
    ) -> Snapshot:
        """The snapshot of ``service`` (or of all) as soon as its index is past
        ``index``; the current one after ``timeout`` seconds without a change.

        An ``index`` ahead of the registry's (its store was reset) returns at once
        with the lower index: start again from there."""
        ...

    def changes(
        self, service: str | None = None, index: int | None = None
    ) -> AsyncIterator[Snapshot]:
        """Every new state of ``service`` (or of all): first the current one (unless
        ``index`` is given: then only states past it), then one per change, each with
        a higher index (lower only if the store was reset). Rides out a store that
        is unavailable for a while; ends when the registry closes."""
        ...


class Notifier:
    """Wakes the watchers of a service (and of everything) when it changes.

    Take a :meth:`ticket` *before* reading state, then :meth:`wait` with it: a
    change between the read and the wait is not lost.
    """

    def __init__(self) -> None:
        self._versions: dict[str | None, int] = {}
        self._epoch = 0  # bumped when anything may have changed
        self._waiters: dict[str | None, set[asyncio.Future[None]]] = {}
        self.closed = False

    def ticket(self, service: str | None) -> int:
        # Both parts only grow, so the sum changes when either does.
        return self._versions.get(service, 0) + self._epoch

    def notify(self, service: str | None) -> None:
        """``service`` changed; None: anything may have changed (wakes everyone)."""
        if service is None:
            self._epoch += 1
            keys: list[str | None] = list(self._waiters)
        else:
            keys = [service, None]
            for key in keys:
                self._versions[key] = self._versions.get(key, 0) + 1
        for key in keys:
            for waiter in self._waiters.pop(key, ()):
                if not waiter.done():
                    waiter.set_result(None)

    def close(self) -> None:
        self.closed = True
        self.notify(None)

    async def wait(self, service: str | None, ticket: int, timeout: float) -> None:
        """Return when ``service`` changed after ``ticket`` was taken, or at ``timeout``."""
        if self.closed or self.ticket(service) != ticket or timeout <= 0:
            return
        waiter = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(service, set())
        waiters.add(waiter)
        try:
            await asyncio.wait((waiter,), timeout=timeout)
        finally:
            waiters.discard(waiter)
            if not waiters and self._waiters.get(service) is waiters:
                del self._waiters[service]
            waiter.cancel()


class BaseRegistry:
    """What the backends share: the ``wait`` loop, ``changes``, the open/closed state.

    A backend implements ``_read`` (a snapshot and the registry's index, read
    together) and calls ``self._notifier.notify(service)`` after every change it
    makes or hears of.
    """

    def __init__(self) -> None:
        self._notifier = Notifier()
        self._started = False
        self._closed = False

    async def start(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def snapshot(self, service: str | None = None) -> Snapshot:
        if service is not None:
            check_name(service, "service")
        self._check_open()
        snapshot, _ = await self._read(service)
        return snapshot

    async def _read(self, service: str | None) -> tuple[Snapshot, int]:
        raise NotImplementedError

    async def wait(
        self, index: int, service: str | None = None, timeout: float = DEFAULT_WAIT
    ) -> Snapshot:
        if service is not None:
            check_name(service, "service")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        while True:
            self._check_open()
            ticket = self._notifier.ticket(service)
            snapshot, top = await self._read(service)
            if snapshot.index > index or index > top:
                return snapshot
            remaining = deadline - loop.time()
            if remaining <= 0:
                return snapshot
            await self._notifier.wait(service, ticket, remaining)

    async def changes(
        self, service: str | None = None, index: int | None = None
    ) -> AsyncIterator[Snapshot]:
        failures = 0
        while True:
            try:
                if index is None:
                    snapshot = await self.snapshot(service)
                else:
                    snapshot = await self.wait(index, service, _CHANGES_WAIT)
            except RegistryClosedError:
                return
            except RegistryUnavailableError as exc:
                # Keep the last state and try again: a watcher (the gateway's endpoint
                # provider) must ride out a Redis restart, not give up.
                if failures == 0:
                    log.warning("registry watch of %s: %s; retrying", service or "*", exc)
                failures += 1
                await asyncio.sleep(backoff(failures))
                continue
            if failures:
                log.info("registry watch of %s: the registry is reachable again", service or "*")
                failures = 0
            if snapshot.index != index:
                index = snapshot.index
                yield snapshot

    def _check_open(self) -> None:
        if self._closed:
            raise RegistryClosedError("the registry is closed")
        if not self._started:
            raise RegistryError("the registry is not started; call 'await registry.start()' first")

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def backoff(failures: int, first: float = _RETRY_FIRST, cap: float = _RETRY_CAP) -> float:
    """Seconds to wait after ``failures`` failures in a row: capped exponential with
    full jitter, so that many watchers do not retry in step."""
    ceiling = min(cap, first * 2 ** min(failures - 1, 30))
    return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not security


async def cancel_task(task: asyncio.Task[None] | None) -> None:
    """Cancel ``task`` and wait until it ended.

    Cancels again while it runs: a library that swallows a cancellation (Python
    3.11's ``asyncio.wait_for`` does when the awaited result lands at the same time)
    must not leave the task running forever."""
    while task is not None and not task.done():
        task.cancel()
        await asyncio.wait((task,), timeout=0.1)
    if task is not None and not task.cancelled():
        with contextlib.suppress(asyncio.CancelledError):
            task.result()
