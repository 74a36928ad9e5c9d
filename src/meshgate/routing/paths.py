"""Request path normalization, applied before routing.

A path is matched in one canonical form, and forwarded in a form that no upstream can
route differently from the router, so that ``/public/../admin``, ``/%2e%2e/admin``,
``/admin%2Fsecret`` or ``/public/..;/admin`` cannot reach a route under another route's
policy:

* percent-encoded unreserved characters (letters, digits, ``-._~``) are decoded,
  other escapes are kept with upper-case hex;
* an encoded slash (``%2F``) or backslash (``%5C``) is refused by default, because
  upstreams disagree about it: uvicorn (so every FastAPI service) decodes ``%2F`` into
  a separator, others treat it as data. ``encoded_slashes: decode`` makes it a
  separator for both the router and the upstream; ``keep`` matches as if it were a
  separator but forwards it encoded (for upstreams that treat it as data);
* a raw backslash is refused: some servers treat it as a separator;
* ``;`` path parameters (``/admin;jsessionid=1``) are ignored when matching, as
  Tomcat and Spring ignore them when routing, and kept when forwarding; a dot segment
  with parameters (``..;x``) is a dot segment;
* runs of slashes collapse into one;
* ``.`` and ``..`` segments are resolved (RFC 3986 section 5.2.4), never above the root.

Malformed escapes and encoded NUL bytes are refused. Matching stays case-sensitive
(RFC 3986 section 6.2.2.1): a route for an upstream that routes case-insensitively
uses a ``(?i)`` regex.
"""

from __future__ import annotations

from typing import Literal

from meshgate.routing.errors import PathError

__all__ = ["EncodedSlashes", "PathError", "normalize_path"]

EncodedSlashes = Literal["reject", "decode", "keep"]
"""What an encoded slash or backslash in a request path does (see the module docs)."""

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_SLASH = 0x2F
_BACKSLASH = 0x5C
_DOTS = (b".", b"..")


def _decode(path: bytes, encoded_slashes: EncodedSlashes, as_separator: bool) -> bytes:
    """Decode unreserved escapes; ``as_separator``: an encoded slash becomes ``/``."""
    out = bytearray()
    i = 0
    n = len(path)
    while i < n:
        c = path[i]
        if c != 37:  # "%"
            out.append(c)
            i += 1
            continue
        if i + 2 >= n:
            raise PathError("the path has a '%' that is not followed by two hex digits")
        h1, h2 = path[i + 1], path[i + 2]
        if h1 not in _HEX or h2 not in _HEX:
            raise PathError("the path has a '%' that is not followed by two hex digits")
        value = int(path[i + 1 : i + 3], 16)
        if value == 0:
            raise PathError("the path contains an encoded NUL byte (%00)")
        if value == _SLASH and encoded_slashes == "reject":
            raise PathError(
                "the path contains an encoded slash (%2F), which upstreams read in"
                " different ways; send it unencoded, or set gateway.encoded_slashes to"
                " decode or keep"
            )
        if value == _BACKSLASH and encoded_slashes != "keep":
            raise PathError(
                "the path contains an encoded backslash (%5C), which some upstreams read"
                " as a separator; leave it out, or set gateway.encoded_slashes to keep"
            )
        if value in _UNRESERVED or (
            value == _SLASH and (as_separator or encoded_slashes == "decode")
        ):
            out.append(value)
        else:
            out += b"%%%02X" % value
        i += 3
    return bytes(out)


def _resolve(path: bytes) -> tuple[bytes, bytes]:
    """Collapse slashes and resolve dot segments; returns the forwarded form (with
    ``;`` parameters) and the matched form (without them), in lockstep."""
    fwd: list[bytes] = []
    match: list[bytes] = []
    parts = path.split(b"/")
    last = b""
    for part in parts[1:]:
        bare = part.split(b";", 1)[0] if part.find(b";") >= 0 else part
        last = bare
        if bare in (b"", b"."):
            continue
        if bare == b"..":
            if fwd:
                fwd.pop()
                match.pop()
            continue
        fwd.append(part)
        match.append(bare)
    # "/a/", "/a/." and "/a/;x" end in a slash; "/a/.." too, once resolved.
    trailing = len(parts) > 2 and (last == b"" or last in _DOTS)
    out_fwd = b"/" + b"/".join(fwd)
    out_match = b"/" + b"/".join(match)
    if trailing and fwd:
        out_fwd += b"/"
        out_match += b"/"
    return out_fwd, out_match


def normalize_path(path: bytes, encoded_slashes: EncodedSlashes = "reject") -> tuple[bytes, bytes]:
    """The canonical forms of an absolute ``path`` (no query): ``(forwarded, matched)``.

    ``matched`` is what routes are matched against: decoded, normalized, with ``;``
    parameters removed. ``forwarded`` is what the upstream receives (when the route does
    not rewrite the path): the same path with its parameters, and with ``keep``, its
    encoded slashes. Both are the same object when they do not differ.

    Raises:
        PathError: a malformed percent-escape, an encoded NUL byte, a backslash, or an
            encoded slash or backslash with ``encoded_slashes="reject"``.
    """
    if path.find(b"\\") >= 0:
        raise PathError(
            "the path contains a backslash, which some upstreams read as a separator;"
            " percent-encode it (%5C) only if gateway.encoded_slashes allows that"
        )
    has_escape = path.find(b"%") >= 0
    decoded = _decode(path, encoded_slashes, False) if has_escape else path
    fwd, match = _resolve(decoded)
    if has_escape and encoded_slashes == "keep" and decoded.find(b"%2F") >= 0:
        # Matched as the upstreams that decode it see it, forwarded as sent.
        _, match = _resolve(_decode(path, encoded_slashes, True))
    if match == fwd:
        match = fwd
    return fwd, match
