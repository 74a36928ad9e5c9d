"""A minimal pipelined Redis client for the gateway's hot path (rate limiting).

One connection per worker and Redis URL carries every request's command without
waiting for earlier replies (RESP is answered in order), so a round trip costs one
write and a share of one read. Commands are pre-encoded by the caller; this module
only frames, sends and parses replies (integers, strings, arrays, errors). It is
hand-written because a general client's per-call overhead is several times the
whole cost of forwarding a request. Control-plane uses of Redis go through redis-py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any
from urllib.parse import urlsplit

__all__ = ["RedisError", "RespClient", "command"]


class RedisError(Exception):
    """Redis answered with an error, or could not be reached."""


def command(*parts: bytes) -> bytes:
    """A RESP command: ``command(b"GET", b"key")``."""
    out = [b"*%d\r\n" % len(parts)]
    out.extend(b"$%d\r\n%s\r\n" % (len(part), part) for part in parts)
    return b"".join(out)


class _Protocol(asyncio.Protocol):
    def __init__(self, client: RespClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiting: deque[asyncio.Future[Any]] = deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        pos = 0
        waiting = self.waiting
        while waiting:
            parsed = _parse(buffer, pos)
            if parsed is None:
                break
            value, pos = parsed
            future = waiting.popleft()
            if not future.done():
                if isinstance(value, RedisError):
                    future.set_exception(value)
                else:
                    future.set_result(value)
        if pos:
            del buffer[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.lost(self)
        error = RedisError(f"the connection to Redis closed: {exc or 'EOF'}")
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)


def _line_end(buffer: bytearray, pos: int) -> int:
    return buffer.find(b"\r\n", pos)


def _parse(buffer: bytearray, pos: int) -> tuple[Any, int] | None:
    """One reply at ``pos``: (value, next position), or None if it is incomplete."""
    end = _line_end(buffer, pos)
    if end < 0:
        return None
    kind = buffer[pos]
    line = bytes(buffer[pos + 1 : end])
    if kind == 58:  # ":"
        return int(line), end + 2
    if kind == 43:  # "+"
        return line, end + 2
    if kind == 45:  # "-"
        return RedisError(line.decode("utf-8", "replace")), end + 2
    if kind == 36:  # "$"
        size = int(line)
        if size < 0:
            return None, end + 2
        start = end + 2
        if len(buffer) < start + size + 2:
            return None
        return bytes(buffer[start : start + size]), start + size + 2
    if kind == 42:  # "*"
        count = int(line)
        items = []
        next_pos = end + 2
        for _ in range(max(count, 0)):
            parsed = _parse(buffer, next_pos)
            if parsed is None:
                return None
            item, next_pos = parsed
            items.append(item)
        return (items if count >= 0 else None), next_pos
    raise RedisError(f"unexpected reply from Redis: {bytes(buffer[pos : pos + 20])!r}")


class RespClient:
    """Sends pre-encoded commands to one Redis server; reconnects when needed."""

    def __init__(self, url: str, timeout: float = 1.0) -> None:
        parts = urlsplit(url)
        self._unix = parts.path if parts.scheme == "unix" else None
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 6379
        self._db = (parts.path or "/0").lstrip("/") or "0" if parts.scheme != "unix" else "0"
        self._password = parts.password
        self.timeout = timeout
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None

    def lost(self, protocol: _Protocol) -> None:
        if self._protocol is protocol:
            self._protocol = None

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        if self._unix:
            _, protocol = await loop.create_unix_connection(lambda: _Protocol(self), self._unix)
        else:
            _, protocol = await loop.create_connection(
                lambda: _Protocol(self), self._host, self._port
            )
        setup = []
        if self._password:
            setup.append(command(b"AUTH", self._password.encode()))
        if self._db != "0":
            setup.append(command(b"SELECT", self._db.encode()))
        self._protocol = protocol
        for frame in setup:
            await self._send(protocol, frame)
        return protocol

    async def _connection(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None:
            return protocol
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._connect())
        try:
            return await asyncio.wait_for(asyncio.shield(self._connecting), self.timeout)
        except (OSError, TimeoutError) as exc:
            raise RedisError(f"cannot reach Redis at {self._host}:{self._port}: {exc}") from None

    def _send(self, protocol: _Protocol, frame: bytes) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        protocol.waiting.append(future)
        assert protocol.transport is not None  # noqa: S101 - set on connection
        protocol.transport.write(frame)
        return future

    async def call(self, frame: bytes) -> Any:
        """Send one encoded command and return its reply.

        Raises:
            RedisError: an error reply, or Redis unreachable or too slow.
        """
        protocol = self._protocol
        if protocol is None:
            protocol = await self._connection()
        future = self._send(protocol, frame)
        try:
            return await asyncio.wait_for(future, self.timeout)
        except TimeoutError:
            # A reply that comes later would be matched to the wrong request.
            self.close()
            raise RedisError(f"Redis did not answer within {self.timeout:g}s") from None

    def close(self) -> None:
        """Drop the connection (the next call reconnects)."""
        protocol = self._protocol
        self._protocol = None
        if protocol is not None and protocol.transport is not None:
            with contextlib.suppress(Exception):
                protocol.transport.abort()
