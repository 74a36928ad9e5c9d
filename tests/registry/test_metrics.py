"""Registry metrics: instances per service and evictions, read when scraped."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, generate_latest

from meshgate.registry import InstanceSpec, MemoryRegistry, RegistryMetrics

SPEC = InstanceSpec(address="10.0.0.1:8080", ttl=10)


async def scrape(metrics: RegistryMetrics) -> CollectorRegistry:
    scraped = CollectorRegistry(auto_describe=False)
    scraped.register(await metrics.read())
    return scraped


async def test_instances_by_service_and_evictions(registry: MemoryRegistry) -> None:
    metrics = RegistryMetrics(registry)
    await registry.register("users", "a", SPEC)
    await registry.register("users", "b", SPEC.model_copy(update={"ttl": 1.0}))
    await registry.register("web", "w", SPEC)
    first = await scrape(metrics)
    assert first.get_sample_value("meshgate_registry_instances", {"service": "users"}) == 2
    assert first.get_sample_value("meshgate_registry_instances", {"service": "web"}) == 1
    assert first.get_sample_value("meshgate_registry_evictions_total") == 0
    text = generate_latest(first).decode()
    assert "# TYPE meshgate_registry_instances gauge" in text
    assert "# TYPE meshgate_registry_evictions_total counter" in text

    await registry.deregister("web", "w")
    async with asyncio.timeout(5):  # b misses its TTL
        while registry.evictions == 0:
            await asyncio.sleep(0.05)
    later = await scrape(metrics)
    assert later.get_sample_value("meshgate_registry_instances", {"service": "users"}) == 1
    # A service seen before with no instance left is 0, not gone: an alert on it fires.
    assert later.get_sample_value("meshgate_registry_instances", {"service": "web"}) == 0
    assert later.get_sample_value("meshgate_registry_evictions_total") == 1


async def test_a_registry_that_cannot_be_read_gives_no_counts() -> None:
    registry = MemoryRegistry()
    await registry.start()
    metrics = RegistryMetrics(registry)
    await registry.register("users", "a", SPEC)
    await scrape(metrics)
    await registry.close()
    closed = await scrape(metrics)
    assert closed.get_sample_value("meshgate_registry_instances", {"service": "users"}) is None
    assert closed.get_sample_value("meshgate_registry_evictions_total") == 0
