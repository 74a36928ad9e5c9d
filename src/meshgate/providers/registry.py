"""The embedded registry as a provider: its registered instances, as they come and go."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from meshgate.providers import EndpointSpec, ServiceEndpoints

if TYPE_CHECKING:
    from meshgate.registry.model import Instance
    from meshgate.registry.store import Registry

__all__ = ["RegistryProvider", "instance_weight"]


def instance_weight(instance: Instance) -> int:
    """The instance's ``weight`` metadata (1 to 1000; 1 when absent or unreadable)."""
    text = instance.metadata.get("weight", "1")
    try:
        return min(max(int(text), 1), 1000)
    except ValueError:
        return 1


class RegistryProvider:
    """Follows a :class:`~meshgate.registry.store.Registry`'s changes."""

    name = "registry"

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    async def watch(self) -> AsyncIterator[ServiceEndpoints]:
        async for snapshot in self.registry.changes():
            out: dict[str, tuple[EndpointSpec, ...]] = {}
            for service, group in snapshot.by_service().items():
                out[service] = tuple(sorted((i.host, i.port, instance_weight(i)) for i in group))
            yield out
