"""A small, fast demo upstream: what ``make demo`` puts behind the gateway.

It answers every request with JSON describing what it received (method, path,
the headers the gateway added, and which instance answered), plus a few helpers:
``/bytes/N`` sends N bytes, ``/status/N`` answers with status N, ``/delay/S``
waits S seconds. It is a raw asyncio protocol so that it never slows a demo or a
test down.
"""

from __future__ import annotations

import asyncio
import json
import logging

from httptools import HttpParserError, HttpRequestParser

__all__ = ["DemoUpstream", "serve_demo"]

log = logging.getLogger("meshgate.demo")


class DemoUpstream(asyncio.Protocol):
    """One connection to the demo upstream."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.parser = HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.body = bytearray()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        if len(self.body) < 1 << 20:
            self.body += body[: (1 << 20) - len(self.body)]

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode()
        path = self.url.decode("latin-1")
        keep = self.parser.should_keep_alive()
        parts = path.split("?", 1)[0].strip("/").split("/")
        if parts[0] == "delay" and len(parts) > 1:
            delay = _number(parts[1], 0.0)
            asyncio.get_running_loop().call_later(
                min(delay, 60.0), self._respond, 200, self._describe(method, path), keep
            )
            return
        if parts[0] == "bytes" and len(parts) > 1:
            size = int(_number(parts[1], 0))
            self._respond(200, b"x" * min(size, 64 << 20), keep, b"application/octet-stream")
            return
        status = 200
        if parts[0] == "status" and len(parts) > 1:
            status = int(_number(parts[1], 200))
        self._respond(status, self._describe(method, path), keep)

    def _describe(self, method: str, path: str) -> bytes:
        doc = {
            "instance": self.name,
            "method": method,
            "path": path,
            "headers": {k.decode("latin-1"): v.decode("latin-1") for k, v in self.headers},
            "body_bytes": len(self.body),
        }
        return json.dumps(doc, indent=2).encode() + b"\n"

    def _respond(
        self, status: int, body: bytes, keep: bool, ctype: bytes = b"application/json"
    ) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        head = b"HTTP/1.1 %d X\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n" % (
            status,
            ctype,
            len(body),
            b"" if keep else b"Connection: close\r\n",
        )
        self.transport.write(head + body)
        if not keep:
            self.transport.close()


def _number(text: str, default: float) -> float:
    try:
        return float(text)
    except ValueError:
        return default


async def serve_demo(host: str, port: int, name: str) -> asyncio.AbstractServer:
    """Start a demo upstream on ``host:port`` answering as ``name``."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: DemoUpstream(name), host, port, reuse_address=True)
