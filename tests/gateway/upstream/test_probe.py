"""Active health checks against real sockets."""

from __future__ import annotations

import asyncio

from meshgate.config import loads
from meshgate.gateway.upstream.probe import Prober, probe_once
from tests.helpers import Message, RawUpstream, free_port, response


async def answer(status: int) -> RawUpstream:
    async def handler(req: Message, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(response(status, b"x", [("Connection", "close")]))
        await w.drain()
        return False

    return await RawUpstream(handler).start()


async def test_probe_once_reports_what_went_wrong() -> None:
    ok = await answer(204)
    bad = await answer(503)
    assert await probe_once("127.0.0.1", ok.port, "/health", 1.0) is None
    assert await probe_once("127.0.0.1", bad.port, "/health", 1.0) == "status 503"
    refused = await probe_once("127.0.0.1", free_port(), "/health", 1.0)
    assert refused is not None
    assert "refused" in refused.lower()
    assert ok.requests[0].target == "/health"
    assert ok.requests[0].header("User-Agent") == "meshgate-health"


async def test_probe_once_times_out() -> None:
    async def silent(req: Message, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    slow = await RawUpstream(silent).start()
    assert await probe_once("127.0.0.1", slow.port, "/", 0.2) == "no answer within 0.2s"


async def test_prober_flips_after_the_thresholds() -> None:
    status = 200

    async def handler(req: Message, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(response(status, b"x", [("Connection", "close")]))
        await w.drain()
        return False

    up = await RawUpstream(handler).start()
    changes: list[tuple[str, str, bool]] = []
    prober = Prober(lambda u, label, healthy: changes.append((u, label, healthy)))
    config = loads(
        f"upstreams:\n  up:\n    endpoints: ['{up.address}']\n"
        "    health: {active: {path: /h, interval: 100ms, timeout: 100ms,"
        " healthy_threshold: 2, unhealthy_threshold: 3}}\n"
    )
    prober.configure(config)
    try:
        await asyncio.sleep(0.5)
        assert changes == []
        status = 500
        await asyncio.sleep(0.6)  # three failures
        assert changes == [("up", up.address, False)]
        state = prober.states()[("up", up.address)]
        assert state.last_error == "status 500"
        status = 200
        await asyncio.sleep(0.5)  # two successes
        assert changes[-1] == ("up", up.address, True)
    finally:
        prober.stop()
