"""The service registry: instances register with a TTL, heartbeat, deregister, and
watchers hear of every change.

Backends: :class:`MemoryRegistry` (embedded, optionally persisted to SQLite) and
``meshgate.registry.redis.RedisRegistry`` (shared by several gateway nodes; needs the
``redis`` extra, so it is imported from its module). :func:`create_router` serves
the HTTP API; :class:`RegistryClient` and :class:`Heartbeater` are its client side;
:class:`RegistryMetrics` its Prometheus metrics (instances, evictions).
The reference is docs/registry.md.
"""

from __future__ import annotations

from meshgate.registry.api import create_router
from meshgate.registry.client import Heartbeater, RegistryClient
from meshgate.registry.errors import (
    InvalidNameError,
    RegistryClosedError,
    RegistryError,
    RegistryRequestError,
    RegistryStoreError,
    RegistryUnavailableError,
)
from meshgate.registry.memory import MemoryRegistry
from meshgate.registry.metrics import RegistryMetrics
from meshgate.registry.model import Instance, InstanceSpec, Snapshot
from meshgate.registry.store import BaseRegistry, Registry

__all__ = [
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
]
