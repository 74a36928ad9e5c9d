"""The Redis cache backend (redis.asyncio).

Every failure (refused connection, timeout, an error reply) becomes
:class:`~meshgate.data.errors.CacheUnavailableError`. A command is retried once,
at once, on a connection error, so that a connection dropped by a Redis restart
costs nothing; a Redis that is down fails within ``timeout``.
"""

from __future__ import annotations

import math
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from meshgate.data.errors import CacheUnavailableError

__all__ = ["RedisBackend"]

_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
"""Delete the lock only if it is still ours (it may have expired and been taken)."""


def _px(ttl: float) -> int:
    return max(1, math.ceil(ttl * 1000))


class RedisBackend:
    """Values under their keys with a TTL; a ``SET NX PX`` lock per key being loaded."""

    distributed = True

    def __init__(self, url: str, *, timeout: float, where: str) -> None:
        self._where = where
        # ValueError for a bad URL: the caller makes it a ConfigError.
        self._client: Redis = Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1),
        )
        self._unlock = self._client.register_script(_UNLOCK)

    def _failed(self, operation: str, exc: BaseException) -> CacheUnavailableError:
        reason = str(exc) or type(exc).__name__
        return CacheUnavailableError(f"{self._where}: {operation} failed: {reason}")

    async def get(self, key: str) -> bytes | None:
        try:
            data: Any = await self._client.get(key)
        except (RedisError, OSError) as exc:
            raise self._failed("get", exc) from exc
        return data  # type: ignore[no-any-return]

    async def set(self, key: str, data: bytes, ttl: float) -> None:
        try:
            await self._client.set(key, data, px=_px(ttl))
        except (RedisError, OSError) as exc:
            raise self._failed("set", exc) from exc

    async def delete(self, key: str) -> bool:
        try:
            deleted: Any = await self._client.delete(key)
        except (RedisError, OSError) as exc:
            raise self._failed("delete", exc) from exc
        return bool(deleted)

    async def ping(self) -> None:
        try:
            await self._client.ping()
        except (RedisError, OSError) as exc:
            raise self._failed("ping", exc) from exc

    async def close(self) -> None:
        await self._client.aclose()

    async def try_lock(self, key: str, token: str, ttl: float) -> bool:
        """Take the lock ``key`` for ``ttl`` seconds unless someone holds it."""
        try:
            taken: Any = await self._client.set(key, token, nx=True, px=_px(ttl))
        except (RedisError, OSError) as exc:
            raise self._failed("lock", exc) from exc
        return bool(taken)

    async def unlock(self, key: str, token: str) -> None:
        try:
            await self._unlock(keys=[key], args=[token])
        except (RedisError, OSError) as exc:
            raise self._failed("unlock", exc) from exc

    async def peek(self, key: str, lock: str) -> tuple[bytes | None, bool]:
        """The value of ``key``, and whether ``lock`` is held, in one round trip."""
        try:
            value, holder = await self._client.mget([key, lock])  # bytes: no decode_responses
        except (RedisError, OSError) as exc:
            raise self._failed("get", exc) from exc
        return value, holder is not None  # type: ignore[return-value]
