"""JSON logs: one format for every record of a service process (the SDK's, the
service's, uvicorn's), with service, instance and request context; an access line
per request; written off the event loop."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from meshgate.service import Service, configure_logging, logs
from meshgate.service.testing import capture_logs, in_process

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi", "httpx")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put the process's logging back as it was after a test that configures it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    saved = {
        name: (list(lg.handlers), lg.propagate, lg.disabled, lg.level)
        for name in _LOGGERS
        for lg in [logging.getLogger(name)]
    }
    try:
        yield
    finally:
        installed = logs._installed
        if installed is not None:
            logs.flush()
            root.removeHandler(installed.handler)
            installed.listener.stop()
            logs._installed = None
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, (old, propagate, disabled, lvl) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers[:] = old
            logger.propagate, logger.disabled = propagate, disabled
            logger.setLevel(lvl)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    assert logs.flush(), "the log writer did not catch up"
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def make_service() -> Service:
    service = Service("orders")

    @service.app.get("/orders/{order_id}")
    async def get_order(order_id: int) -> dict[str, int]:
        logging.getLogger("shop.orders").info("looking up order %d", order_id)
        return {"id": order_id}

    return service


@pytest.mark.usefixtures("restore_logging")
async def test_uvicorn_and_the_service_log_the_same_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHGATE_INSTANCE", raising=False)
    # A uvicorn configured before (its defaults) must not keep its own format.
    uvicorn.Config(make_service().app)
    stream = io.StringIO()
    configure_logging("orders", stream=stream)
    service = make_service()
    sock = socket.create_server(("127.0.0.1", 0))
    server = service.server(sock, log_level="info")
    task = asyncio.get_running_loop().create_task(server.serve([sock]))
    try:
        async with asyncio.timeout(10):
            while not server.started:
                await asyncio.sleep(0.01)
        logging.getLogger("shop").warning("plain python logging")
    finally:
        server.should_exit = True
        await task
        sock.close()
    records = lines(stream)
    assert {r["logger"] for r in records} >= {"uvicorn.error", "shop"}
    for record in records:
        assert record["service"] == "orders"
        assert record["instance"] == service.instance_id()  # the registry's id
        assert {"ts", "level", "logger", "message"} <= set(record)
    assert any(
        "startup complete" in r["message"] for r in records if r["logger"] == "uvicorn.error"
    )


@pytest.mark.usefixtures("restore_logging")
async def test_request_context_and_instance_reach_every_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MESHGATE_INSTANCE", "orders-2")
    stream = io.StringIO()
    configure_logging("orders", stream=stream)
    async with in_process(make_service()) as client:
        await client.get(
            "/orders/7",
            headers={"X-Request-ID": "req-7", "traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"},
        )
    records = lines(stream)
    handler = next(r for r in records if r["logger"] == "shop.orders")
    assert handler["message"] == "looking up order 7"
    assert handler["request_id"] == "req-7"
    assert handler["trace_id"] == TRACE_ID
    assert len(handler["span_id"]) == 16
    assert handler["instance"] == "orders-2"
    line = next(r for r in records if r["logger"] == "meshgate.access")
    assert line["request_id"] == "req-7"
    assert line["trace_id"] == TRACE_ID
    assert all(r["instance"] == "orders-2" for r in records)


async def test_one_access_line_per_request() -> None:
    service = make_service()
    with capture_logs("meshgate.access") as records:
        async with in_process(service) as client:
            await client.get("/orders/1", headers={"X-Request-ID": "a-1"})
            await client.get("/orders/x")
            await client.get("/nowhere")
            await client.get("/health/ready")
    info = [r for r in records if r["level"] == "info"]
    assert [r["message"].rsplit(" ", 2)[0] for r in info] == [
        "GET /orders/1 200",
        "GET /orders/x 422",
        "GET /nowhere 404",
    ]
    first = info[0]
    assert first["request_id"] == "a-1"
    assert first["method"] == "GET"
    assert first["path"] == "/orders/1"
    assert first["route"] == "/orders/{order_id}"
    assert first["status"] == 200
    assert isinstance(first["duration_ms"], float)
    # Probes and scrapers call these all the time: debug only.
    assert [r["path"] for r in records if r["level"] == "debug"] == ["/health/ready"]


@pytest.mark.usefixtures("restore_logging")
def test_a_blocked_stream_does_not_block_the_code_that_logs() -> None:
    released = threading.Event()

    class Blocked(io.StringIO):
        def write(self, text: str) -> int:
            released.wait(30)  # a full pipe, until the reader catches up
            return super().write(text)

    stream = Blocked()
    configure_logging("orders", stream=stream, instance="orders-1")
    log = logging.getLogger("shop")
    started = time.monotonic()
    for i in range(50):
        log.info("record %d", i)
    took = time.monotonic() - started
    released.set()
    assert took < 1.0, f"logging waited for the stream ({took:.2f} s)"
    assert [r["message"] for r in lines(stream)] == [f"record {i}" for i in range(50)]


@pytest.mark.usefixtures("restore_logging")
def test_an_exception_is_one_record_with_its_traceback() -> None:
    stream = io.StringIO()
    configure_logging("orders", stream=stream, instance="orders-1")
    try:
        int("bad value 42")
    except ValueError:
        logging.getLogger("shop").exception("could not do it")
    (record,) = lines(stream)
    assert record["message"] == "could not do it"
    assert record["level"] == "error"
    assert "Traceback (most recent call last)" in record["exception"]
    assert (
        "ValueError: invalid literal for int() with base 10: 'bad value 42'"
        in (record["exception"])
    )
