"""Test helpers for services built on the SDK.

::

    from meshgate.service.testing import (
        capture_logs, capture_spans, in_process, serving, use_endpoints,
    )

    async def test_get_user() -> None:
        async with in_process(users.service) as client:      # no server, no registry
            assert (await client.get("/users/1")).status_code == 404

    async def test_web_calls_users() -> None:
        fake = Service("users")                               # a fake dependency

        @fake.app.get("/users/{user_id}")
        async def get(user_id: int) -> dict[str, object]:
            return {"id": user_id, "name": "Ada"}

        async with serving(fake) as address:                  # real loopback HTTP
            use_endpoints(web.service, "users", [address])
            async with in_process(web.service) as client:
                ...

    def test_logs() -> None:
        with capture_logs() as records:
            ...
        assert records[0]["request_id"] == ...

    async def test_spans() -> None:
        spans = capture_spans(users.service)                  # before it starts
        async with in_process(users.service) as client:
            await client.get("/users/1")
        assert spans.get_finished_spans()[-1].name == "GET /users/{user_id}"
    async def test_order_placed_is_handled() -> None:     # events, in memory
        bus = use_memory_bus(orders.service)
        use_memory_bus(payments.service, bus)
        async with in_process(orders.service) as client, in_process(payments.service):
            await client.post("/orders", json=...)
            await settle(orders.service, payments.service)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import httpx

from meshgate.service.app import Service
from meshgate.service.client import ServiceClient
from meshgate.service.logs import JsonFormatter

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from meshgate.events._memory import MemoryBus

__all__ = [
    "MemoryBus",
    "capture_logs",
    "capture_spans",
    "in_process",
    "serving",
    "settle",
    "use_endpoints",
    "use_memory_bus",
]


@contextlib.asynccontextmanager
async def in_process(service: Service, **client_options: Any) -> AsyncIterator[httpx.AsyncClient]:
    """Run ``service`` inside the test (its startup and shutdown hooks included, no
    socket, no registration) and give an HTTP client for it."""
    transport = httpx.ASGITransport(app=service.app)
    async with (
        service.app.router.lifespan_context(service.app),
        httpx.AsyncClient(
            transport=transport, base_url=f"http://{service.name}", **client_options
        ) as client,
    ):
        yield client


@contextlib.asynccontextmanager
async def serving(service: Service, host: str = "127.0.0.1") -> AsyncIterator[str]:
    """Serve ``service`` on an ephemeral loopback port for the duration; gives its
    ``host:port``. It registers when it has a registry URL; on exit it drains (as on
    SIGTERM) and stops."""
    sock = socket.create_server((host, 0), reuse_port=False)
    server = service.server(sock)
    task = asyncio.get_running_loop().create_task(server.serve([sock]))
    try:
        while not server.started:
            if task.done():
                task.result()  # raises what stopped it
                raise RuntimeError(f"{service.name} stopped before it started")
            await asyncio.sleep(0.01)
        assert service.address is not None  # noqa: S101 - set by service.server()
        yield service.address
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sock.close()


def use_endpoints(service: Service, callee: str, endpoints: Sequence[str]) -> ServiceClient:
    """Make ``service.client(callee)`` call these fixed ``host:port`` addresses (a
    fake or a test instance) instead of looking ``callee`` up in the registry.

    A client made before (``users = service.client("users")`` at module level) is the
    one changed, so that the code holding it calls the fake too."""
    client = service.client(callee)
    client.use_endpoints(list(endpoints))
    return client


class _Collector(logging.Handler):
    def __init__(self, formatter: JsonFormatter, into: list[dict[str, Any]]) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(formatter)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(json.loads(self.format(record)))


@contextlib.contextmanager
def capture_logs(
    logger: str = "", level: int = logging.DEBUG, service: str = "test"
) -> Iterator[list[dict[str, Any]]]:
    """Collect the records of ``logger`` (default: all) as the JSON objects the
    service would log: message, level, logger, request_id, trace_id, extras."""
    records: list[dict[str, Any]] = []
    handler = _Collector(JsonFormatter(service), records)
    target = logging.getLogger(logger)
    old_level = target.level
    target.addHandler(handler)
    target.setLevel(min(level, old_level) if old_level else level)
    try:
        yield records
    finally:
        target.removeHandler(handler)
        target.setLevel(old_level)


def capture_spans(service: Service) -> InMemorySpanExporter:
    """Keep ``service``'s spans in memory, every new trace sampled, whatever the
    environment says; call it before the service starts. Each span is there as soon
    as it ends: ``capture_spans(service).get_finished_spans()``."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: PLC0415
        InMemorySpanExporter,
    )

    exporter = InMemorySpanExporter()
    service.telemetry.use_exporter(exporter)
    return exporter


# -- events


def __getattr__(name: str) -> Any:
    # The memory bus needs the events package (SQLAlchemy): loaded when asked for.
    if name == "MemoryBus":
        from meshgate.events._memory import MemoryBus  # noqa: PLC0415

        return MemoryBus
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def use_memory_bus(service: Service, bus: MemoryBus | None = None) -> MemoryBus:
    """Give ``service``'s events an in-memory bus (before it starts): its outbox relay
    and handlers then run inside the test. Give several services the same bus to
    test them together."""
    from meshgate.events._memory import MemoryBus  # noqa: PLC0415

    bus = bus or MemoryBus()
    service.events.use_bus(bus)
    return bus


async def settle(*services: Service, timeout: float = 5.0) -> None:
    """Wait until every event ``services`` published is on their bus and every
    handler acknowledged its events (with :func:`use_memory_bus`); raises
    TimeoutError naming what is left."""
    from meshgate.events._memory import MemoryBus  # noqa: PLC0415

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        left = []
        for service in services:
            events = service.events
            relay = events.relay
            if relay is not None and (await relay.measure()).pending:
                left.append(f"{service.name}: outbox rows waiting")
            bus = events.bus
            if isinstance(bus, MemoryBus) and not bus.idle():
                left.append(f"{service.name}: events not acknowledged")
        if not left:
            return
        if loop.time() >= deadline:
            raise TimeoutError(f"not settled within {timeout:g} s: {'; '.join(left)}")
        await asyncio.sleep(0.01)
