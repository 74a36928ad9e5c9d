"""How a :class:`~meshgate.service.Service` gets its events: ``service.events``
(made on first use, started and stopped with the service) and ``@service.on(...)``.

The service's own module stays small: :func:`events_of` is all it calls. The events
use the service's database and metrics registry; the bus comes from the
environment (``MESHGATE_EVENTS_URL``, set by ``meshgate up``) unless
:meth:`Events.use_bus` gives one. ``/health/ready`` gets an ``events`` check whose
detail is the bus, the relay's lag and each consumer's state; it does not fail
while the bus is away, because the outbox keeps what is published meanwhile.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from meshgate.events.core import Events

if TYPE_CHECKING:
    from meshgate.service.app import Service

__all__ = ["events_of", "upgrade_events_of"]

log = logging.getLogger("meshgate.events")

_ATTRIBUTE = "_meshgate_events"


def events_of(service: Service) -> Events:
    """The events of ``service``, made and hooked into its lifecycle on first call."""
    existing: Events | None = service.__dict__.get(_ATTRIBUTE)
    if existing is not None:
        return existing
    events = Events(service.database, service=service.name, registry=service.metrics)
    service.__dict__[_ATTRIBUTE] = events
    service.on_startup(events.start)
    service.on_shutdown(events.stop)
    service.add_check("events", events.check)
    from meshgate.events.api import saga_routes  # noqa: PLC0415 - FastAPI is the service's

    service.app.include_router(saga_routes(events))
    return events


def attached(service: object) -> Events | None:
    """The events of ``service`` if it made any (it used ``service.events`` or ``on``)."""
    found = getattr(service, "__dict__", {}).get(_ATTRIBUTE)
    return found if isinstance(found, Events) else None


def upgrade_events_of(target: str, database_url: Any) -> str | None:
    """For ``meshgate db upgrade``: when the module ``target`` (``pkg.mod`` or
    ``pkg.mod:service``) has a service that uses events, upgrade its event tables in
    ``database_url`` too; returns their revision (None when it uses none)."""
    module_name, _, attr = target.partition(":")
    if "." not in module_name and not attr:
        return None  # a plain service name: no module to look at
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    for candidate in (getattr(module, attr or "service", None), module):
        events = attached(candidate)
        if events is not None:
            from meshgate.events import migrations  # noqa: PLC0415

            return migrations.upgrade(database_url, prefix=events.tables.prefix)
    return None
