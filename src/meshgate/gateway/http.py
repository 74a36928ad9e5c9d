"""HTTP/1.1 constants and pre-encoded bytes shared by the gateway's hot path.

Everything here is computed at import time so that the request path only does
dictionary lookups and joins.
"""

from __future__ import annotations

import json
import re
from http import HTTPStatus

from meshgate.gateway.errors import PROBLEMS, problem_type

__all__ = [
    "REQ_HEADER_KINDS",
    "RESP_HEADER_KINDS",
    "STATUS_LINES",
    "error_response",
    "filter_response_head",
    "split_response_head",
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
AUTHORIZATION = 13
TRACEPARENT = 14  # only while tracing is on (else forwarded untouched)
TRACESTATE = 15

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
    b"authorization": AUTHORIZATION,
    # "Proxy" is no standard header; CGI-style servers expose it as HTTP_PROXY, which
    # HTTP clients then take for their proxy setting (httpoxy, CVE-2016-5385).
    b"proxy": DROP,
    # Only meaningful with "Upgrade: h2c", which is never forwarded (RFC 9113 3.1 drops
    # the upgrade altogether; HAProxy removes both).
    b"http2-settings": DROP,
}
"""Request header kinds by lowercase name (the request id header is added per config)."""


def underscore_variants(name: bytes) -> list[bytes]:
    """The spellings of ``name`` (lowercase) with some or all ``-`` written ``_``.

    CGI and WSGI servers turn both into ``_`` (``X_User_Id`` and ``X-User-Id`` are both
    ``HTTP_X_USER_ID``), so a client header spelled this way would pass for one the
    gateway sets. Names with many dashes get only the all-underscore spelling beyond
    the first six dashes' combinations.
    """
    dashes = [i for i, c in enumerate(name) if c == 0x2D]
    if not dashes:
        return []
    out = []
    first = dashes[:6]
    for mask in range(1, 1 << len(first)):
        chars = bytearray(name)
        for bit, at in enumerate(first):
            if mask >> bit & 1:
                chars[at] = 0x5F
        if len(dashes) > len(first) and mask == (1 << len(first)) - 1:
            for at in dashes[len(first) :]:
                chars[at] = 0x5F
        out.append(bytes(chars))
    return out


RESP_HEADER_KINDS: dict[bytes, int] = {
    **dict.fromkeys(_HOP_BY_HOP, DROP),
    b"connection": CONNECTION,
    b"content-length": CONTENT_LENGTH,
    b"transfer-encoding": TRANSFER_ENCODING,
    b"upgrade": UPGRADE,
}
"""Response header kinds by lowercase name."""

_RESP_SPECIAL = re.compile(
    rb"\n(connection|content-length|keep-alive|te|trailer|transfer-encoding|upgrade|proxy-[^:]*):"
)
"""Response header lines the gateway must look at, in a lowercased block whose
lines each start after a newline. The literal newline prefix lets the regex
engine jump from line start to line start in C."""
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b"upgrade"})
_CRLF = b"\r\n"


def response_names(request_id_header: str) -> re.Pattern[bytes]:
    """The pattern :func:`filter_response_head` scans with: the response header names
    the gateway acts on, plus the request id header (the gateway sets its own)."""
    own = re.escape(request_id_header.lower().encode("latin-1"))
    return re.compile(
        rb"\n(connection|content-length|keep-alive|te|trailer|transfer-encoding|upgrade|"
        rb"proxy-[^:]*|" + own + rb"):[ \t]*([^\r]*)"
    )


_RESP_NAMES = response_names("X-Request-ID")


def filter_response_head(
    block: bytes, names: re.Pattern[bytes] = _RESP_NAMES, own: bytes = b"x-request-id"
) -> tuple[bytes, bool, bool, bytes | None, bytes | None]:
    """Filter a response's header lines with as little work as the response allows.

    ``block`` is the header lines joined by CRLF (no status line, no final empty
    line), already validated by the parser. One regex pass over the lowercased
    block (in C) lists the header names that matter. For the common response (at
    most Content-Length and one plain ``Connection: keep-alive`` or ``close``)
    the block is forwarded as it is; RFC 9110 section 7.6.1 lets a proxy keep a
    Connection field that states its own option, and the caller replaces it when
    its option differs. Anything else goes through :func:`split_response_head`.

    Returns the header lines to forward (each ending in CRLF), whether there is a
    Content-Length, whether the body is chunked, the Upgrade value or None, and
    the plain Connection value left in the lines (``b"keep-alive"``/``b"close"``)
    or None.
    """
    if not block:
        return b"", False, False, None, None
    clen = False
    connection = None
    for name, value in names.findall(b"\n" + block.lower()):
        if name == b"content-length":
            clen = True
        elif name == b"connection" and connection is None:
            connection = value.rstrip()
        else:
            connection = b""  # something to remove: take the full path
            break
    if connection is None:
        return block + _CRLF, clen, False, None, None
    if connection in (b"keep-alive", b"close"):
        return block + _CRLF, clen, False, None, connection
    out, clen_value, chunked, upgrade = split_response_head(block, (own,))
    return out, clen_value is not None, chunked, upgrade, None


def drop_connection(headers: bytes) -> bytes:
    """``headers`` (CRLF-terminated lines) without its Connection line(s)."""
    return split_response_head(headers[:-2])[0] if headers else headers


def split_response_head(
    block: bytes, drop: tuple[bytes, ...] = ()
) -> tuple[bytes, bytes | None, bool, bytes | None]:
    """Filter a response's header lines, already validated by the parser.

    ``block`` is the header lines joined by CRLF (no status line, no final empty
    line). Returns the lines to forward, each ending in CRLF (hop-by-hop headers
    and those named in Connection removed), the Content-Length value or None,
    whether the body is chunked, and the Upgrade value or None. Lines named in
    ``drop`` (lowercase) are removed too.

    The block is scanned once by a regex (the parser guarantees ``name:`` with no
    space before the colon); headers are never visited one by one from Python,
    which makes this several times cheaper than a per-header loop.
    """
    low = b"\n" + block.lower()  # index i in block is index i + 1 in low
    clen = None
    chunked = False
    upgrade = None
    cuts: list[tuple[int, int]] | None = None
    named: list[bytes] | None = None
    for match in _RESP_SPECIAL.finditer(low):
        start = match.start()
        value_at = match.end() - 1
        eol = block.find(_CRLF, value_at)
        if eol < 0:
            eol = len(block)
        name = match.group(1)
        if name == b"content-length":
            clen = block[value_at:eol].strip()
            continue
        if name == b"transfer-encoding":
            chunked = True
        elif name == b"upgrade":
            upgrade = block[value_at:eol].strip()
        elif name == b"connection":
            value = low[value_at + 1 : eol + 1].strip()
            if value not in _PLAIN_CONNECTION:
                tokens = [t.strip() for t in value.split(b",")]
                named = [t for t in tokens if t and t not in _PLAIN_CONNECTION]
        if cuts is None:
            cuts = []
        cuts.append((start, eol + 2))
    if drop:
        named = [*(named or ()), *drop]
    if cuts is None and not named:
        return (block + _CRLF if block else b""), clen, chunked, upgrade
    if cuts is None:
        cuts = []
    if named:
        for token in named:
            needle = b"\n" + token + b":"
            i = low.find(needle)
            while i >= 0:
                eol = block.find(_CRLF, i)
                cuts.append((i, eol + 2 if eol >= 0 else len(block) + 2))
                i = low.find(needle, i + 1)
        cuts.sort()
    parts = []
    pos = 0
    for start, end in cuts:
        if start >= pos:
            parts.append(block[pos:start])
            pos = end
    parts.append(block[pos:])
    out = b"".join(parts)
    if out and not out.endswith(_CRLF):
        out += _CRLF
    return out, clen, chunked, upgrade


CHUNK_END = b"\r\n"
"""What ends a chunk's data (and its size line)."""
LAST_CHUNK = b"0\r\n\r\n"
"""The last chunk of a chunked body, without trailers."""

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
    instance: bytes | None = None,
) -> bytes:
    """A complete HTTP response with an RFC 9457 problem body; never a stack trace.

    ``error`` is a code of :data:`~meshgate.gateway.errors.PROBLEMS` (its title); the
    code, ``route``, ``upstream`` and ``request_id`` are extension members. ``instance``
    is the request target; only its path is shown (a query may hold a key).
    """
    problem = PROBLEMS.get(error)
    body: dict[str, object] = {
        "type": problem_type(error),
        "title": problem.title if problem is not None else _phrase(status),
        "status": status,
        "detail": detail,
    }
    if instance:
        body["instance"] = instance.split(b"?", 1)[0].decode("latin-1")
    body["error"] = error
    if route is not None:
        body["route"] = route
    if upstream is not None:
        body["upstream"] = upstream
    if request_id:
        body["request_id"] = request_id.decode("latin-1")
    payload = json.dumps(body, separators=(",", ":")).encode() + b"\n"
    head = [
        status_line(status),
        b"Content-Type: application/problem+json\r\nContent-Length: ",
        str(len(payload)).encode(),
        b"\r\n",
    ]
    if request_id:
        head += [request_id_header, b": ", request_id, b"\r\n"]
    if close:
        head.append(b"Connection: close\r\n")
    head += [extra_headers, b"\r\n", payload]
    return b"".join(head)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
