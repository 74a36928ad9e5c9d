"""The embedded registry: the contract, TTL eviction, and SQLite persistence."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from meshgate.registry import (
    InstanceSpec,
    InvalidNameError,
    MemoryRegistry,
    RegistryClosedError,
    RegistryError,
    RegistryStoreError,
    Snapshot,
)

SPEC = InstanceSpec(address="10.0.0.1:8080", version="1.0", ttl=10)


async def test_register_heartbeat_deregister_and_list(registry: MemoryRegistry) -> None:
    a = await registry.register("users", "a", SPEC)
    assert (a.service, a.id, a.address, a.index) == ("users", "a", "10.0.0.1:8080", 1)
    b = await registry.register("users", "b", SPEC.model_copy(update={"address": "10.0.0.2:80"}))
    o = await registry.register("orders", "x", SPEC)
    assert (b.index, o.index, registry.index) == (2, 3, 3)

    users = await registry.snapshot("users")
    assert users.service == "users"
    assert users.index == 2  # the service's modify index, not the registry's
    assert [i.id for i in users.instances] == ["a", "b"]
    everything = await registry.snapshot()
    assert everything.index == 3
    assert [(i.service, i.id) for i in everything.instances] == [
        ("orders", "x"),
        ("users", "a"),
        ("users", "b"),
    ]

    beat = await registry.heartbeat("users", "a")
    assert beat is not None
    assert beat.index == 1
    assert beat.last_heartbeat >= a.last_heartbeat
    assert registry.index == 3  # a heartbeat is not a change

    assert await registry.deregister("users", "a") is True
    assert await registry.deregister("users", "a") is False
    assert await registry.heartbeat("users", "a") is None
    assert await registry.heartbeat("nobody", "a") is None
    assert registry.index == 4
    assert [i.id for i in (await registry.snapshot("users")).instances] == ["b"]
    assert await registry.snapshot("unknown") == Snapshot(index=0, service="unknown")


async def test_registering_again_same_spec_is_a_heartbeat_new_spec_a_change(
    registry: MemoryRegistry,
) -> None:
    first = await registry.register("users", "a", SPEC)
    again = await registry.register("users", "a", SPEC)
    assert again.index == first.index == registry.index == 1
    changed = await registry.register("users", "a", SPEC.model_copy(update={"version": "2.0"}))
    assert changed.index == registry.index == 2
    assert changed.version == "2.0"
    assert changed.registered_at == first.registered_at  # the same life of the instance


async def test_bad_names_are_refused(registry: MemoryRegistry) -> None:
    with pytest.raises(InvalidNameError, match="service: 'a/b' is not a valid service"):
        await registry.register("a/b", "x", SPEC)
    with pytest.raises(InvalidNameError, match="instance id"):
        await registry.heartbeat("users", "")
    with pytest.raises(InvalidNameError):
        await registry.snapshot("-x")


async def test_wait_returns_on_change_or_after_timeout(registry: MemoryRegistry) -> None:
    await registry.register("users", "a", SPEC)
    started = time.monotonic()
    same = await registry.wait(1, "users", timeout=0.1)
    assert same.index == 1
    assert 0.09 <= time.monotonic() - started < 1

    waiter = asyncio.create_task(registry.wait(1, "users", timeout=10))
    other = asyncio.create_task(registry.wait(1, "orders", timeout=0.3))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await registry.register("users", "b", SPEC)
    got = await asyncio.wait_for(waiter, 1)
    assert got.index == 2
    assert [i.id for i in got.instances] == ["a", "b"]
    # A watcher of another service is not answered with a change of this one.
    assert (await other).index == 0

    # An index ahead of the registry's (its store was reset) answers at once.
    ahead = await asyncio.wait_for(registry.wait(99, "users", timeout=10), 1)
    assert ahead.index == 2


async def test_changes_yields_current_then_every_state_and_ends_on_close() -> None:
    reg = MemoryRegistry()
    await reg.start()
    seen: list[Snapshot] = []
    heard = asyncio.Event()

    async def watch() -> None:
        async for snapshot in reg.changes("users"):
            seen.append(snapshot)
            heard.set()

    task = asyncio.create_task(watch())
    await asyncio.wait_for(heard.wait(), 1)
    assert seen[0].index == 0
    for name in ("a", "b", "c"):
        heard.clear()
        await reg.register("users", name, SPEC)
        await asyncio.wait_for(heard.wait(), 1)
    assert [s.index for s in seen] == [0, 1, 2, 3]
    await reg.close()
    await asyncio.wait_for(task, 1)  # the watch ends when the registry closes
    with pytest.raises(RegistryClosedError):
        await reg.register("users", "d", SPEC)


async def test_not_started_registry_says_to_start_it() -> None:
    reg = MemoryRegistry()
    with pytest.raises(RegistryError, match=r"await registry\.start"):
        await reg.register("users", "a", SPEC)
    await reg.close()


async def test_ttl_eviction_is_heard_by_a_watcher_within_a_second(
    registry: MemoryRegistry,
) -> None:
    await registry.register("users", "keep", SPEC)
    await registry.register("users", "gone", SPEC.model_copy(update={"ttl": 1.0}))
    lapses_at = time.monotonic() + 1.0
    index = registry.index
    async with asyncio.timeout(5):
        async for snapshot in registry.changes("users", index):
            heard_at, evicted = time.monotonic(), snapshot
            break
    latency = heard_at - lapses_at
    assert [i.id for i in evicted.instances] == ["keep"]
    assert -0.05 < latency < 1.0, f"eviction heard {latency:.3f}s after the TTL lapsed"
    assert registry.evictions == 1


async def test_a_heartbeat_after_the_ttl_lapsed_does_not_count() -> None:
    # The reaper runs once a second here; the heartbeat lands between TTL and reaper.
    async with MemoryRegistry(reap_interval=1.0) as reg:
        await reg.register("users", "a", SPEC.model_copy(update={"ttl": 1.0}))
        await asyncio.sleep(1.02)
        assert await reg.heartbeat("users", "a") is None
        assert (await reg.snapshot("users")).instances == ()
        assert reg.index == 2


def test_reap_interval_is_checked() -> None:
    with pytest.raises(ValueError, match="within a second"):
        MemoryRegistry(reap_interval=2)


async def test_persisted_state_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "state" / "registry.sqlite"
    async with MemoryRegistry(path) as reg:
        a = await reg.register("users", "a", SPEC)
        await reg.register("users", "b", SPEC)
        await reg.register("orders", "x", SPEC)
        await reg.deregister("orders", "x")
        index = reg.index
        assert index == 4

    async with MemoryRegistry(path) as reg:
        assert reg.index == index  # the index never goes backwards
        users = await reg.snapshot("users")
        assert [i.id for i in users.instances] == ["a", "b"]
        assert users.instances[0].registered_at == a.registered_at
        orders = await reg.snapshot("orders")
        assert orders.instances == ()
        assert orders.index == 4  # a watcher of orders still sees it emptied
        # Restored instances heartbeat as usual.
        assert await reg.heartbeat("users", "a") is not None
        c = await reg.register("users", "c", SPEC)
        assert c.index == index + 1


async def test_evictions_are_persisted(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite"
    async with MemoryRegistry(path) as reg:
        await reg.register("users", "a", SPEC.model_copy(update={"ttl": 1.0}))
        await asyncio.wait_for(reg.wait(1, "users"), 3)
        index = reg.index
        assert index == 2
    async with MemoryRegistry(path) as reg:
        assert reg.index == index
        assert (await reg.snapshot()).instances == ()


async def test_a_second_registry_cannot_use_the_same_file(
    tmp_path: Path, persisted: MemoryRegistry
) -> None:
    assert persisted.path is not None
    other = MemoryRegistry(persisted.path)
    with pytest.raises(RegistryStoreError, match="another process"):
        await other.start()
    await other.close()


async def test_a_file_that_is_not_a_registry_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    reg = MemoryRegistry(path)
    with pytest.raises(RegistryStoreError, match="move it away"):
        await reg.start()
    await reg.close()


async def test_a_file_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    db.close()
    reg = MemoryRegistry(path)
    with pytest.raises(RegistryStoreError, match="newer meshgate"):
        await reg.start()
    await reg.close()
