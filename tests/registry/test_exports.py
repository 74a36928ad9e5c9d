"""The curated public API of meshgate.registry."""

from __future__ import annotations

import meshgate.registry
from meshgate.errors import MeshgateError


def test_exported_members() -> None:
    assert set(meshgate.registry.__all__) == {
        "BaseRegistry",
        "Heartbeater",
        "Instance",
        "InstanceSpec",
        "InvalidNameError",
        "MemoryRegistry",
        "Registry",
        "RegistryClient",
        "RegistryClosedError",
        "RegistryError",
        "RegistryMetrics",
        "RegistryRequestError",
        "RegistryStoreError",
        "RegistryUnavailableError",
        "Snapshot",
        "create_router",
    }
    for name in meshgate.registry.__all__:
        assert getattr(meshgate.registry, name).__module__.startswith("meshgate.registry")
    assert "docs/registry.md" in (meshgate.registry.__doc__ or "")


def test_every_error_is_a_meshgate_error() -> None:
    for name in meshgate.registry.__all__:
        member = getattr(meshgate.registry, name)
        if name.endswith("Error"):
            assert issubclass(member, meshgate.registry.RegistryError)
            assert issubclass(member, MeshgateError)
            assert member.__doc__
