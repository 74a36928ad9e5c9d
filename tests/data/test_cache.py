"""Cache in memory and on a real Redis: values, TTLs, cache-aside with stampede
protection, a Redis that fails (a closed port, a cut proxy) and comes back, and the
spans of its calls."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry

from meshgate.data import Cache, CacheUnavailableError
from meshgate.errors import ConfigError
from tests.data.conftest import service_url, tcp_proxy, unique

BACKENDS = [
    pytest.param("memory", id="memory"),
    pytest.param("redis", id="redis", marks=pytest.mark.services),
]


async def _clean(prefix: str) -> None:
    import redis.asyncio as redis

    client = redis.Redis.from_url(service_url("redis"))
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture(params=BACKENDS)
async def cache(request: pytest.FixtureRequest) -> AsyncIterator[Cache]:
    prefix = unique("mgtest") + ":"
    url = None if request.param == "memory" else service_url("redis")
    made = Cache(url, prefix=prefix, name=unique("cache"), registry=CollectorRegistry())
    try:
        yield made
    finally:
        await made.close()
        if request.param == "redis":
            await _clean(prefix)


class Loader:
    """Counts its calls; each takes ``delay`` seconds."""

    def __init__(self, value: object = "loaded", delay: float = 0.05) -> None:
        self.value = value
        self.delay = delay
        self.calls = 0

    async def __call__(self) -> object:
        self.calls += 1
        await asyncio.sleep(self.delay)
        return self.value


def test_the_default_cache_is_in_memory() -> None:
    assert Cache().backend == "memory"
    assert Cache(None, registry=CollectorRegistry()).backend == "memory"
    assert Cache("redis://127.0.0.1:6379/0", registry=CollectorRegistry()).backend == "redis"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("memcached://h", "not a cache URL"),
        ("memory://something", "takes nothing"),
    ],
)
def test_bad_urls_are_config_errors(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Cache(url, registry=CollectorRegistry())


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"jitter: got 1\.5"):
        Cache(jitter=1.5, registry=CollectorRegistry())


async def test_set_get_delete(cache: Cache) -> None:
    assert await cache.ping() is True
    await cache.check()
    assert await cache.get("k") is None
    assert await cache.get("k", "fallback") == "fallback"
    await cache.set("k", {"a": [1, 2.5, "x"], "b": None, "t": (1, 2)})
    assert await cache.get("k") == {"a": [1, 2.5, "x"], "b": None, "t": [1, 2]}
    await cache.set("none", None)
    assert await cache.get("none", "fallback") is None  # a stored None is not a miss
    assert await cache.delete("k") is True
    assert await cache.delete("k") is False
    assert await cache.get("k") is None


async def test_values_expire(cache: Cache) -> None:
    await cache.set("short", 1, ttl=0.1)
    await cache.set("long", 2, ttl=30)
    await asyncio.sleep(0.2)
    assert await cache.get("short") is None
    assert await cache.get("long") == 2


async def test_bad_values_and_ttls(cache: Cache) -> None:
    with pytest.raises(TypeError, match="JSON-serializable"):
        await cache.set("k", object())
    with pytest.raises(ValueError, match="ttl"):
        await cache.set("k", 1, ttl=0)


async def test_get_or_load_is_cache_aside(cache: Cache) -> None:
    loader = Loader({"id": 1})
    assert await cache.get_or_load("user:1", loader, ttl=30) == {"id": 1}
    assert await cache.get_or_load("user:1", loader, ttl=30) == {"id": 1}
    assert loader.calls == 1
    assert await cache.get("user:1") == {"id": 1}


async def test_a_stampede_loads_once(cache: Cache) -> None:
    loader = Loader("v", delay=0.2)
    results = await asyncio.gather(*(cache.get_or_load("hot", loader) for _ in range(100)))
    assert results == ["v"] * 100
    assert loader.calls == 1


async def test_a_failing_loader_fails_every_waiter_and_stores_nothing(cache: Cache) -> None:
    calls = 0

    async def failing() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        raise LookupError("no such user")

    results = await asyncio.gather(
        *(cache.get_or_load("bad", failing) for _ in range(10)), return_exceptions=True
    )
    assert calls == 1
    assert all(isinstance(r, LookupError) for r in results)
    assert await cache.get("bad", "missing") == "missing"
    assert await cache.get_or_load("bad", Loader("fixed")) == "fixed"


async def test_a_caller_that_gives_up_does_not_cancel_the_others(cache: Cache) -> None:
    loader = Loader("v", delay=0.2)
    impatient = asyncio.ensure_future(cache.get_or_load("k", loader))
    patient = asyncio.ensure_future(cache.get_or_load("k", loader))
    await asyncio.sleep(0.05)
    impatient.cancel()
    assert await patient == "v"
    assert loader.calls == 1


@pytest.mark.services
async def test_a_stampede_across_processes_loads_once(redis_url: str) -> None:
    # Two Cache objects on one Redis stand for two processes: only the Redis lock
    # can coalesce them.
    prefix = unique("mgtest") + ":"
    registry = CollectorRegistry()
    first = Cache(redis_url, prefix=prefix, name="first", registry=registry)
    second = Cache(redis_url, prefix=prefix, name="second", registry=registry)
    loader = Loader("shared", delay=0.3)
    try:
        results = await asyncio.gather(
            *(c.get_or_load("hot", loader) for _ in range(50) for c in (first, second))
        )
    finally:
        await first.close()
        await second.close()
        await _clean(prefix)
    assert results == ["shared"] * 100
    assert loader.calls == 1
    remote = sum(
        registry.get_sample_value("meshgate_cache_coalesced_total", {"cache": n, "scope": "remote"})
        or 0
        for n in ("first", "second")
    )
    assert remote == 1  # the losing process's one flight found the winner's value


@pytest.mark.services
async def test_redis_down_plain_calls_raise_and_get_or_load_degrades(
    closed_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="meshgate.data")
    registry = CollectorRegistry()
    async with Cache(
        f"redis://:s3cret-pw@127.0.0.1:{closed_port}/0", name="down", registry=registry
    ) as cache:
        assert await cache.ping() is False
        with pytest.raises(CacheUnavailableError) as info:
            await cache.get("k")
        assert f"127.0.0.1:{closed_port}" in str(info.value)
        assert "s3cret-pw" not in str(info.value)
        assert info.value.status == 503
        with pytest.raises(CacheUnavailableError):
            await cache.set("k", 1)
        with pytest.raises(CacheUnavailableError):
            await cache.delete("k")
        loader = Loader("from the source", delay=0)
        for _ in range(3):
            assert await cache.get_or_load("k", loader) == "from the source"
        assert loader.calls == 3
    warnings = [r for r in caplog.records if "loading from the source" in r.getMessage()]
    assert len(warnings) == 1  # logged once, counted every time
    assert "s3cret-pw" not in caplog.text
    labels = {"cache": "down", "reason": "degraded"}
    assert registry.get_sample_value("meshgate_cache_loads_total", labels) == 3
    errors = registry.get_sample_value(
        "meshgate_cache_errors_total", {"cache": "down", "operation": "get"}
    )
    assert (errors or 0) >= 4


@pytest.mark.services
async def test_redis_cut_and_restored(redis_url: str) -> None:
    target = urlsplit(redis_url)
    assert target.port is not None
    prefix = unique("mgtest") + ":"
    async with tcp_proxy(target.port) as proxy:
        cache = Cache(
            f"redis://127.0.0.1:{proxy.port}/0",
            prefix=prefix,
            timeout=0.5,
            registry=CollectorRegistry(),
        )
        try:
            await cache.set("k", "before")
            assert await cache.get("k") == "before"
            proxy.cut()
            with pytest.raises(CacheUnavailableError):
                await cache.get("k")
            assert await cache.ping() is False
            assert await cache.get_or_load("other", Loader("degraded")) == "degraded"
            proxy.restore()
            # The dropped connection is replaced on the next command.
            assert await cache.get("k") == "before"
            assert await cache.ping() is True
            loader = Loader("fresh")
            assert await cache.get_or_load("again", loader) == "fresh"
            assert await cache.get_or_load("again", loader) == "fresh"
            assert loader.calls == 1
        finally:
            await cache.close()
            await _clean(prefix)


async def test_memory_cache_evicts_the_least_recently_used() -> None:
    async with Cache(max_entries=2, registry=CollectorRegistry()) as cache:
        await cache.set("a", 1)
        await cache.set("b", 2)
        assert await cache.get("a") == 1  # b is now the least recently used
        await cache.set("c", 3)
        assert await cache.get("b") is None
        assert await cache.get("a") == 1
        assert await cache.get("c") == 3


async def test_hits_and_misses_are_counted() -> None:
    registry = CollectorRegistry()
    async with Cache(name="counted", registry=registry) as cache:
        await cache.get("k")
        await cache.set("k", 1)
        await cache.get("k")
        await cache.get_or_load("k", Loader())
    assert registry.get_sample_value("meshgate_cache_hits_total", {"cache": "counted"}) == 2
    assert registry.get_sample_value("meshgate_cache_misses_total", {"cache": "counted"}) == 1


# ---------------------------------------------------------------------------- spans


def traced(cache: Cache) -> InMemorySpanExporter:
    """Give ``cache`` a tracer whose spans are kept in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    cache.tracer = provider.get_tracer("test")
    return exporter


async def test_calls_inside_a_recorded_span_make_spans_of_their_own(cache: Cache) -> None:
    spans = traced(cache)
    request = cache.tracer.start_span("GET /orders/{id}")
    with trace.use_span(request, end_on_exit=True):
        await cache.set("k", "v")
        assert await cache.get("k") == "v"
        assert await cache.get("nothing") is None
        assert await cache.get_or_load("k", Loader()) == "v"
        assert await cache.get_or_load("new", Loader("fresh", delay=0)) == "fresh"
        assert await cache.delete("k") is True
    *calls, outer = spans.get_finished_spans()
    assert outer.name == "GET /orders/{id}"
    assert [s.name for s in calls] == [
        f"cache {op} {cache.name}"
        for op in ("set", "get", "get", "get_or_load", "get_or_load", "delete")
    ]
    for span in calls:
        assert span.parent is not None
        assert span.parent.span_id == outer.context.span_id
        attributes = dict(span.attributes or {})
        assert attributes["meshgate.cache.name"] == cache.name
        assert attributes["meshgate.cache.backend"] == cache.backend
        # Keys and values are never recorded.
        assert not {"k", "v", "fresh", "new"} & {str(v) for v in attributes.values()}
    redis = cache.backend == "redis"
    assert {s.kind for s in calls} == {SpanKind.CLIENT if redis else SpanKind.INTERNAL}
    assert ("db.system" in dict(calls[0].attributes or {})) is redis
    outcomes = [dict(s.attributes or {}).get("meshgate.cache.outcome") for s in calls]
    assert outcomes == [None, None, None, "hit", "miss", None]
    hits = [dict(s.attributes or {}).get("meshgate.cache.hit") for s in calls]
    assert hits == [None, True, False, True, False, None]


async def test_the_loader_runs_inside_the_get_or_load_span(cache: Cache) -> None:
    spans = traced(cache)
    tracer = cache.tracer

    async def load() -> str:
        with tracer.start_as_current_span("SELECT orders"):
            return "row"

    with tracer.start_as_current_span("request"):
        await cache.get_or_load("order:1", load)
    query, call, _ = spans.get_finished_spans()
    assert query.name == "SELECT orders"
    assert query.parent is not None
    assert query.parent.span_id == call.context.span_id


async def test_no_span_outside_a_recorded_one(cache: Cache) -> None:
    spans = traced(cache)
    await cache.set("k", 1)
    await cache.get_or_load("k", Loader())
    unsampled = trace.NonRecordingSpan(cache.tracer.start_span("x").get_span_context())
    with trace.use_span(unsampled):
        await cache.get("k")
    assert [s.name for s in spans.get_finished_spans()] == []


@pytest.mark.services
async def test_a_failing_redis_call_is_an_error_span(closed_port: int) -> None:
    async with Cache(
        f"redis://127.0.0.1:{closed_port}/0", name="down", registry=CollectorRegistry()
    ) as cache:
        spans = traced(cache)
        with cache.tracer.start_as_current_span("request"):
            with pytest.raises(CacheUnavailableError):
                await cache.get("k")
            assert await cache.get_or_load("k", Loader("source", delay=0)) == "source"
    failed, degraded, _ = spans.get_finished_spans()
    assert failed.status.status_code is StatusCode.ERROR
    assert [e.name for e in failed.events] == ["exception"]
    assert dict(degraded.attributes or {})["meshgate.cache.outcome"] == "degraded"
    assert degraded.status.status_code is StatusCode.UNSET  # the caller got its value
