"""The registry provider: instances as endpoint sets, with their weights."""

from __future__ import annotations

import asyncio

import pytest

from meshgate.providers.registry import RegistryProvider, instance_weight
from meshgate.registry.memory import MemoryRegistry
from meshgate.registry.model import Instance, InstanceSpec


@pytest.mark.parametrize(
    ("metadata", "weight"),
    [
        ({}, 1),
        ({"weight": "5"}, 5),
        ({"weight": "0"}, 1),
        ({"weight": "5000"}, 1000),
        ({"weight": "x"}, 1),
    ],
)
def test_instance_weight(metadata: dict[str, str], weight: int) -> None:
    instance = Instance.model_construct(metadata=metadata)
    assert instance_weight(instance) == weight


async def test_it_yields_every_change_of_the_registry() -> None:
    registry = MemoryRegistry()
    await registry.start()
    try:
        provider = RegistryProvider(registry)
        seen: list[dict[str, tuple[tuple[str, int, int], ...]]] = []
        changes = provider.watch()

        async def next_change() -> None:
            seen.append(dict(await anext(changes)))

        await asyncio.wait_for(next_change(), 5)
        assert seen[-1] == {}
        spec = InstanceSpec(address="127.0.0.1:9001", metadata={"weight": "3"})
        await registry.register("users", "users-1", spec)
        await asyncio.wait_for(next_change(), 5)
        assert seen[-1] == {"users": (("127.0.0.1", 9001, 3),)}
        await changes.aclose()  # type: ignore[attr-defined]
    finally:
        await registry.close()
