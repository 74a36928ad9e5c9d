"""A cache with one async API over two backends: in process (``memory://``, the
default) and Redis (``redis://``, ``rediss://``, ``unix://``).

Values are anything :func:`json.dumps` accepts (dicts, lists, strings, numbers,
booleans, None) and come back as :func:`json.loads` makes them: a copy, with tuples
turned into lists. A stored None is a value, distinct from a miss.

:meth:`Cache.get_or_load` is cache-aside with stampede protection: concurrent misses
of one key in one process run the loader once (single flight); with Redis, a short
``SET NX PX`` lock extends that across processes, and callers that find the lock
taken poll for the value, then load themselves after ``lock_wait`` seconds. Every
TTL is shortened by a random fraction of up to ``jitter`` so that keys written
together do not expire together.

Failure behaviour: :meth:`Cache.get`, :meth:`Cache.set` and :meth:`Cache.delete`
raise :class:`~meshgate.data.errors.CacheUnavailableError` when Redis fails.
:meth:`Cache.get_or_load` does not: a cache that fails must not fail the request
it was meant to speed up, so it calls the loader and returns its value (logged at
most every 10 s per cache, counted in ``meshgate_cache_errors_total`` and
``meshgate_cache_loads_total{reason="degraded"}``). The cost is load on the source
of truth while Redis is down: there is no cross-process single flight then (the
in-process one still holds).

Traces: inside a recorded span (a traced request), ``get``, ``set``, ``delete`` and
``get_or_load`` each make a span (``cache get users``, a CLIENT span with Redis, an
internal one in memory) with the cache's name and backend, whether a lookup hit, and
for ``get_or_load`` its outcome (hit, miss, coalesced, degraded); the loader's own
spans (its queries) are its children. Keys and values are never recorded. Outside a
recorded span, nothing is made: no trace of one cache call on its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from types import TracebackType
from typing import Any, Final, Protocol, Self, TypeVar, cast

from opentelemetry import trace
from prometheus_client import CollectorRegistry

from meshgate.data._engines import mask_url
from meshgate.data._metrics import cache_metrics
from meshgate.data.cache._memory import MemoryBackend
from meshgate.data.errors import CacheUnavailableError
from meshgate.errors import ConfigError, ConfigIssue

__all__ = ["Cache"]

log = logging.getLogger("meshgate.data")

T = TypeVar("T")

_WARN_EVERY = 10.0
"""Seconds between two log lines about a failing cache."""
_POLL_FIRST = 0.01
_POLL_MAX = 0.1
"""Waiting for another process's load: first poll after 10 ms, then doubling up to 100 ms."""
_LOCK_NAMESPACE = "__meshgate_lock__:"
_TRACER = trace.get_tracer("meshgate.data.cache")


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


_MISSING: Final = _Missing()


class _Backend(Protocol):
    distributed: bool

    async def get(self, key: str) -> bytes | None: ...
    async def set(self, key: str, data: bytes, ttl: float) -> None: ...
    async def delete(self, key: str) -> bool: ...
    async def ping(self) -> None: ...
    async def close(self) -> None: ...
    async def try_lock(self, key: str, token: str, ttl: float) -> bool: ...
    async def unlock(self, key: str, token: str) -> None: ...
    async def peek(self, key: str, lock: str) -> tuple[bytes | None, bool]: ...


def _encode(key: str, value: Any) -> bytes:
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"cache key {key!r}: the value must be JSON-serializable (dict, list, str, "
            f"int, float, bool or None), got {type(value).__name__}: {exc}"
        ) from exc


class Cache:
    """A cache: ``memory://`` (the default: in this process, LRU with at most
    ``max_entries`` values) or Redis (``redis://host:6379/0``, ``rediss://`` for TLS, ``unix:///path.sock``).

    Keys are strings stored as ``prefix + key``; give each service its own prefix
    (``"users:"``) when they share a Redis. TTLs are seconds: ``default_ttl`` when not
    given. ``timeout`` bounds each Redis round trip; ``lock_ttl`` is how long a
    process loading a key holds its lock at most, and ``lock_wait`` how long another
    process waits for that load before loading itself.

    Raises :class:`~meshgate.errors.ConfigError` for a bad URL or setting; nothing
    connects until first use.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        prefix: str = "",
        default_ttl: float = 60.0,
        jitter: float = 0.1,
        max_entries: int = 10_000,
        timeout: float = 1.0,
        lock_ttl: float = 10.0,
        lock_wait: float = 5.0,
        name: str = "default",
        registry: CollectorRegistry | None = None,
    ) -> None:
        source = f"cache {name!r}"
        if url is None:
            url = "memory://"
        _check_settings(
            source,
            default_ttl=default_ttl,
            jitter=jitter,
            max_entries=max_entries,
            timeout=timeout,
            lock_ttl=lock_ttl,
            lock_wait=lock_wait,
        )
        self.name = name
        """The ``cache`` label of this cache's metrics and the name in its errors."""
        self.url = mask_url(url) if isinstance(url, str) else repr(url)
        """The URL with its password masked."""
        self.prefix = prefix
        self.default_ttl = default_ttl
        self.jitter = jitter
        self.lock_ttl = lock_ttl
        self.lock_wait = lock_wait
        self._backend = _make_backend(
            url, shown=self.url, max_entries=max_entries, timeout=timeout, name=name, source=source
        )
        metrics = cache_metrics(registry)
        self._hits = metrics.hits.labels(name)
        self._misses = metrics.misses.labels(name)
        self._loads = {r: metrics.loads.labels(name, r) for r in ("miss", "lock_wait", "degraded")}
        self._coalesced = {s: metrics.coalesced.labels(name, s) for s in ("local", "remote")}
        self._errors = metrics.errors
        self._inflight: dict[str, asyncio.Future[Any]] = {}
        self._last_warning = -math.inf
        self._suppressed = 0
        self.tracer: trace.Tracer = _TRACER
        """The tracer of its spans: the process's, until the service it belongs to
        gives its own (``service.telemetry.instrument_cache``)."""
        distributed = self._backend.distributed
        self._span_kind = trace.SpanKind.CLIENT if distributed else trace.SpanKind.INTERNAL
        self._span_attributes: dict[str, str] = {
            "meshgate.cache.name": name,
            "meshgate.cache.backend": self.backend,
        }
        if distributed:
            self._span_attributes["db.system"] = "redis"

    @property
    def backend(self) -> str:
        """``memory`` or ``redis``."""
        return "redis" if self._backend.distributed else "memory"

    def __repr__(self) -> str:
        return f"Cache({self.url!r}, prefix={self.prefix!r}, name={self.name!r})"

    # -- lifecycle

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connections (Redis) or drop the values (memory)."""
        await self._backend.close()

    # -- the API

    def _span(self, operation: str) -> AbstractContextManager[trace.Span | None]:
        """A span for one call, only inside a recorded span (see the module)."""
        if not trace.get_current_span().is_recording():
            return nullcontext()
        return self.tracer.start_as_current_span(
            f"cache {operation} {self.name}",
            kind=self._span_kind,
            attributes=self._span_attributes,
        )

    async def get(self, key: str, default: Any = None) -> Any:
        """The value under ``key``, or ``default`` when there is none (or it expired).

        Raises :class:`~meshgate.data.errors.CacheUnavailableError` when Redis fails.
        """
        with self._span("get") as span:
            value = await self._fetch(key)
            hit = value is not _MISSING
            if span is not None:
                span.set_attribute("meshgate.cache.hit", hit)
        if not hit:
            self._misses.inc()
            return default
        self._hits.inc()
        return value

    async def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Store ``value`` (JSON-serializable, else TypeError) for ``ttl`` seconds
        (``default_ttl`` when None), less up to ``jitter`` of it.

        Raises :class:`~meshgate.data.errors.CacheUnavailableError` when Redis fails.
        """
        data = _encode(key, value)
        try:
            with self._span("set"):
                await self._backend.set(self.prefix + key, data, self._ttl(ttl))
        except CacheUnavailableError:
            self._errors.labels(self.name, "set").inc()
            raise

    async def delete(self, key: str) -> bool:
        """Remove ``key``; whether it was there.

        Raises :class:`~meshgate.data.errors.CacheUnavailableError` when Redis fails.
        """
        try:
            with self._span("delete"):
                return await self._backend.delete(self.prefix + key)
        except CacheUnavailableError:
            self._errors.labels(self.name, "delete").inc()
            raise

    async def check(self) -> None:
        """Ask the backend for a sign of life; raise
        :class:`~meshgate.data.errors.CacheUnavailableError` saying why there is none."""
        await self._backend.ping()

    async def ping(self) -> bool:
        """Whether the backend answers (always True in memory); for readiness checks."""
        try:
            await self._backend.ping()
        except CacheUnavailableError as exc:
            log.debug("ping failed: %s", exc)
            return False
        return True

    async def get_or_load(
        self, key: str, loader: Callable[[], Awaitable[T]], ttl: float | None = None
    ) -> T:
        """The cached value of ``key``; on a miss, ``await loader()``, store its value
        for ``ttl`` seconds and return it.

        Concurrent misses of one key share one loader call: in this process always,
        across processes with Redis (module docstring). An exception of the loader
        reaches every caller sharing that call and nothing is stored. When the cache
        fails, the loader is called and its value returned: this method raises only
        what the loader raises (and TypeError for a value JSON cannot encode).
        """
        with self._span("get_or_load") as span:
            return await self._get_or_load(key, loader, ttl, span)

    async def _get_or_load(
        self,
        key: str,
        loader: Callable[[], Awaitable[T]],
        ttl: float | None,
        span: trace.Span | None,
    ) -> T:
        try:
            value = await self._fetch(key)
        except CacheUnavailableError as exc:
            self._degraded(exc)
            self._loads["degraded"].inc()
            if span is not None:
                span.set_attribute("meshgate.cache.outcome", "degraded")
            return await loader()
        if value is not _MISSING:
            self._hits.inc()
            if span is not None:
                span.set_attributes({"meshgate.cache.hit": True, "meshgate.cache.outcome": "hit"})
            return cast("T", value)
        self._misses.inc()
        flight = self._inflight.get(key)
        if flight is None:
            outcome = "miss"
            flight = asyncio.ensure_future(self._load(key, loader, ttl))
            self._inflight[key] = flight
            flight.add_done_callback(partial(self._landed, key))
        else:
            outcome = "coalesced"
            self._coalesced["local"].inc()
        if span is not None:
            span.set_attributes({"meshgate.cache.hit": False, "meshgate.cache.outcome": outcome})
        # Shielded: a caller that gives up does not cancel the load the others wait for.
        return cast("T", await asyncio.shield(flight))

    # -- internals

    def _ttl(self, ttl: float | None) -> float:
        if ttl is None:
            ttl = self.default_ttl
        elif isinstance(ttl, bool) or not isinstance(ttl, int | float) or not ttl > 0:
            raise ValueError(f"cache ttl must be a number of seconds above 0, got {ttl!r}")
        # Shorter, never longer: the TTL asked for stays the bound on staleness.
        return ttl * (1.0 - self.jitter * random.random())  # noqa: S311 - spread, not secrecy

    async def _fetch(self, key: str) -> Any:
        """The decoded value under ``key``, or _MISSING (an undecodable value is a miss)."""
        try:
            data = await self._backend.get(self.prefix + key)
        except CacheUnavailableError:
            self._errors.labels(self.name, "get").inc()
            raise
        if data is None:
            return _MISSING
        return self._decode(key, data)

    def _decode(self, key: str, data: bytes) -> Any:
        try:
            return json.loads(data)
        except ValueError:
            # Written by something else, or by a different format: load it afresh.
            self._errors.labels(self.name, "decode").inc()
            log.warning(
                "cache %r: the value of key %r is not JSON; treated as a miss", self.name, key
            )
            return _MISSING

    def _landed(self, key: str, flight: asyncio.Future[Any]) -> None:
        if self._inflight.get(key) is flight:
            del self._inflight[key]
        if not flight.cancelled():
            flight.exception()  # retrieved: callers that gave up are not told twice

    async def _load(self, key: str, loader: Callable[[], Awaitable[Any]], ttl: float | None) -> Any:
        if not self._backend.distributed:
            self._loads["miss"].inc()
            value = await loader()
            await self._store(key, value, ttl)
            return value
        try:
            found = await self._wait_or_lock(key)
        except CacheUnavailableError as exc:
            self._degraded(exc)
            self._loads["degraded"].inc()
            return await loader()
        if isinstance(found, _Held):
            try:
                self._loads["miss"].inc()
                value = await loader()
                await self._store(key, value, ttl)
            finally:
                await self._unlock(found)
            return value
        if found is _MISSING:  # the other process's load took longer than lock_wait
            self._loads["lock_wait"].inc()
            value = await loader()
            await self._store(key, value, ttl)
            return value
        self._coalesced["remote"].inc()
        return found

    async def _wait_or_lock(self, key: str) -> Any:
        """Either the lock on ``key`` (a :class:`_Held`), the value another process
        stored while we waited, or _MISSING once ``lock_wait`` has passed."""
        backend = self._backend
        full = self.prefix + key
        lock = self.prefix + _LOCK_NAMESPACE + key
        token = secrets.token_hex(8)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lock_wait
        delay = _POLL_FIRST
        while True:
            try:
                taken = await backend.try_lock(lock, token, self.lock_ttl)
            except CacheUnavailableError:
                self._errors.labels(self.name, "lock").inc()
                raise
            if taken:
                # The holder before us may have stored the value just now.
                value = await self._fetch(key)
                if value is not _MISSING:
                    await self._unlock(_Held(lock, token))
                    return value
                return _Held(lock, token)
            while True:
                try:
                    data, held = await backend.peek(full, lock)
                except CacheUnavailableError:
                    self._errors.labels(self.name, "get").inc()
                    raise
                if data is not None:
                    value = self._decode(key, data)
                    if value is not _MISSING:
                        return value
                if not held:
                    break  # the holder gave up without a value: try to take over
                if loop.time() >= deadline:
                    return _MISSING
                await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
                delay = min(delay * 2, _POLL_MAX)

    async def _unlock(self, held: _Held) -> None:
        try:
            await self._backend.unlock(held.key, held.token)
        except CacheUnavailableError as exc:
            # The lock expires by itself after lock_ttl.
            self._errors.labels(self.name, "lock").inc()
            self._degraded(exc)

    async def _store(self, key: str, value: Any, ttl: float | None) -> None:
        data = _encode(key, value)
        try:
            await self._backend.set(self.prefix + key, data, self._ttl(ttl))
        except CacheUnavailableError as exc:
            self._errors.labels(self.name, "set").inc()
            self._degraded(exc)

    def _degraded(self, exc: CacheUnavailableError) -> None:
        now = time.monotonic()
        if now - self._last_warning < _WARN_EVERY:
            self._suppressed += 1
            return
        more = f" ({self._suppressed} more since the last report)" if self._suppressed else ""
        self._last_warning = now
        self._suppressed = 0
        log.warning("cache %r failed; loading from the source instead: %s%s", self.name, exc, more)


class _Held:
    """A load lock this process holds."""

    __slots__ = ("key", "token")

    def __init__(self, key: str, token: str) -> None:
        self.key = key
        self.token = token


def _make_backend(
    url: str, *, shown: str, max_entries: int, timeout: float, name: str, source: str
) -> _Backend:
    scheme = url.partition("://")[0].lower() if isinstance(url, str) and "://" in url else ""
    if scheme == "memory":
        if url.partition("://")[2] not in ("", "/"):
            raise ConfigError(
                [ConfigIssue("url", f"memory:// takes nothing after the scheme, got {shown}")],
                source,
            )
        return MemoryBackend(max_entries)
    if scheme in ("redis", "rediss", "unix"):
        try:
            from meshgate.data.cache._redis import RedisBackend  # noqa: PLC0415 - optional
        except ImportError:
            raise ConfigError(
                [
                    ConfigIssue(
                        "url",
                        f"{scheme}:// needs the redis package, which is not installed: "
                        "pip install 'meshgate[redis]'",
                    )
                ],
                source,
            ) from None
        try:
            return RedisBackend(url, timeout=timeout, where=f"cache {name!r} ({shown})")
        except ValueError as exc:
            raise ConfigError([ConfigIssue("url", f"cannot use {shown}: {exc}")], source) from None
    raise ConfigError(
        [
            ConfigIssue(
                "url",
                f"{shown} is not a cache URL: use memory:// (in this process), "
                "redis://host:6379/0, rediss://host:6380/0 or unix:///path/to/redis.sock",
            )
        ],
        source,
    )


def _check_settings(source: str, **values: float) -> None:
    rules: dict[str, tuple[Callable[[float], bool], str]] = {
        "default_ttl": (lambda v: v > 0, "a number of seconds above 0"),
        "jitter": (lambda v: 0 <= v < 1, "a fraction from 0 (none) to below 1, such as 0.1"),
        "max_entries": (lambda v: v >= 1 and float(v).is_integer(), "an integer of at least 1"),
        "timeout": (lambda v: v > 0, "a number of seconds above 0"),
        "lock_ttl": (lambda v: v > 0, "a number of seconds above 0"),
        "lock_wait": (lambda v: v >= 0, "a number of seconds, 0 or more"),
    }
    issues = []
    for field, value in values.items():
        ok, want = rules[field]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or math.isnan(value)
            or not ok(value)
        ):
            issues.append(ConfigIssue(field, f"got {value!r}; expected {want}"))
    if issues:
        raise ConfigError(issues, source)
