"""The errors of :mod:`meshgate.events`, rooted at :class:`EventsError` (itself a
:class:`~meshgate.errors.MeshgateError`).

A bad argument (an invalid topic name, a bad setting) is a
:class:`~meshgate.errors.ConfigError` naming it and the fix. The types here are
runtime failures; each carries :attr:`EventsError.status`, the HTTP status a service
should answer with when the error reaches its boundary.
"""

from __future__ import annotations

from meshgate.errors import MeshgateError

__all__ = [
    "BusUnavailableError",
    "DeadLetterNotFoundError",
    "EnvelopeError",
    "EventsError",
    "MissingDependencyError",
    "PublishError",
    "SagaError",
    "SagaNotFoundError",
    "StepFailed",
]


class EventsError(MeshgateError):
    """An event, outbox, consumer or saga operation failed."""

    status: int = 500
    """The HTTP status a service should answer with."""


class MissingDependencyError(EventsError):
    """A backend's client library is not installed; the message names the pip extra."""


class BusUnavailableError(EventsError):
    """The event bus (NATS, Redis) cannot be reached or refused the request (503).

    Publishing through the outbox never raises it: the relay keeps the event and retries.
    """

    status = 503


class PublishError(EventsError):
    """The bus answered a publish with an error (no stream for the subject, a limit hit)."""

    status = 503


class EnvelopeError(EventsError):
    """Bytes from the bus are not a CloudEvents 1.0 envelope meshgate can read, or a
    payload cannot be encoded as JSON."""

    status = 400


class DeadLetterNotFoundError(EventsError):
    """No dead letter has the id given (already replayed, or never there)."""

    status = 404


class SagaError(EventsError):
    """A saga could not be started, driven or retried."""


class SagaNotFoundError(SagaError):
    """No saga has the id given in this service's database."""

    status = 404


class StepFailed(SagaError):  # noqa: N818 - raised by step code: "this step failed", not an error of ours
    """Raised by a saga step's action to say it failed for good and had no effect (a
    declined payment, stock that is not there): it is not retried, and only the steps
    before it are compensated."""

    status = 409

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)
