"""HTTP/1.1 constants and pre-encoded bytes shared by the gateway's hot path.

Everything here is computed at import time so that the request path only does
dictionary lookups and joins.
"""

from __future__ import annotations

import json
from http import HTTPStatus

__all__ = [
    "REQ_HEADER_KINDS",
    "RESP_HEADER_KINDS",
    "STATUS_LINES",
    "error_response",
    "status_line",
]

STATUS_LINES: dict[int, bytes] = {
    s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode("latin-1") for s in HTTPStatus
}


def status_line(status: int) -> bytes:
    """The HTTP/1.1 status line for ``status``, pre-encoded when it is a known code."""
    line = STATUS_LINES.get(status)
    if line is None:
        line = f"HTTP/1.1 {status} Unknown\r\n".encode("latin-1")
    return line


# Kinds of header the gateway treats specially; any other header is forwarded.
DROP = 1  # hop-by-hop: never forwarded
HOST = 2
CONNECTION = 3
CONTENT_LENGTH = 4
TRANSFER_ENCODING = 5
UPGRADE = 6
X_FORWARDED_FOR = 7
X_FORWARDED_PROTO = 8
X_FORWARDED_HOST = 9
FORWARDED = 10
EXPECT = 11
REQUEST_ID = 12

_HOP_BY_HOP = (
    b"keep-alive",
    b"te",
    b"trailer",
    b"proxy-connection",
    b"proxy-authenticate",
    b"proxy-authorization",
)

REQ_HEADER_KINDS: dict[bytes, int] = {
    **dict.fromkeys(_HOP_BY_HOP, DROP),
    b"host": HOST,
    b"connection": CONNECTION,
    b"content-length": CONTENT_LENGTH,
    b"transfer-encoding": TRANSFER_ENCODING,
    b"upgrade": UPGRADE,
    b"x-forwarded-for": X_FORWARDED_FOR,
    b"x-forwarded-proto": X_FORWARDED_PROTO,
    b"x-forwarded-host": X_FORWARDED_HOST,
    b"forwarded": FORWARDED,
    b"expect": EXPECT,
}
"""Request header kinds by lowercase name (the request id header is added per config)."""

RESP_HEADER_KINDS: dict[bytes, int] = {
    **dict.fromkeys(_HOP_BY_HOP, DROP),
    b"connection": CONNECTION,
    b"content-length": CONTENT_LENGTH,
    b"transfer-encoding": TRANSFER_ENCODING,
    b"upgrade": UPGRADE,
}
"""Response header kinds by lowercase name."""

IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


def error_response(
    status: int,
    error: str,
    detail: str,
    *,
    request_id: bytes = b"",
    request_id_header: bytes = b"X-Request-ID",
    route: str | None = None,
    upstream: str | None = None,
    close: bool = False,
    extra_headers: bytes = b"",
) -> bytes:
    """A complete HTTP response with a small JSON body; never carries a stack trace."""
    body: dict[str, str] = {"error": error, "detail": detail}
    if route is not None:
        body["route"] = route
    if upstream is not None:
        body["upstream"] = upstream
    if request_id:
        body["request_id"] = request_id.decode("latin-1")
    payload = json.dumps(body, separators=(",", ":")).encode() + b"\n"
    head = [
        status_line(status),
        b"Content-Type: application/json\r\nContent-Length: ",
        str(len(payload)).encode(),
        b"\r\n",
    ]
    if request_id:
        head += [request_id_header, b": ", request_id, b"\r\n"]
    if close:
        head.append(b"Connection: close\r\n")
    head += [extra_headers, b"\r\n", payload]
    return b"".join(head)
