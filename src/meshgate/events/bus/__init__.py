"""Event bus backends behind one contract (:class:`~meshgate.events.bus.base.Bus`).

One module per backend: :mod:`~meshgate.events.bus.nats` (NATS JetStream, the
default) and :mod:`~meshgate.events.bus.redis` (Redis Streams). The in-memory bus
for unit tests is :class:`meshgate.service.testing.MemoryBus`.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from meshgate.errors import ConfigError, ConfigIssue
from meshgate.events.bus.base import Bus, DeadLetter, Delivery, Subscription

__all__ = ["SCHEMES", "Bus", "DeadLetter", "Delivery", "Subscription", "connect_bus"]

SCHEMES = ("nats", "tls", "redis", "rediss")
"""The URL schemes :func:`connect_bus` knows."""


def connect_bus(
    url: str,
    *,
    namespace: str = "",
    credentials: str | None = None,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    name: str | None = None,
) -> Bus:
    """The bus at ``url`` (not connected yet): ``nats://host:4222`` or ``tls://...``
    (several separated by commas) for NATS JetStream, ``redis://`` or ``rediss://``
    for Redis Streams.

    Raises:
        ConfigError: the URL's scheme is not one of these (or a file is given for
            the wrong backend).
        MissingDependencyError: the backend's client library is not installed.
    """
    scheme = urlsplit(url.split(",", maxsplit=1)[0].strip()).scheme
    if scheme in ("nats", "tls"):
        from meshgate.events.bus.nats import NatsBus, TlsFiles  # noqa: PLC0415

        tls = None
        if tls_ca or tls_cert or tls_key:
            tls = TlsFiles(ca=tls_ca, cert=tls_cert, key=tls_key)
        return NatsBus(url, namespace=namespace, credentials=credentials, tls=tls, name=name)
    if scheme in ("redis", "rediss"):
        if credentials is not None:
            raise ConfigError(
                [
                    ConfigIssue(
                        "events.credentials",
                        "a credentials file is for NATS; give Redis its user and password "
                        "in the URL (redis://user:password@host:6379/0)",
                    )
                ]
            )
        from meshgate.events.bus.redis import RedisBus  # noqa: PLC0415

        return RedisBus(url, namespace=namespace, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
    raise ConfigError(
        [
            ConfigIssue(
                "events.url",
                f"{url!r} is not an event bus URL; give nats://host:4222 (NATS JetStream) "
                "or redis://host:6379/0 (Redis Streams)"
                + (
                    "; the in-memory bus is meshgate.service.testing.MemoryBus, for tests"
                    if scheme == "memory"
                    else ""
                ),
            )
        ]
    )
