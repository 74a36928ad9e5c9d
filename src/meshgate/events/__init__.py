"""Consistency across services: events through a transactional outbox, consumers
that apply each event once (an inbox), and durable sagas with compensation, on NATS
JetStream (or Redis Streams), in CloudEvents 1.0 envelopes.

::

    from meshgate.service import Service

    service = Service("orders", database=Database(url))

    @service.on("payments.charged", group="orders")
    async def charged(event: Event, session: AsyncSession) -> None: ...

    async with service.database.session() as session:
        session.add(order)
        await service.events.publish(session, "orders.placed", OrderPlaced(...), key=str(order.id))

Reference: docs/events.md.
"""

from meshgate.events.bus import connect_bus
from meshgate.events.bus.base import Bus, DeadLetter, Delivery, Subscription
from meshgate.events.core import Events, bus_from_env
from meshgate.events.envelope import Event
from meshgate.events.errors import (
    BusUnavailableError,
    DeadLetterNotFoundError,
    EnvelopeError,
    EventsError,
    MissingDependencyError,
    PublishError,
    SagaError,
    SagaNotFoundError,
    StepFailed,
)
from meshgate.events.outbox import Lag
from meshgate.events.saga import Saga, Step, StepContext
from meshgate.events.settings import ConsumerSettings, TopicSettings

__all__ = [
    "Bus",
    "BusUnavailableError",
    "ConsumerSettings",
    "DeadLetter",
    "DeadLetterNotFoundError",
    "Delivery",
    "EnvelopeError",
    "Event",
    "Events",
    "EventsError",
    "Lag",
    "MissingDependencyError",
    "PublishError",
    "Saga",
    "SagaError",
    "SagaNotFoundError",
    "Step",
    "StepContext",
    "StepFailed",
    "Subscription",
    "TopicSettings",
    "bus_from_env",
    "connect_bus",
]
