"""Test helpers: a programmable raw HTTP upstream, a raw HTTP client, and an
in-process gateway, all on loopback with ephemeral ports."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httptools

from meshgate.config import loads
from meshgate.gateway.worker import Worker, listen_socket


@dataclass
class Message:
    """A parsed HTTP request or response."""

    method: str = ""
    target: str = ""
    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    keep_alive: bool = True
    complete: bool = False

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


class _Collector:
    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.current = Message()
        self.url = b""

    def on_message_begin(self) -> None:
        self.current = Message()
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self.current.body += body

    def on_message_complete(self) -> None:
        self.current.complete = True
        self.current.target = self.url.decode("latin-1")
        self.messages.append(self.current)


class MessageReader:
    """Reads HTTP messages (requests or responses) from a stream."""

    def __init__(self, reader: asyncio.StreamReader, *, response: bool, head: bool = False):
        self.reader = reader
        self.collector = _Collector()
        self.parser: Any = (
            httptools.HttpResponseParser(self.collector)
            if response
            else httptools.HttpRequestParser(self.collector)
        )
        self.response = response
        self.upgraded = b""
        self.eof = False

    async def next(self, timeout: float = 10.0) -> Message:
        """The next complete message; raises EOFError if the stream ends first."""
        async with asyncio.timeout(timeout):
            while not self.collector.messages:
                data = await self.reader.read(65536)
                if not data:
                    self.eof = True
                    msg = self.collector.current
                    raise EOFError(f"stream ended; partial message: {msg.status} {len(msg.body)}B")
                try:
                    self.parser.feed_data(data)
                except httptools.HttpParserUpgrade as exc:
                    self.upgraded = data[exc.args[0] :]
                    self._finish_head()
                    break
            msg = self.collector.messages.pop(0)
            if self.response:
                msg.status = self.parser.get_status_code()
            else:
                msg.method = self.parser.get_method().decode()
            msg.keep_alive = self.parser.should_keep_alive()
            return msg

    def _finish_head(self) -> None:
        if not self.collector.messages:
            self.collector.current.complete = True
            self.collector.messages.append(self.collector.current)


Handler = Callable[[Message, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool | None]]


class RawUpstream:
    """A programmable upstream: ``handler(request, reader, writer)`` writes the response.

    Returning False from the handler closes the connection. Counts connections and
    records every request it received.
    """

    # Every upstream a test starts, so that a fixture can close them even when the
    # test fails early: uvloop cannot close its loop while a server is open.
    instances: ClassVar[list[RawUpstream]] = []

    def __init__(self, handler: Handler | None = None) -> None:
        self.handler = handler or ok_handler
        self.writers: set[asyncio.StreamWriter] = set()
        self.connections = 0
        self.open = 0
        self.requests: list[Message] = []
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.closed = asyncio.Event()

    async def start(self) -> RawUpstream:
        RawUpstream.instances.append(self)
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.writers.add(writer)
        messages = MessageReader(reader, response=False)
        try:
            while True:
                try:
                    request = await messages.next(timeout=300)
                except (EOFError, ConnectionError, httptools.HttpParserError):
                    break
                self.requests.append(request)
                keep = await self.handler(request, reader, writer)
                if keep is False or not request.keep_alive:
                    break
        finally:
            self.writers.discard(writer)
            self.open -= 1
            self.closed.set()
            # Never wait here: a failed test's teardown cancels this task.
            writer.transport.abort()

    async def close(self) -> None:
        server, self.server = self.server, None
        if server is None:
            return
        server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        # Python 3.12+ waits for handlers; on 3.11 this returns at once.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 1)


def response(
    status: int = 200,
    body: bytes = b"ok",
    headers: list[tuple[str, str]] | None = None,
    *,
    chunked: bool = False,
) -> bytes:
    """A complete raw HTTP/1.1 response."""
    lines = [f"HTTP/1.1 {status} X"]
    for name, value in headers or []:
        lines.append(f"{name}: {value}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        payload = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    else:
        lines.append(f"Content-Length: {len(body)}")
        payload = body
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


async def ok_handler(
    request: Message, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Answers 200 with the request's target as the body."""
    writer.write(response(200, request.target.encode()))


async def echo_handler(
    request: Message, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Answers 200 with the request body."""
    writer.write(response(200, request.body))


class Client:
    """A raw HTTP/1.1 client connection, for exact control over bytes on the wire."""

    # Every client a test opens, so that a fixture can close them after a failure.
    instances: ClassVar[list[Client]] = []

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        Client.instances.append(self)
        self.reader = reader
        self.writer = writer
        self.responses = MessageReader(reader, response=True)

    @classmethod
    async def connect(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def request(
        self,
        method: str = "GET",
        target: str = "/",
        headers: list[tuple[str, str]] | None = None,
        body: bytes | None = None,
        *,
        host: str = "example.test",
    ) -> Message:
        await self.send(build_request(method, target, headers, body, host=host))
        return await self.responses.next()

    async def read(self, timeout: float = 10.0) -> Message:
        return await self.responses.next(timeout)

    async def closed(self, timeout: float = 5.0) -> bool:
        """True once the server closed the connection (EOF or reset)."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    data = await self.reader.read(65536)
                    if not data:
                        return True
        except ConnectionError:
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


def build_request(
    method: str = "GET",
    target: str = "/",
    headers: list[tuple[str, str]] | None = None,
    body: bytes | None = None,
    *,
    host: str = "example.test",
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1"]
    names = {n.lower() for n, _ in headers or []}
    if host and "host" not in names:
        lines.append(f"Host: {host}")
    for name, value in headers or []:
        lines.append(f"{name}: {value}")
    if body is not None and "content-length" not in names and "transfer-encoding" not in names:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def gateway_yaml(upstreams: dict[str, list[str]], routes: str, gateway: str = "") -> str:
    """A configuration document: upstream endpoints by name, plus raw YAML for routes."""
    ups = "\n".join(
        f"  {name}: {{endpoints: [{', '.join(repr(e) for e in eps)}]}}"
        for name, eps in upstreams.items()
    )
    return (
        "gateway:\n  listen: 127.0.0.1:0\n  access_log: {enabled: false}\n"
        + "".join(f"  {line}\n" for line in gateway.strip().splitlines() if line.strip())
        + f"upstreams:\n{ups}\nroutes:\n{routes}"
    )


@contextlib.asynccontextmanager
async def run_gateway(config_text: str) -> AsyncIterator[tuple[Worker, int]]:
    """An in-process gateway worker on an ephemeral port, in the running loop."""
    config = loads(config_text, "test.yaml")
    worker = Worker(config)
    sock = listen_socket("127.0.0.1", 0, reuse_port=False)
    port = sock.getsockname()[1]
    await worker.serve(sock)
    try:
        yield worker, port
    finally:
        await worker.drain(1.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
