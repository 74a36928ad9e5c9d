"""A Redis rate limit is exact across the worker processes of a real ``meshgate gateway``.

Needs a real Redis at 127.0.0.1:6379 (skipped without one, failed with
MESHGATE_REQUIRE_SERVICES=1). Every key lives under a prefix unique to the test and is
deleted at teardown.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.conftest import DemoUpstream, GatewayFactory, gateway_config
from tests.e2e.test_gateway_process import Reply, get

pytestmark = [pytest.mark.e2e, pytest.mark.services]

REDIS_URL = "redis://127.0.0.1:6379/0"
QUOTA = 20
"""Requests the limit lets through: ``rate: 20/h, burst: 19`` passes 20 at once and
then one every 3 minutes, so none is refilled while the test runs."""
REQUESTS = 60
"""Requests sent at once, each on its own connection."""

_RATELIMIT_RE = re.compile(r'^"meshgate";r=(?P<r>\d+);t=(?P<t>\d+)$')


def test_redis_limit_is_exact_across_two_workers(
    start_gateway: GatewayFactory, demo_upstream: DemoUpstream, redis_prefix: str
) -> None:
    # Failing closed: a Redis problem shows as 503s instead of passing unlimited.
    route = (
        "  - name: api\n"
        "    match: {path_prefix: /api}\n"
        "    upstream: up\n"
        "    strip_prefix: true\n"
        f"    rate_limit: {{rate: 20/h, burst: {QUOTA - 1}, by: route, redis: '{REDIS_URL}',"
        f" key_prefix: '{redis_prefix}', on_redis_error: closed}}\n"
    )
    gw = start_gateway(gateway_config(demo_upstream.address, route), workers=2)
    start = threading.Barrier(REQUESTS, timeout=20)

    def one(i: int) -> Reply:
        # Each request on its own connection: SO_REUSEPORT spreads connections over
        # the workers by the client port.
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=20)
        try:
            conn.connect()
            start.wait()
            conn.request("GET", f"/api/items/{i}")
            return Reply(conn.getresponse())
        finally:
            conn.close()

    with ThreadPoolExecutor(REQUESTS) as pool:
        replies = list(pool.map(one, range(REQUESTS)))

    statuses = Counter(r.status for r in replies)
    assert statuses == {200: QUOTA, 429: REQUESTS - QUOTA}, f"{statuses}\n{gw.log()}"
    workers = {r.worker for r in replies}
    assert len(workers) == 2, f"every request was served by one worker: {workers}"

    passed = [r for r in replies if r.status == 200]
    refused = [r for r in replies if r.status == 429]
    for reply in replies:
        assert reply.headers["ratelimit-policy"] == f'"meshgate";q={QUOTA};w=3600'
    # Each pass took one place in the one bucket: every remaining count once.
    remaining = []
    for reply in passed:
        assert reply.json()["path"].startswith("/items/")
        found = _RATELIMIT_RE.match(reply.headers["ratelimit"])
        assert found is not None, reply.headers["ratelimit"]
        remaining.append(int(found["r"]))
    assert sorted(remaining) == list(range(QUOTA))
    for reply in refused:
        assert reply.json()["error"] == "rate_limited"
        # The next place opens one emission interval (3 minutes) after the first pass.
        assert 120 < int(reply.headers["retry-after"]) <= 180
        found = _RATELIMIT_RE.match(reply.headers["ratelimit"])
        assert found is not None
        assert int(found["r"]) == 0

    # The bucket is still empty for a newcomer on a new connection, whichever worker.
    late = [get(gw.port, "/api/late") for _ in range(4)]
    assert [r.status for r in late] == [429] * 4
    assert all(json.loads(r.body)["error"] == "rate_limited" for r in late)
