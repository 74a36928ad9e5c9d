"""Request path normalization, applied before routing.

A path is matched, and forwarded, in one canonical form, so that ``/public/../admin``
or ``/%2e%2e/admin`` cannot reach a route under another route's policy:

* percent-encoded unreserved characters (letters, digits, ``-._~``) are decoded,
  other escapes are kept with upper-case hex; ``%2F`` is decoded only with
  ``gateway.decode_encoded_slashes`` (an encoded slash is data by default);
* runs of slashes collapse into one;
* ``.`` and ``..`` segments are resolved (RFC 3986 section 5.2.4), never above the root.

Malformed escapes and encoded NUL bytes are refused.
"""

from __future__ import annotations

from meshgate.errors import MeshgateError

__all__ = ["PathError", "normalize_path"]

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset(b"0123456789abcdefABCDEF")


class PathError(MeshgateError):
    """A request path cannot be normalized (bad percent-escape or NUL byte)."""


def _decode(path: bytes, decode_slashes: bool) -> bytes:
    if b"%" not in path:
        return path
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
        if value in _UNRESERVED or (value == 47 and decode_slashes):
            out.append(value)
        else:
            out += b"%%%02X" % value
        i += 3
    return bytes(out)


def normalize_path(path: bytes, decode_slashes: bool = False) -> bytes:
    """The canonical form of an absolute ``path`` (no query); see the module docs.

    Raises:
        PathError: a malformed percent-escape or an encoded NUL byte.
    """
    path = _decode(path, decode_slashes)
    segments: list[bytes] = []
    parts = path.split(b"/")
    for part in parts[1:]:
        if part in (b"", b"."):
            continue
        if part == b"..":
            if segments:
                segments.pop()
            continue
        segments.append(part)
    trailing = parts[-1] in (b"", b".", b"..") and len(parts) > 2
    out = b"/" + b"/".join(segments)
    if trailing and segments:
        out += b"/"
    return out
