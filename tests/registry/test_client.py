"""RegistryClient and Heartbeater end to end, against the API served by uvicorn."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meshgate.registry import (
    Heartbeater,
    InstanceSpec,
    InvalidNameError,
    MemoryRegistry,
    RegistryClient,
    RegistryClosedError,
    RegistryRequestError,
    RegistryUnavailableError,
    Snapshot,
)
from tests.registry.conftest import TOKEN, Server, free_port, make_app

SPEC = InstanceSpec(address="10.0.0.1:8080", version="1.0", ttl=10)
SHORT = InstanceSpec(address="10.0.0.1:8080", ttl=1.0)


@pytest.fixture
async def client(server: Server) -> AsyncIterator[RegistryClient]:
    client = RegistryClient(server.url, TOKEN, timeout=2.0)
    try:
        yield client
    finally:
        await client.close()


class Watcher:
    """Collects what ``client.watch(service)`` yields, in a task."""

    def __init__(self, client: RegistryClient, service: str | None) -> None:
        self.seen: list[Snapshot] = []
        self._changed = asyncio.Event()
        self.task = asyncio.create_task(self._run(client, service))

    async def _run(self, client: RegistryClient, service: str | None) -> None:
        async for snapshot in client.watch(service):
            self.seen.append(snapshot)
            self._changed.set()

    async def until(self, ok: object, timeout: float = 2.0) -> Snapshot:
        """The first snapshot seen (from now on, or already) for which ``ok`` holds."""
        assert callable(ok)
        async with asyncio.timeout(timeout):
            while True:
                for snapshot in self.seen:
                    if ok(snapshot):
                        return snapshot
                self._changed.clear()
                await self._changed.wait()


def ids(snapshot: Snapshot) -> list[str]:
    return [i.id for i in snapshot.instances]


async def test_register_heartbeat_snapshot_deregister(
    client: RegistryClient, registry: MemoryRegistry
) -> None:
    instance = await client.register("users", "a", SPEC)
    assert (instance.service, instance.id, instance.index, instance.spec) == ("users", "a", 1, SPEC)
    beat = await client.heartbeat("users", "a")
    assert beat is not None
    assert beat.last_heartbeat >= instance.last_heartbeat
    assert ids(await client.snapshot("users")) == ["a"]
    everything = await client.snapshot()
    assert everything.service is None
    assert everything.index == registry.index == 1
    assert await client.deregister("users", "a") is True
    assert await client.deregister("users", "a") is False
    assert await client.heartbeat("users", "a") is None
    assert (await client.snapshot("users")).instances == ()


async def test_refusals_raise_request_errors(server: Server) -> None:
    async with RegistryClient(server.url, "wrong-token") as client:
        with pytest.raises(RegistryRequestError) as caught:
            await client.register("users", "a", SPEC)
        assert caught.value.status == 401
        assert "registry token" in caught.value.detail
        # A watch with a bad token fails instead of retrying forever.
        with pytest.raises(RegistryRequestError):
            async for _ in client.watch("users"):
                pass
    async with RegistryClient(server.url, TOKEN) as client:
        bad = InstanceSpec.model_construct(
            address="nohost", version="", zone="", metadata={}, ttl=10
        )
        with pytest.raises(RegistryRequestError) as caught:
            await client.register("users", "a", bad)
        assert (caught.value.status, caught.value.error) == (400, "invalid_spec")
        assert "address: 'nohost' is not host:port" in str(caught.value)
        with pytest.raises(InvalidNameError):
            await client.heartbeat("users", "not/valid")


async def test_a_404_that_is_not_the_registrys_is_an_error(server: Server) -> None:
    # A wrong URL must not look like "register again".
    async with RegistryClient(server.url + "/nothing-here", TOKEN) as client:
        with pytest.raises(RegistryRequestError) as caught:
            await client.heartbeat("users", "a")
        assert caught.value.status == 404


async def test_unreachable_registry_raises_unavailable() -> None:
    async with RegistryClient(f"http://127.0.0.1:{free_port()}", TOKEN, timeout=1) as client:
        with pytest.raises(RegistryUnavailableError, match="cannot be reached"):
            await client.snapshot()
    with pytest.raises(RegistryClosedError):
        await client.snapshot()


def test_url_must_be_http() -> None:
    with pytest.raises(ValueError, match=r"http://127\.0\.0\.1:9901"):
        RegistryClient("127.0.0.1:9901")


async def test_watch_yields_current_then_every_change_and_ends_on_close(
    client: RegistryClient, registry: MemoryRegistry
) -> None:
    await registry.register("users", "a", SPEC)
    watcher = Watcher(client, "users")
    first = await watcher.until(lambda s: True)
    assert (first.index, ids(first)) == (1, ["a"])
    await registry.register("orders", "x", SPEC)  # another service: not a change of users
    await registry.register("users", "b", SPEC)
    await watcher.until(lambda s: ids(s) == ["a", "b"])
    await registry.deregister("users", "a")
    await watcher.until(lambda s: ids(s) == ["b"])
    assert [s.index for s in watcher.seen] == [1, 3, 4]
    await client.close()
    await asyncio.wait_for(watcher.task, 1)


async def test_eviction_reaches_a_client_watcher_within_a_second(
    client: RegistryClient, registry: MemoryRegistry
) -> None:
    watcher = Watcher(client, "users")
    await registry.register("users", "a", SHORT)
    lapses_at = time.monotonic() + SHORT.ttl
    await watcher.until(lambda s: ids(s) == ["a"])
    await watcher.until(lambda s: s.index == 2, timeout=3)
    latency = time.monotonic() - lapses_at
    assert -0.05 < latency < 1.0, f"eviction heard {latency:.3f}s after the TTL lapsed"
    await client.close()
    await watcher.task


async def test_watch_reconnects_after_the_server_restarts_without_missing_a_change(
    tmp_path: Path,
) -> None:
    path = tmp_path / "registry.sqlite"
    registry = MemoryRegistry(path)
    await registry.start()
    server = await Server(make_app(registry)).start()
    client = RegistryClient(server.url, TOKEN, timeout=1)
    watcher = Watcher(client, "users")
    try:
        await registry.register("users", "a", SPEC)
        await watcher.until(lambda s: ids(s) == ["a"])
        # The gateway restarts: its registry closes (answering the long poll with 503)
        # and the listener goes away for a while.
        await registry.close()
        await server.stop()
        await asyncio.sleep(0.3)
        registry = MemoryRegistry(path)
        await registry.start()
        # A change lands before the listener is back: the watcher must still get it.
        await registry.register("users", "b", SPEC)
        server = await Server(make_app(registry), port=server.port).start()
        snapshot = await watcher.until(lambda s: ids(s) == ["a", "b"], timeout=8)
        assert snapshot.index == 2
        assert not watcher.task.done()
        await registry.deregister("users", "a")
        await watcher.until(lambda s: ids(s) == ["b"])
        indexes = [s.index for s in watcher.seen]
        assert indexes == sorted(set(indexes))  # no state twice, none out of order
    finally:
        await client.close()
        await watcher.task
        await server.stop()
        await registry.close()


async def test_watch_follows_a_registry_that_restarted_empty() -> None:
    registry = MemoryRegistry()
    await registry.start()
    server = await Server(make_app(registry)).start()
    client = RegistryClient(server.url, TOKEN, timeout=1)
    watcher = Watcher(client, "users")
    try:
        for name in ("a", "b", "c"):
            await registry.register("users", name, SPEC)
        await watcher.until(lambda s: s.index == 3)
        await registry.close()
        await server.stop()
        # Without a file the new registry starts from index 0: the watcher must not
        # wait for index 3 to come back.
        registry = MemoryRegistry()
        await registry.start()
        await registry.register("users", "z", SPEC)
        server = await Server(make_app(registry), port=server.port).start()
        snapshot = await watcher.until(lambda s: ids(s) == ["z"], timeout=8)
        assert snapshot.index == 1
    finally:
        await client.close()
        await watcher.task
        await server.stop()
        await registry.close()


async def test_heartbeater_keeps_the_instance_alive_then_deregisters(
    client: RegistryClient, registry: MemoryRegistry
) -> None:
    heartbeater = Heartbeater(client, "users", "a", SHORT)
    await heartbeater.start()
    assert heartbeater.registered
    assert heartbeater.interval == pytest.approx(1 / 3)
    await asyncio.sleep(2.2)  # more than twice its TTL
    assert ids(await registry.snapshot("users")) == ["a"]
    assert registry.evictions == 0
    assert registry.index == 1  # heartbeats are not changes
    assert await heartbeater.stop() is True
    assert (await registry.snapshot("users")).instances == ()
    assert await heartbeater.stop() is False  # idempotent


async def test_heartbeater_registers_again_when_the_registry_forgot(
    client: RegistryClient, registry: MemoryRegistry
) -> None:
    heartbeater = Heartbeater(client, "users", "a", SHORT)
    await heartbeater.start()
    await registry.deregister("users", "a")  # as after a registry restart without a file
    async with asyncio.timeout(2):
        while ids(await registry.snapshot("users")) != ["a"]:
            await asyncio.sleep(0.05)
    assert heartbeater.registrations == 2
    await heartbeater.stop()


async def test_heartbeater_start_returns_promptly_and_retries_in_the_background(
    registry: MemoryRegistry,
) -> None:
    port = free_port()
    client = RegistryClient(f"http://127.0.0.1:{port}", TOKEN, timeout=1)
    heartbeater = Heartbeater(client, "users", "a", SHORT)
    started = time.monotonic()
    await heartbeater.start()
    assert time.monotonic() - started < 1
    assert not heartbeater.registered
    confirmed = asyncio.ensure_future(heartbeater.wait_registered())
    await asyncio.sleep(0.2)
    assert not confirmed.done()  # what says "registered" waits for this
    server = await Server(make_app(registry), port=port).start()
    try:
        async with asyncio.timeout(3):
            while ids(await registry.snapshot("users")) != ["a"]:
                await asyncio.sleep(0.05)
            await confirmed
        assert heartbeater.registered
        await heartbeater.stop()
        assert (await registry.snapshot("users")).instances == ()
    finally:
        await client.close()
        await server.stop()


async def test_heartbeater_stop_is_bounded_when_the_registry_is_gone() -> None:
    client = RegistryClient(f"http://127.0.0.1:{free_port()}", TOKEN, timeout=5)
    heartbeater = Heartbeater(client, "users", "a", SHORT)
    await heartbeater.start()
    started = time.monotonic()
    assert await heartbeater.stop(timeout=0.3) is False
    assert time.monotonic() - started < 1
    await client.close()


async def test_heartbeater_start_raises_on_a_refusal(server: Server) -> None:
    async with RegistryClient(server.url, "wrong-token") as client:
        heartbeater = Heartbeater(client, "users", "a", SPEC)
        with pytest.raises(RegistryRequestError):
            await heartbeater.start()
        assert await heartbeater.stop() is False


def test_heartbeater_interval_must_be_below_the_ttl() -> None:
    client = RegistryClient("http://127.0.0.1:1")
    with pytest.raises(ValueError, match="more often than the TTL"):
        Heartbeater(client, "users", "a", SHORT, interval=1.0)
