"""The registry contract, written once and run against every backend: the embedded
memory registry and Redis (on 127.0.0.1:6379; skipped when it is not there, unless
MESHGATE_REQUIRE_SERVICES=1). What only one backend does (SQLite persistence, nodes
sharing a Redis) is in test_memory.py and test_redis.py."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from meshgate.registry import (
    InstanceSpec,
    InvalidNameError,
    MemoryRegistry,
    Registry,
    RegistryClosedError,
    Snapshot,
)
from tests.conftest import service_url

SPEC = InstanceSpec(address="10.0.0.1:8080", version="1.0", ttl=10)
SHORT = InstanceSpec(address="10.0.0.1:8080", ttl=1.0)
URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.services)])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Registry]:
    """A started registry of each kind, closed (and its Redis keys deleted) after."""
    if request.param == "memory":
        async with MemoryRegistry(reap_interval=0.2) as memory:
            yield memory
        return
    service_url("redis")
    import redis.asyncio as redis

    from meshgate.registry.redis import RedisRegistry

    prefix = f"meshgate-test-{uuid.uuid4().hex}"
    registry = RedisRegistry(URL, prefix=prefix, reap_interval=0.2)
    await registry.start()
    try:
        yield registry
    finally:
        await registry.close()
        client = redis.from_url(URL)
        keys = [key async for key in client.scan_iter(match=f"{{{prefix}}}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


def ids(snapshot: Snapshot) -> list[str]:
    return [i.id for i in snapshot.instances]


async def test_register_heartbeat_deregister_and_list(backend: Registry) -> None:
    a = await backend.register("users", "a", SPEC)
    assert (a.service, a.id, a.address, a.index) == ("users", "a", "10.0.0.1:8080", 1)
    b = await backend.register("users", "b", SPEC.model_copy(update={"address": "10.0.0.2:80"}))
    o = await backend.register("orders", "x", SPEC)
    assert (b.index, o.index) == (2, 3)

    users = await backend.snapshot("users")
    assert users.service == "users"
    assert users.index == 2  # the service's modify index, not the registry's
    assert ids(users) == ["a", "b"]
    assert users.instances[1].address == "10.0.0.2:80"
    everything = await backend.snapshot()
    assert everything.index == 3
    assert [(i.service, i.id) for i in everything.instances] == [
        ("orders", "x"),
        ("users", "a"),
        ("users", "b"),
    ]

    beat = await backend.heartbeat("users", "a")
    assert beat is not None
    assert beat.index == 1
    assert beat.registered_at == a.registered_at
    assert beat.last_heartbeat >= a.last_heartbeat
    assert (await backend.snapshot()).index == 3  # a heartbeat is not a change

    assert await backend.deregister("users", "a") is True
    assert await backend.deregister("users", "a") is False
    assert await backend.heartbeat("users", "a") is None
    assert await backend.heartbeat("nobody", "a") is None
    users = await backend.snapshot("users")
    assert (users.index, ids(users)) == (4, ["b"])
    assert await backend.snapshot("unknown") == Snapshot(index=0, service="unknown")


async def test_registering_again_same_spec_is_a_heartbeat_new_spec_a_change(
    backend: Registry,
) -> None:
    first = await backend.register("users", "a", SPEC)
    again = await backend.register("users", "a", SPEC)
    assert again.index == first.index == (await backend.snapshot()).index == 1
    changed = await backend.register("users", "a", SPEC.model_copy(update={"version": "2.0"}))
    assert changed.index == (await backend.snapshot()).index == 2
    assert changed.version == "2.0"
    assert changed.registered_at == first.registered_at  # the same life of the instance


async def test_bad_names_are_refused(backend: Registry) -> None:
    with pytest.raises(InvalidNameError, match="service: 'a/b' is not a valid service"):
        await backend.register("a/b", "x", SPEC)
    with pytest.raises(InvalidNameError, match="instance id"):
        await backend.heartbeat("users", "")
    with pytest.raises(InvalidNameError):
        await backend.snapshot("-x")


async def test_ttl_eviction_is_heard_by_a_watcher_within_a_second(backend: Registry) -> None:
    await backend.register("users", "keep", SPEC)
    await backend.register("users", "gone", SHORT)
    lapses_at = time.monotonic() + SHORT.ttl
    index = (await backend.snapshot("users")).index
    async with asyncio.timeout(5):
        async for snapshot in backend.changes("users", index):
            heard_at, evicted = time.monotonic(), snapshot
            break
    latency = heard_at - lapses_at
    assert ids(evicted) == ["keep"]
    assert -0.05 < latency < 1.0, f"eviction heard {latency:.3f}s after the TTL lapsed"
    await asyncio.sleep(0.3)  # the reaper ran again: nothing is evicted twice
    assert backend.evictions == 1  # type: ignore[attr-defined]


async def test_changes_yield_the_current_state_then_every_change_and_end_on_close(
    backend: Registry,
) -> None:
    seen: list[Snapshot] = []
    heard = asyncio.Event()

    async def watch() -> None:
        async for snapshot in backend.changes("users"):
            seen.append(snapshot)
            heard.set()

    task = asyncio.create_task(watch())
    await asyncio.wait_for(heard.wait(), 2)
    assert seen[0].index == 0
    for name in ("a", "b", "c"):
        heard.clear()
        await backend.register("users", name, SPEC)
        await asyncio.wait_for(heard.wait(), 2)
    assert [s.index for s in seen] == [0, 1, 2, 3]
    await backend.close()
    await asyncio.wait_for(task, 2)  # the watch ends when the registry closes
    with pytest.raises(RegistryClosedError):
        await backend.register("users", "d", SPEC)


async def test_wait_returns_on_a_change_of_its_service_or_after_its_timeout(
    backend: Registry,
) -> None:
    await backend.register("users", "a", SPEC)
    started = time.monotonic()
    same = await backend.wait(1, "users", timeout=0.1)
    assert same.index == 1
    assert 0.09 <= time.monotonic() - started < 1

    waiter = asyncio.create_task(backend.wait(1, "users", timeout=10))
    other = asyncio.create_task(backend.wait(1, "orders", timeout=0.3))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await backend.register("users", "b", SPEC)
    got = await asyncio.wait_for(waiter, 2)
    assert (got.index, ids(got)) == (2, ["a", "b"])
    # A watcher of another service is not answered with a change of this one.
    assert (await other).index == 0
