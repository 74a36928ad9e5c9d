"""The embedded registry: the contract, TTL eviction, and SQLite persistence."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from meshgate.registry import (
    InstanceSpec,
    MemoryRegistry,
    RegistryError,
    RegistryStoreError,
)

SPEC = InstanceSpec(address="10.0.0.1:8080", version="1.0", ttl=10)


async def test_not_started_registry_says_to_start_it() -> None:
    reg = MemoryRegistry()
    with pytest.raises(RegistryError, match=r"await registry\.start"):
        await reg.register("users", "a", SPEC)
    await reg.close()


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
