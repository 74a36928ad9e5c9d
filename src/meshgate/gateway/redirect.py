"""The plain-HTTP listener of a TLS gateway: every request is redirected to HTTPS."""

from __future__ import annotations

import asyncio

from httptools import HttpParserError, HttpRequestParser

from meshgate.gateway.http import error_response

__all__ = ["RedirectProtocol"]

_HOST_CHARS = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-[]:"


class RedirectProtocol(asyncio.Protocol):
    """Answers ``308 Permanent Redirect`` to the same host and target over HTTPS."""

    def __init__(self, https_port: int, timeout: float = 10.0) -> None:
        self._timeout = timeout
        self._suffix = b"" if https_port == 443 else b":%d" % https_port
        self._parser = HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._host = b""
        self._size = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        # A redirect needs one short request: a client that sends none is dropped.
        self._timer = asyncio.get_running_loop().call_later(self._timeout, transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        self._timer.cancel()

    def data_received(self, data: bytes) -> None:
        self._size += len(data)
        try:
            self._parser.feed_data(data)
        except HttpParserError:
            self._send(error_response(400, "bad_request", "malformed HTTP request", close=True))
        if self._size > 64 * 1024 and self._transport is not None:
            self._transport.close()

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"host":
            self._host = value

    def on_message_complete(self) -> None:
        host = self._host
        if not host or host.translate(None, _HOST_CHARS):
            self._send(error_response(400, "bad_host", "a Host header is needed", close=True))
            return
        # The host without its port (an IPv6 literal keeps its brackets).
        name = host[: host.find(b"]") + 1] if host.startswith(b"[") else host.split(b":", 1)[0]
        target = self._url if self._url.startswith(b"/") else b"/"
        location = b"https://" + name + self._suffix + target
        self._send(
            b"HTTP/1.1 308 Permanent Redirect\r\nLocation: "
            + location
            + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )

    def _send(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)
            self._transport.close()
