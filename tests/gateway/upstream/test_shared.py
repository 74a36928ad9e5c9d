"""Health shared between gateway nodes, against a real Redis."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from meshgate.config import loads
from meshgate.gateway.upstream.shared import SharedHealth
from tests.conftest import service_url

pytestmark = pytest.mark.services

service_url("redis", module_level=True)


async def test_one_node_sees_what_another_reports() -> None:
    import redis.asyncio as redis

    prefix = f"meshgate-test-{uuid.uuid4().hex}"
    config = loads(
        "upstreams:\n  users:\n    endpoints: ['10.0.0.1:80', '10.0.0.2:80']\n"
        f"    health: {{shared: {{redis: 'redis://127.0.0.1:6379/0', key_prefix: '{prefix}'}}}}\n"
    )
    seen_by_b: list[tuple[str, str, float]] = []
    a = SharedHealth(lambda *event: None)
    b = SharedHealth(lambda u, label, until: seen_by_b.append((u, label, until)))
    a.configure(config)
    b.configure(config)
    try:
        a.report("users", "10.0.0.1:80", time.time() + 30)
        async with asyncio.timeout(5):
            while not seen_by_b:
                await asyncio.sleep(0.05)
        upstream, label, until = seen_by_b[-1]
        assert (upstream, label) == ("users", "10.0.0.1:80")
        assert 25 < until - time.monotonic() <= 30
        a.report("users", "10.0.0.1:80", None)
        async with asyncio.timeout(5):
            while seen_by_b[-1][2] != 0.0:
                await asyncio.sleep(0.05)
        assert a.error is None
        assert b.error is None
    finally:
        await a.stop()
        await b.stop()
        client = redis.from_url("redis://127.0.0.1:6379/0")
        keys = await client.keys(f"{prefix}:*")
        if keys:
            await client.delete(*keys)
        await client.aclose()
