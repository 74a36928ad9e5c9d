"""The embedded registry: state in memory, optionally persisted to one SQLite file.

TTLs run on the monotonic clock, so a wall-clock step (NTP, a VM resumed) neither
evicts nor keeps anything. The reaper runs every ``reap_interval`` seconds: an
instance is gone at most ``reap_interval`` after its TTL lapsed, and a heartbeat
that arrives after the TTL lapsed is refused (the caller registers again), so
eviction does not depend on when the reaper happens to run.

With ``persist``, every change is committed to the file before it is applied and
answered. Heartbeats are not written (they would be most of the writes): after a
restart every restored instance gets a fresh TTL from the moment of the restart,
its grace to heartbeat again; those that do not are evicted as usual.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from meshgate.registry._sqlite import Change, SqliteStore
from meshgate.registry.errors import RegistryClosedError, RegistryUnavailableError
from meshgate.registry.model import Instance, InstanceSpec, Snapshot, check_name
from meshgate.registry.store import BaseRegistry, cancel_task

__all__ = ["MemoryRegistry"]

log = logging.getLogger("meshgate.registry")


@dataclass(slots=True)
class _Entry:
    instance: Instance
    spec: InstanceSpec
    deadline: float
    """time.monotonic() at which the TTL lapses."""


class MemoryRegistry(BaseRegistry):
    """The registry in this process's memory; with ``persist``, kept in a SQLite file
    so that a restart keeps its instances and its index.

    ``reap_interval`` (seconds) bounds how late after its TTL an instance is evicted.
    Raises :class:`RegistryStoreError` when the file cannot be opened (at
    :meth:`start`) or written (the change is then not made).
    """

    def __init__(self, persist: str | Path | None = None, *, reap_interval: float = 0.2) -> None:
        super().__init__()
        if not 0 < reap_interval <= 1:
            raise ValueError(
                f"reap_interval={reap_interval!r}: give seconds in (0, 1]; watchers must "
                "hear of an eviction within a second"
            )
        self.path = None if persist is None else Path(persist).expanduser()
        """The SQLite file, or None when the registry is not persisted."""
        self.reap_interval = reap_interval
        self.evictions = 0
        """Instances this registry evicted because their TTL lapsed."""
        self._store = None if self.path is None else SqliteStore(self.path)
        self._services: dict[str, dict[str, _Entry]] = {}
        self._service_index: dict[str, int] = {}
        self._index = 0
        self._next_deadline = math.inf  # a lower bound of every deadline
        self._lock = asyncio.Lock()  # one change at a time, in index order
        self._reaper: asyncio.Task[None] | None = None
        self._store_failing = False

    @property
    def index(self) -> int:
        """The registry's current index."""
        return self._index

    async def start(self) -> None:
        if self._started or self._closed:
            return
        if self._store is not None:
            loaded = await self._store.open()
            self._index = loaded.index
            self._service_index = dict(loaded.services)
            now = time.monotonic()
            for instance in loaded.instances:
                self._put(instance, instance.spec, now)
            if loaded.skipped:
                log.warning(
                    "registry file %s: %d instances could not be read back and were "
                    "left out; they are registered again at their next heartbeat",
                    self.path,
                    loaded.skipped,
                )
        self._started = True
        self._reaper = asyncio.get_running_loop().create_task(
            self._reap_loop(), name="meshgate-registry-reaper"
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._notifier.close()
        await cancel_task(self._reaper)
        if self._store is not None and self._started:
            async with self._lock:  # let a change that is being written finish
                await self._store.close()

    # -- the contract

    async def register(self, service: str, instance_id: str, spec: InstanceSpec) -> Instance:
        check_name(service, "service")
        check_name(instance_id, "instance id")
        self._check_open()
        refreshed = self._refresh(service, instance_id, spec)
        if refreshed is not None:
            return refreshed
        async with self._lock:
            self._check_open()
            # Another change may have landed while this one waited for the lock.
            refreshed = self._refresh(service, instance_id, spec)
            if refreshed is not None:
                return refreshed
            entry = self._services.get(service, {}).get(instance_id)
            wall = _now()
            alive = entry is not None and entry.deadline > time.monotonic()
            index = self._index + 1
            instance = Instance.build(
                service,
                instance_id,
                spec,
                registered_at=entry.instance.registered_at if entry and alive else wall,
                last_heartbeat=wall,
                index=index,
            )
            await self._commit([Change(index, {service: index}, upserts=[instance])])
            self._put(instance, spec, time.monotonic())
            self._changed(service, index)
            return instance

    async def heartbeat(self, service: str, instance_id: str) -> Instance | None:
        check_name(service, "service")
        check_name(instance_id, "instance id")
        self._check_open()
        entry = self._services.get(service, {}).get(instance_id)
        if entry is None:
            return None
        now = time.monotonic()
        if entry.deadline > now:
            return self._touch(entry, now)
        # The TTL lapsed and the reaper has not run yet: evict now, so that whether a
        # late heartbeat counts does not depend on the reaper's timing.
        await self._evict_due()
        return None

    async def deregister(self, service: str, instance_id: str) -> bool:
        check_name(service, "service")
        check_name(instance_id, "instance id")
        self._check_open()
        async with self._lock:
            self._check_open()
            if instance_id not in self._services.get(service, {}):
                return False
            index = self._index + 1
            await self._commit([Change(index, {service: index}, deletes=[(service, instance_id)])])
            self._drop(service, instance_id)
            self._changed(service, index)
            return True

    async def _read(self, service: str | None) -> tuple[Snapshot, int]:
        if service is not None:
            entries = self._services.get(service, {})
            instances = tuple(entries[key].instance for key in sorted(entries))
            index = self._service_index.get(service, 0)
        else:
            instances = tuple(
                entry.instance
                for name in sorted(self._services)
                for _, entry in sorted(self._services[name].items())
            )
            index = self._index
        return Snapshot(index=index, instances=instances, service=service), self._index

    # -- internals

    def _refresh(self, service: str, instance_id: str, spec: InstanceSpec) -> Instance | None:
        """The instance, its TTL restarted, if it is alive with this very spec."""
        entry = self._services.get(service, {}).get(instance_id)
        now = time.monotonic()
        if entry is not None and entry.deadline > now and entry.spec == spec:
            return self._touch(entry, now)
        return None

    def _touch(self, entry: _Entry, now: float) -> Instance:
        entry.deadline = now + entry.spec.ttl
        entry.instance = entry.instance.model_copy(update={"last_heartbeat": _now()})
        return entry.instance

    def _put(self, instance: Instance, spec: InstanceSpec, now: float) -> None:
        deadline = now + spec.ttl
        self._services.setdefault(instance.service, {})[instance.id] = _Entry(
            instance, spec, deadline
        )
        self._next_deadline = min(self._next_deadline, deadline)

    def _drop(self, service: str, instance_id: str) -> None:
        entries = self._services[service]
        del entries[instance_id]
        if not entries:
            # The service's modify index stays: a watcher of it must see it emptied.
            del self._services[service]

    def _changed(self, service: str, index: int) -> None:
        self._index = index
        self._service_index[service] = index
        self._notifier.notify(service)

    async def _commit(self, changes: list[Change]) -> None:
        if self._closed:
            raise RegistryClosedError("the registry is closed")
        if self._store is not None:
            await self._store.commit(changes)

    async def _evict_due(self) -> None:
        """Evict every instance whose TTL lapsed, in one transaction."""
        if time.monotonic() < self._next_deadline:
            return
        async with self._lock:
            if self._closed:
                return
            now = time.monotonic()
            due: list[tuple[str, str]] = []
            next_deadline = math.inf
            for service, entries in self._services.items():
                for instance_id, entry in entries.items():
                    if entry.deadline <= now:
                        due.append((service, instance_id))
                    else:
                        next_deadline = min(next_deadline, entry.deadline)
            if not due:
                self._next_deadline = next_deadline
                return
            changes = [
                Change(self._index + n, {service: self._index + n}, deletes=[(service, iid)])
                for n, (service, iid) in enumerate(due, start=1)
            ]
            await self._commit(changes)
            for change, (service, instance_id) in zip(changes, due, strict=True):
                self._drop(service, instance_id)
                self._changed(service, change.index)
                log.info(
                    "registry: evicted %s/%s (no heartbeat within its TTL)", service, instance_id
                )
            self.evictions += len(due)
            self._next_deadline = next_deadline

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(self.reap_interval)
            try:
                await self._evict_due()
            except RegistryUnavailableError as exc:
                # The file cannot be written: evict nothing (the state would differ
                # from the file) and try again at the next tick.
                if not self._store_failing:
                    log.error("registry: cannot evict: %s", exc)  # noqa: TRY400 - the text says it all
                self._store_failing = True
            else:
                if self._store_failing:
                    log.info("registry: the registry file is writable again")
                self._store_failing = False


def _now() -> datetime:
    return datetime.now(UTC)
