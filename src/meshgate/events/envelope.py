"""Events as they travel: CloudEvents 1.0 envelopes in the structured JSON mode.

An event on the bus is one JSON object::

    {"specversion": "1.0", "id": "9f1c...", "source": "/orders", "type": "orders.placed",
     "time": "2026-01-02T03:04:05.678901Z", "subject": "42",
     "datacontenttype": "application/json", "traceparent": "00-...-...-01",
     "data": {"order_id": 42, "total": 1250}}

``type`` is the topic, ``subject`` the event's key (what its order is kept by), and
``traceparent`` (the CloudEvents distributed-tracing extension) the W3C trace context
of the code that published it, so that the handler's logs and calls join the same
trace. The envelope is the same whichever bus carries it.
"""

from __future__ import annotations

import builtins
import json
import os
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from meshgate.errors import ConfigError, ConfigIssue
from meshgate.events.errors import EnvelopeError

__all__ = ["SPEC_VERSION", "Event", "check_topic", "encode_data", "new_event_id", "stream_name"]

SPEC_VERSION = "1.0"
"""The CloudEvents version of the envelopes."""
CONTENT_TYPE = "application/json"

M = TypeVar("M", bound=BaseModel)

_WORD = r"[A-Za-z0-9](?:[A-Za-z0-9-]|_(?!_))*(?<!_)"
_TOPIC_RE = re.compile(rf"^{_WORD}(?:\.{_WORD})*$")
_MAX_TOPIC = 200
_REQUIRED = ("specversion", "id", "source", "type")


def check_topic(topic: str, where: str = "topic") -> str:
    """``topic`` if it is a valid topic name, else a :class:`~meshgate.errors.ConfigError`.

    A topic is dot-separated words of letters, digits, ``-`` and single ``_``
    (``orders.placed``, ``payments.charge-requested``): what a NATS subject and a
    JetStream stream name can both carry without escaping.
    """
    if not isinstance(topic, str) or len(topic) > _MAX_TOPIC or not _TOPIC_RE.match(topic):
        raise ConfigError(
            [
                ConfigIssue(
                    where,
                    f"{topic!r} is not a topic name; write dot-separated words of letters, "
                    "digits, '-' and single '_', such as orders.placed",
                )
            ]
        )
    return topic


def stream_name(topic: str) -> str:
    """The JetStream stream (or Redis stream key part) of a topic: dots become ``__``
    (words never hold ``__``, so two topics never share a stream)."""
    return topic.replace(".", "__")


def new_event_id() -> str:
    """A new event id: 32 hex digits, time-ordered in its first 12 (milliseconds),
    so that ids sort roughly by creation and index well."""
    millis = time.time_ns() // 1_000_000
    return f"{millis:012x}{os.urandom(10).hex()}"


def encode_data(payload: object) -> Any:
    """The JSON value of a payload: a pydantic model's JSON form, or a value that is
    JSON already (dict, list, str, number, bool, None).

    Raises:
        EnvelopeError: the payload cannot be encoded as JSON.
    """
    if isinstance(payload, BaseModel):
        return payload.model_dump(mode="json")
    try:
        json.dumps(payload)
    except (TypeError, ValueError) as exc:
        raise EnvelopeError(
            f"the event payload {type(payload).__name__} is not JSON ({exc}); publish a "
            "pydantic model or plain JSON values (dict, list, str, number, bool, None)"
        ) from None
    return payload


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(value: object) -> datetime:
    if not isinstance(value, str):
        raise ValueError("time must be an RFC 3339 string")
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)


@dataclass(frozen=True, slots=True)
class Event:
    """One event: its CloudEvents attributes and its data (decoded JSON).

    Handlers get one; :meth:`payload` validates its data as a pydantic model.
    """

    id: str
    """Unique per event; the consumer's inbox records it, the bus dedupes on it."""
    type: str
    """The topic (``orders.placed``)."""
    source: str
    """Who published it: ``/<service>``."""
    data: Any
    """The payload as JSON values."""
    time: datetime = field(default_factory=lambda: datetime.now(UTC))
    """When it was published (UTC)."""
    subject: str | None = None
    """Its key: events of one key reach the bus in the order they were committed."""
    traceparent: str | None = None
    """The W3C trace context of the code that published it."""
    datacontenttype: str = CONTENT_TYPE
    """Always ``application/json``."""
    attempt: int = 1
    """Which delivery this is (1 the first time; set by the consumer, not on the wire)."""

    @property
    def topic(self) -> str:
        """The topic (the same as :attr:`type`)."""
        return self.type

    @property
    def key(self) -> str | None:
        """The key (the same as :attr:`subject`)."""
        return self.subject

    def payload(self, model: builtins.type[M]) -> M:
        """The data validated as ``model``.

        Raises:
            EnvelopeError: the data does not fit the model (the message says where).
        """
        try:
            return model.model_validate(self.data)
        except ValidationError as exc:
            raise EnvelopeError(
                f"event {self.id} ({self.type}) does not fit {model.__name__}: {exc}"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        """The envelope as a JSON object (attributes that are None are left out)."""
        out: dict[str, Any] = {
            "specversion": SPEC_VERSION,
            "id": self.id,
            "source": self.source,
            "type": self.type,
            "time": _rfc3339(self.time),
            "datacontenttype": self.datacontenttype,
        }
        if self.subject is not None:
            out["subject"] = self.subject
        if self.traceparent is not None:
            out["traceparent"] = self.traceparent
        out["data"] = self.data
        return out

    def encode(self) -> bytes:
        """The envelope as UTF-8 JSON bytes, as it goes on the bus."""
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def decode(cls, raw: bytes | str, *, attempt: int = 1) -> Event:
        """The event of an envelope from the bus.

        Raises:
            EnvelopeError: not JSON, not an object, not CloudEvents 1.0, or missing a
                required attribute (the message says which).
        """
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise EnvelopeError(f"an event on the bus is not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise EnvelopeError("an event on the bus is not a JSON object")
        missing = [name for name in _REQUIRED if not isinstance(doc.get(name), str)]
        if missing:
            raise EnvelopeError(
                f"an event on the bus lacks the CloudEvents attributes {', '.join(missing)}"
            )
        if doc["specversion"] != SPEC_VERSION:
            raise EnvelopeError(
                f"event {doc['id']} has specversion {doc['specversion']!r}; meshgate reads "
                f"CloudEvents {SPEC_VERSION}"
            )
        try:
            moment = _parse_time(doc["time"]) if "time" in doc else datetime.now(UTC)
        except ValueError as exc:
            raise EnvelopeError(f"event {doc['id']}: time {doc['time']!r}: {exc}") from None
        subject = doc.get("subject")
        traceparent = doc.get("traceparent")
        return cls(
            id=doc["id"],
            type=doc["type"],
            source=doc["source"],
            data=doc.get("data"),
            time=moment,
            subject=subject if isinstance(subject, str) else None,
            traceparent=traceparent if isinstance(traceparent, str) else None,
            datacontenttype=str(doc.get("datacontenttype", CONTENT_TYPE)),
            attempt=attempt,
        )
