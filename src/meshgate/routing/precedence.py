"""The order in which routes are tried, and when one route hides another.

Precedence is deterministic and does not depend on how routes are written down, except
as the last tie-breaker (the list is in :mod:`meshgate.gateway.router`'s docs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshgate.config.model import MatchSettings, RouteSettings

__all__ = ["covers", "precedence_key", "segment_covers"]


def precedence_key(route: RouteSettings, index: int) -> tuple[int, ...]:
    """The sort key that puts routes in the order they are tried (see module docs)."""
    match = route.match
    if not match.host:
        host_rank, host_len = 2, 0
    elif any(not h.startswith("*.") for h in match.host):
        host_rank, host_len = 0, 0
    else:
        host_rank, host_len = 1, -max(len(h) for h in match.host)
    kind = match.path_kind
    path_rank = {"exact": 0, "regex": 1, "prefix": 2}[kind]
    path_len = -len(match.prefix) if kind == "prefix" else 0
    return (
        -route.priority,
        host_rank,
        host_len,
        path_rank,
        path_len,
        0 if match.methods else 1,
        -len(match.headers),
        index,
    )


def segment_covers(prefix: str, path: str) -> bool:
    """Whether a segment-wise ``prefix`` matches ``path`` (``/api`` covers ``/api/x``)."""
    if prefix == "/":
        return True
    return path == prefix or path.startswith(prefix + "/")


def _host_covers(pattern: str, host: str) -> bool:
    if pattern == host:
        return True
    if pattern.startswith("*."):
        suffix = pattern[1:]
        return host.endswith(suffix) and len(host) > len(suffix)
    return False


def covers(a: MatchSettings, b: MatchSettings) -> bool:
    """Whether every request ``b`` matches is also matched by ``a``.

    Conservative: answers True only when it is certain (two different regexes are
    never said to cover each other).
    """
    if a.host and not (b.host and all(any(_host_covers(p, h) for p in a.host) for h in b.host)):
        return False
    if a.methods and not (b.methods and set(b.methods) <= set(a.methods)):
        return False
    b_headers = {k.lower(): v for k, v in b.headers.items()}
    for name, cond in a.headers.items():
        if b_headers.get(name.lower()) != cond:
            return False
    a_kind, b_kind = a.path_kind, b.path_kind
    if a_kind == "prefix":
        if b_kind == "regex":
            return a.prefix == "/"
        b_path = b.path if b_kind == "exact" else b.prefix
        return segment_covers(a.prefix, b_path or "/")
    if a_kind == "exact":
        return b_kind == "exact" and a.path == b.path
    return b_kind == "regex" and a.path_regex == b.path_regex
