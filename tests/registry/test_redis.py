"""The Redis registry against a real Redis on 127.0.0.1:6379 (skipped when it is not
there, unless MESHGATE_REQUIRE_SERVICES=1)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from meshgate.registry import InstanceSpec, RegistryClosedError, Snapshot
from meshgate.registry.redis import RedisRegistry
from meshgate.registry.store import cancel_task
from tests.conftest import service_url

URL = "redis://127.0.0.1:6379/0"
SPEC = InstanceSpec(address="10.0.0.1:8080", version="1.0", ttl=10)
SHORT = InstanceSpec(address="10.0.0.1:8080", ttl=1.0)


pytestmark = pytest.mark.services

service_url("redis", module_level=True)

Factory = Callable[[], Awaitable[RedisRegistry]]


@pytest.fixture
async def nodes() -> AsyncIterator[Factory]:
    """Makes started RedisRegistry objects sharing one fresh key prefix (like gateway
    nodes sharing one Redis); closes them and deletes the keys afterwards."""
    import redis.asyncio as redis

    prefix = f"meshgate-test-{uuid.uuid4().hex}"
    made: list[RedisRegistry] = []

    async def make() -> RedisRegistry:
        registry = RedisRegistry(URL, prefix=prefix, reap_interval=0.2)
        made.append(registry)
        await registry.start()
        return registry

    try:
        yield make
    finally:
        for registry in made:
            await registry.close()
        client = redis.from_url(URL)
        keys = [key async for key in client.scan_iter(match=f"{{{prefix}}}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


def ids(snapshot: Snapshot) -> list[str]:
    return [i.id for i in snapshot.instances]


async def test_two_nodes_share_state_and_a_watcher_hears_the_other_node(
    nodes: Factory,
) -> None:
    one, two = await nodes(), await nodes()
    await one.register("users", "a", SPEC)
    assert ids(await two.snapshot("users")) == ["a"]

    # Stop node two's reaper (its fallback poll): the change must come by pub/sub.
    await cancel_task(two._tasks[0])
    waiting = asyncio.create_task(two.wait(1, "users", timeout=10))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    started = time.monotonic()
    await one.register("users", "b", SPEC)
    snapshot = await asyncio.wait_for(waiting, 2)
    assert time.monotonic() - started < 0.1
    assert (snapshot.index, ids(snapshot)) == (2, ["a", "b"])

    assert await two.deregister("users", "a") is True
    assert ids(await one.snapshot("users")) == ["b"]
    assert await one.heartbeat("users", "a") is None


async def test_ttl_eviction_is_heard_within_a_second_and_happens_once(nodes: Factory) -> None:
    one, two = await nodes(), await nodes()
    await one.register("users", "keep", SPEC)
    await one.register("users", "gone", SHORT)
    lapses_at = time.monotonic() + SHORT.ttl
    async with asyncio.timeout(5):
        async for snapshot in two.changes("users", index=2):
            heard_at, evicted = time.monotonic(), snapshot
            break
    latency = heard_at - lapses_at
    assert ids(evicted) == ["keep"]
    assert -0.05 < latency < 1.0, f"eviction heard {latency:.3f}s after the TTL lapsed"
    assert evicted.index == 3
    await asyncio.sleep(0.3)  # both reapers ran again: nothing evicted twice
    assert one.evictions + two.evictions == 1
    assert (await one.snapshot()).index == 3


async def test_a_late_heartbeat_does_not_count(nodes: Factory) -> None:
    registry = await nodes()
    await registry.register("users", "a", SHORT)
    # Hold the reaper off: stop this node's background tasks.
    for task in registry._tasks:
        await cancel_task(task)
    await asyncio.sleep(1.05)
    assert await registry.heartbeat("users", "a") is None
    assert registry.evictions == 0  # the heartbeat, not the reaper, found it lapsed
    assert (await registry.snapshot("users")).instances == ()


async def test_state_survives_a_node_restart(nodes: Factory) -> None:
    first = await nodes()
    await first.register("users", "a", SPEC)
    await first.deregister("users", "a")
    await first.register("users", "b", SPEC)
    await first.close()
    with pytest.raises(RegistryClosedError):
        await first.snapshot()
    second = await nodes()
    snapshot = await second.snapshot("users")
    assert (snapshot.index, ids(snapshot)) == (3, ["b"])
    assert (await second.register("orders", "x", SPEC)).index == 4
