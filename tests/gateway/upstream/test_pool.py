"""The upstream pool never hands one client's response to another: a connection that
says anything no request asked for (bytes after a complete response, or while idle) is
closed and counted, never reused.

The upstream here is a "CL.0" server: it ignores a request's Content-Length, so the
bytes of a body become a request of their own, whose response must reach nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from prometheus_client import CollectorRegistry, generate_latest

from meshgate.gateway.metrics import GatewayCollector, merge_snapshots
from meshgate.gateway.upstream.pool import Endpoint
from meshgate.gateway.worker import Worker
from tests.helpers import Client, build_request, gateway_yaml, response, run_gateway

ROUTE = "  - {name: all, upstream: up}\n"
SMUGGLED = b"GET /secret HTTP/1.1\r\nHost: x\r\n\r\n"


class ClZeroUpstream:
    """Answers every request head it finds, body bytes included, with the target as
    the body; ``delay`` holds back the answers to all but the first head of a read."""

    def __init__(self, delay: float | None = None, extra: bytes = b"") -> None:
        self.delay = delay
        self.extra = extra  # bytes sent after every response, in the same write
        self.targets: list[str] = []
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> ClZeroUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        buf = b""
        while data := await reader.read(65536):
            buf += data
            answers = []
            while (end := buf.find(b"\r\n\r\n")) >= 0:
                head, buf = buf[:end], buf[end + 4 :]
                target = head.split(b" ", 2)[1]
                self.targets.append(target.decode())
                method = head.split(b" ", 1)[0]
                body = b"" if method == b"HEAD" else target
                answers.append(response(200, body, [("X-Target", target.decode())]) + self.extra)
            if not answers:
                continue
            writer.write(answers[0])
            if answers[1:]:
                if self.delay is not None:
                    await writer.drain()
                    await asyncio.sleep(self.delay)
                writer.write(b"".join(answers[1:]))
        writer.close()

    async def close(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        if self.server is not None:
            self.server.close()


@contextlib.asynccontextmanager
async def gateway(up: ClZeroUpstream) -> AsyncIterator[tuple[Worker, int, Endpoint]]:
    config = gateway_yaml({"up": [f"127.0.0.1:{up.port}"]}, ROUTE)
    try:
        async with run_gateway(config) as (worker, port):
            yield worker, port, worker.runtime.upstreams["up"].endpoints[0]
    finally:
        await up.close()


async def wait_for(condition: object, what: str) -> None:
    async with asyncio.timeout(10):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.005)


async def test_a_second_response_in_the_same_read_is_never_delivered() -> None:
    up = await ClZeroUpstream().start()
    async with gateway(up) as (worker, port, endpoint):
        attacker = await Client.connect(port)
        res = await attacker.request("POST", "/upload", body=SMUGGLED)
        assert res.status == 200
        assert res.body == b"/upload"
        await wait_for(lambda: endpoint.discarded == 1, "the connection is discarded")
        registry = CollectorRegistry(auto_describe=False)
        data = merge_snapshots([worker.snapshot()])
        registry.register(GatewayCollector(lambda: data))
        text = generate_latest(registry).decode()
        line = f'endpoint="{endpoint.label}",upstream="up"}} 1.0'
        assert "meshgate_gateway_upstream_connections_discarded_total{" + line in text
        for _ in range(3):
            victim = await Client.connect(port)
            res = await victim.request("GET", "/mine")
            assert res.body == b"/mine", res.body
            await victim.close()
    assert up.targets.count("/secret") == 1


async def test_a_response_arriving_while_idle_is_never_delivered() -> None:
    up = await ClZeroUpstream(delay=0.05).start()
    async with gateway(up) as (_, port, endpoint):
        attacker = await Client.connect(port)
        res = await attacker.request("POST", "/upload", body=SMUGGLED)
        assert res.body == b"/upload"
        await wait_for(lambda: endpoint.discarded == 1, "the idle connection is discarded")
        assert endpoint.idle == []
        victim = await Client.connect(port)
        res = await victim.request("GET", "/mine")
        assert res.body == b"/mine", res.body


async def test_a_pipelined_request_never_gets_the_smuggled_response() -> None:
    up = await ClZeroUpstream().start()
    async with gateway(up) as (_, port, endpoint):
        client = await Client.connect(port)
        await client.send(
            build_request("POST", "/upload", body=SMUGGLED) + build_request("GET", "/mine")
        )
        first = await client.read()
        second = await client.read()
        assert first.body == b"/upload"
        assert second.body == b"/mine", second.body
        assert endpoint.discarded == 1


async def test_bytes_after_a_head_response_end_the_connection() -> None:
    up = await ClZeroUpstream(extra=b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\npoison!").start()
    async with gateway(up) as (_, port, endpoint):
        client = await Client.connect(port)
        await client.send(build_request("HEAD", "/h"))
        assert (await client.read()).status == 200
        await wait_for(lambda: endpoint.discarded == 1, "the connection is discarded")
        await client.send(build_request("GET", "/mine"))
        res = await client.read()
        assert res.body.startswith(b"/mine"), res.body


async def test_a_clean_upstream_keeps_its_connection() -> None:
    up = await ClZeroUpstream().start()
    async with gateway(up) as (_, port, endpoint):
        client = await Client.connect(port)
        for i in range(5):
            res = await client.request("GET", f"/n{i}")
            assert res.body == f"/n{i}".encode()
        res = await client.request("HEAD", "/h")
        assert res.status == 200
        res = await client.request("GET", "/after-head")
        assert res.body == b"/after-head"
        assert endpoint.discarded == 0
        assert endpoint.open == 1


def test_success_and_failure_accounting_of_an_endpoint() -> None:
    from meshgate.gateway.upstream.health import CircuitBreaker
    from meshgate.gateway.upstream.pool import EWMA_WEIGHT, record_failure, record_success

    endpoint = Endpoint("127.0.0.1", 9)
    record_failure(endpoint, 5.0, None, None)
    record_failure(endpoint, 6.0, None, None)
    assert (endpoint.failures, endpoint.last_failure) == (2, 6.0)
    record_success(endpoint, 0.010, None, 7.0)
    assert endpoint.failures == 0
    assert endpoint.ewma == 0.010  # the first sample is the average
    record_success(endpoint, 0.020, None, 8.0)
    assert abs(endpoint.ewma - (0.010 + 0.010 * EWMA_WEIGHT)) < 1e-12
    record_success(endpoint, 0.0, None, 9.0)  # not measured: the average stays
    assert abs(endpoint.ewma - 0.013) < 1e-12

    class Breaker:
        def __init__(self) -> None:
            self.seen: list[tuple[bool, float]] = []

        def record(self, ok: bool, now: float) -> None:
            self.seen.append((ok, now))

    breaker = Breaker()
    record_success(endpoint, 0.01, breaker, 10.0)  # type: ignore[arg-type]
    record_failure(endpoint, 11.0, None, breaker)  # type: ignore[arg-type]
    assert breaker.seen == [(True, 10.0), (False, 11.0)]
    assert CircuitBreaker is not None
