"""A minimal pipelined Redis client for the gateway's hot path (rate limiting).

One connection per worker and Redis URL carries every request's command without
waiting for earlier replies (RESP is answered in order), so a round trip costs one
write and a share of one read. Commands are pre-encoded by the caller; this module
only frames, sends and parses replies (integers, strings, arrays, errors). It is
hand-written because a general client's per-call overhead is several times the
whole cost of forwarding a request. Control-plane uses of Redis go through redis-py.

URLs are read as redis-py reads them: ``redis://[[user]:password@]host[:port][/db]``,
``rediss://`` for TLS (query: ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``,
``ssl_cert_reqs`` = required | optional | none, ``ssl_check_hostname``), and
``unix:///path?db=N``; user and password are percent-decoded, ``?db=`` wins over
the path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from meshgate.gateway.contract import Deferred
from meshgate.gateway.errors import RedisError

log = logging.getLogger("meshgate.gateway.resp")

__all__ = ["FollowUp", "RedisError", "RespClient", "command"]


def command(*parts: bytes) -> bytes:
    """A RESP command: ``command(b"GET", b"key")``."""
    out = [b"*%d\r\n" % len(parts)]
    out.extend(b"$%d\r\n%s\r\n" % (len(part), part) for part in parts)
    return b"".join(out)


Pending = asyncio.Future[Any] | Deferred
"""What :meth:`RespClient.send` returns."""


class FollowUp(Exception):  # noqa: N818 - not an error: a decide function's other outcome
    """Raised by a decide function that sent another command instead of deciding (a
    NOSCRIPT reply answered with EVAL): the first command's future gets the outcome
    of :attr:`future`, the other command's."""

    def __init__(self, future: Pending) -> None:
        super().__init__()
        self.future = future


_Decide = Callable[[Any], Any]
"""Turns a reply (or a :class:`RedisError`) into the result its future gets; may
raise :class:`FollowUp`."""


class _Protocol(asyncio.Protocol):
    def __init__(self, client: RespClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        # (future, decide or None, sent at): replies come back in this order.
        self.waiting: deque[tuple[Pending, _Decide | None, float]] = deque()
        self.timer: asyncio.TimerHandle | None = None
        # Kept: asyncio.get_running_loop() costs a getpid() syscall per call.
        self.loop = asyncio.get_running_loop()
        # Commands sent during one turn of the event loop leave in one write at its
        # end: under load, one syscall carries the commands of many requests.
        self.outgoing: list[bytes] = []

    def flush(self) -> None:
        outgoing = self.outgoing
        self.outgoing = []
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if len(outgoing) == 1:
                transport.write(outgoing[0])
            else:
                transport.write(b"".join(outgoing))

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
            future, decide, _ = waiting.popleft()
            _settle(future, decide, value)
        if pos:
            del buffer[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.lost(self)
        if self.timer is not None:
            self.timer.cancel()
        error = RedisError(f"the connection to Redis closed: {exc or 'EOF'}")
        while self.waiting:
            future, decide, _ = self.waiting.popleft()
            _settle(future, decide, error)


def _settle(future: Pending, decide: _Decide | None, value: Any) -> None:
    if future.done():
        return
    if decide is not None:
        try:
            future.set_result(decide(value))
        except FollowUp as follow:
            follow.future.add_done_callback(partial(_follow, future))
        except Exception as exc:  # noqa: BLE001 - handed to whoever awaits
            future.set_exception(exc)
    elif isinstance(value, RedisError):
        future.set_exception(value)
    else:
        future.set_result(value)


def _follow(future: Pending, done: Pending) -> None:
    """Give ``future`` the outcome of ``done``."""
    if future.done():
        return
    if done.cancelled():
        future.set_exception(RedisError("the command to Redis was cancelled"))
    elif (exc := done.exception()) is not None:
        future.set_exception(exc)
    else:
        future.set_result(done.result())


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


_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def _tls_context(query: dict[str, list[str]]) -> ssl.SSLContext:
    """The client TLS context a ``rediss://`` URL's query asks for (redis-py's names).

    Raises:
        ValueError: an ``ssl_cert_reqs`` that is not required, optional or none.
        OSError: a certificate or key file that cannot be read.
    """

    def get(name: str) -> str | None:
        values = query.get(name)
        return values[-1] if values else None

    context = ssl.create_default_context(cafile=get("ssl_ca_certs"))
    certfile = get("ssl_certfile")
    if certfile:
        context.load_cert_chain(certfile, get("ssl_keyfile"))
    reqs = (get("ssl_cert_reqs") or "required").lower()
    if reqs not in _CERT_REQS:
        raise ValueError(f"ssl_cert_reqs={reqs!r} in a Redis URL: use required, optional or none")
    check = get("ssl_check_hostname")
    context.check_hostname = reqs != "none" and (check or "true").lower() in ("1", "true", "yes")
    context.verify_mode = _CERT_REQS[reqs]
    return context


class RespClient:
    """Sends pre-encoded commands to one Redis server; reconnects when needed.

    Raises (at construction):
        ValueError, OSError: a ``rediss://`` URL whose TLS settings are unusable.
    """

    def __init__(self, url: str, timeout: float = 1.0) -> None:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        self._unix = unquote(parts.path) if parts.scheme == "unix" else None
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 6379
        self._where = self._unix or f"{self._host}:{self._port}"
        db = query.get("db") or [parts.path.strip("/") if parts.scheme != "unix" else ""]
        self._db = db[-1] or "0"
        self._ssl = _tls_context(query) if parts.scheme == "rediss" else None
        # AUTH and SELECT, sent first on every new connection.
        setup = []
        username = unquote(parts.username) if parts.username else ""
        password = unquote(parts.password) if parts.password is not None else ""
        if username:
            setup.append(command(b"AUTH", username.encode(), password.encode()))
        elif password:
            setup.append(command(b"AUTH", password.encode()))
        if self._db != "0":
            setup.append(command(b"SELECT", self._db.encode()))
        self._setup = tuple(setup)
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
                lambda: _Protocol(self),
                self._host,
                self._port,
                ssl=self._ssl,
                server_hostname=self._host if self._ssl is not None else None,
            )
        # Commands sent from now on queue behind AUTH and SELECT on the connection.
        self._protocol = protocol
        try:
            for frame in self._setup:
                await self._send(protocol, frame)
        except RedisError:
            # Not authenticated or not on the right database: nothing may use it.
            self.lost(protocol)
            if protocol.transport is not None:
                protocol.transport.abort()
            raise
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
            raise RedisError(f"cannot reach Redis at {self._where}: {exc}") from None

    def _send(
        self, protocol: _Protocol, frame: bytes, decide: _Decide | None = None
    ) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue(loop, protocol, frame, future, decide)
        return future

    def _queue(
        self,
        loop: asyncio.AbstractEventLoop,
        protocol: _Protocol,
        frame: bytes,
        future: Pending,
        decide: _Decide | None,
    ) -> None:
        now = loop.time()
        protocol.waiting.append((future, decide, now))
        if protocol.timer is None:
            protocol.timer = loop.call_at(now + self.timeout, self._check, protocol)
        outgoing = protocol.outgoing
        if not outgoing:
            loop.call_soon(protocol.flush)
        outgoing.append(frame)

    def _check(self, protocol: _Protocol) -> None:
        """One timer per connection watches the oldest unanswered command."""
        protocol.timer = None
        if not protocol.waiting:
            return
        loop = asyncio.get_running_loop()
        oldest = protocol.waiting[0][2]
        if loop.time() - oldest >= self.timeout:
            # A reply that comes later would be matched to the wrong request:
            # drop the connection, failing everything on it.
            if protocol.transport is not None:
                protocol.transport.abort()
            return
        protocol.timer = loop.call_at(oldest + self.timeout, self._check, protocol)

    def send(self, frame: bytes, decide: _Decide) -> Pending:
        """Send an encoded command; what it returns gets ``decide(reply)``, where the
        reply may be a :class:`RedisError` (an error reply, Redis unreachable or too
        slow). On a live connection that is a :class:`Deferred`, whose callbacks run
        as the reply is read."""
        protocol = self._protocol
        if protocol is not None:
            deferred = Deferred()
            self._queue(protocol.loop, protocol, frame, deferred, decide)
            return deferred
        return asyncio.ensure_future(self._send_connected(frame, decide))

    async def _send_connected(self, frame: bytes, decide: _Decide) -> Any:
        try:
            protocol = await self._connection()
        except RedisError as exc:
            return decide(exc)
        return await self._send(protocol, frame, decide)

    async def call(self, frame: bytes) -> Any:
        """Send one encoded command and return its reply.

        Raises:
            RedisError: an error reply, or Redis unreachable or too slow.
        """
        protocol = self._protocol
        if protocol is None:
            protocol = await self._connection()
        return await self._send(protocol, frame)

    def close(self) -> None:
        """Drop the connection (the next call reconnects)."""
        protocol = self._protocol
        self._protocol = None
        if protocol is not None and protocol.transport is not None:
            with contextlib.suppress(Exception):
                protocol.transport.abort()
