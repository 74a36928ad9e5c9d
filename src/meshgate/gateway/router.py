"""The compiled router: from a request's host, path, method and headers to a route.

Precedence is deterministic and does not depend on how routes are written down,
except as the last tie-breaker. Routes are tried in this order:

1. higher ``priority`` first;
2. by host: routes naming an exact host, then a wildcard host (longer suffix
   first), then routes for any host;
3. by path: an exact ``path``, then ``path_regex``, then ``path_prefix``, longer
   prefixes first;
4. routes restricted to some methods before routes for any method;
5. routes with more header conditions first;
6. the order in the file.

The first route whose every condition holds takes the request. Everything here
is built once per configuration; :meth:`Router.match` does no allocation beyond
the regex match object.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from meshgate.config.model import HeaderMatch, RouteSettings
from meshgate.routing.precedence import precedence_key

__all__ = ["RouteMatch", "Router"]

_SLASH = 47  # ord("/")


@dataclass(frozen=True, slots=True)
class _HeaderCheck:
    name: bytes  # lowercase
    exact: bytes | None
    regex: re.Pattern[bytes] | None
    present: bool | None

    @classmethod
    def build(cls, name: str, cond: HeaderMatch) -> _HeaderCheck:
        return cls(
            name=name.lower().encode("latin-1"),
            exact=cond.exact.encode("latin-1") if cond.exact is not None else None,
            regex=re.compile(cond.regex.encode("latin-1")) if cond.regex is not None else None,
            present=cond.present,
        )

    def holds(self, headers: Sequence[tuple[bytes, bytes]]) -> bool:
        value = None
        for name, val in headers:
            if name.lower() == self.name:
                value = val
                break
        if self.present is not None:
            return (value is not None) is self.present
        if value is None:
            return False
        if self.exact is not None:
            return value == self.exact
        return self.regex is not None and self.regex.fullmatch(value) is not None


_EXACT, _PREFIX, _REGEX = 0, 1, 2


class RouteMatch:
    """One compiled route's matching data, plus how it rewrites the path.

    ``target`` carries whatever the runtime attaches to the route (its compiled
    upstream, pre-encoded headers); the router never looks at it.
    """

    __slots__ = (
        "any_host",
        "exact_hosts",
        "headers",
        "index",
        "kind",
        "methods",
        "name",
        "path",
        "plen",
        "prefix",
        "regex",
        "rewrite",
        "settings",
        "simple",
        "strip",
        "target",
        "wild_hosts",
    )

    def __init__(self, settings: RouteSettings, index: int, target: object = None) -> None:
        match = settings.match
        self.settings = settings
        self.name = settings.name
        self.index = index
        self.target = target
        self.any_host = not match.host
        self.exact_hosts = frozenset(h.encode() for h in match.host if not h.startswith("*."))
        self.wild_hosts = tuple(h[1:].encode() for h in match.host if h.startswith("*."))
        self.methods = frozenset(m.encode() for m in match.methods) or None
        self.headers = tuple(_HeaderCheck.build(n, c) for n, c in match.headers.items())
        kind = match.path_kind
        self.kind = {"exact": _EXACT, "prefix": _PREFIX, "regex": _REGEX}[kind]
        self.path = (match.path or "").encode()
        self.prefix = match.prefix.encode()
        self.plen = 0 if match.prefix == "/" else len(self.prefix)
        self.regex = re.compile(match.path_regex.encode()) if match.path_regex else None
        self.strip = settings.strip_prefix and self.plen > 0
        self.rewrite = _compile_template(settings.rewrite) if settings.rewrite else None
        # A prefix route with no host, method or header condition: the common case,
        # checked without looking at anything but the path.
        self.simple = (
            self.kind == _PREFIX and self.any_host and self.methods is None and not self.headers
        )

    def first_segment(self) -> bytes | None:
        """The first path segment every matching path has, or None when any will do."""
        if self.kind == _REGEX or (self.kind == _PREFIX and self.plen == 0):
            return None
        path = self.path if self.kind == _EXACT else self.prefix
        return path[1:].split(b"/", 1)[0]

    def upstream_path(self, path: bytes, found: re.Match[bytes] | None) -> bytes:
        """The path to send upstream for a matched ``path`` (without the query)."""
        if self.strip:
            return path[self.plen :] or b"/"
        template = self.rewrite
        if template is None:
            return path
        out = []
        for literal, name in template:
            out.append(literal)
            if name is None:
                continue
            if name == b"rest" and self.kind == _PREFIX:
                out.append(path[self.plen :])
            elif found is not None:
                out.append(found.group(name.decode()) or b"")
        return b"".join(out)


def _compile_template(template: str) -> tuple[tuple[bytes, bytes | None], ...]:
    parts: list[tuple[bytes, bytes | None]] = []
    pos = 0
    for m in re.finditer(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", template):
        parts.append((template[pos : m.start()].encode(), m.group(1).encode()))
        pos = m.end()
    parts.append((template[pos:].encode(), None))
    return tuple(parts)


class Router:
    """Routes in precedence order, indexed by the first path segment."""

    __slots__ = ("_by_segment", "_default", "needs_host", "routes")

    def __init__(self, routes: Sequence[RouteMatch]) -> None:
        ordered = sorted(routes, key=lambda r: precedence_key(r.settings, r.index))
        self.routes: tuple[RouteMatch, ...] = tuple(ordered)
        self.needs_host = any(not r.any_host for r in ordered)
        segments = {seg for r in ordered if (seg := r.first_segment()) is not None}
        # Each segment's list keeps the global order, so indexing never changes
        # which route wins; it only skips routes that cannot match.
        self._by_segment = {
            seg: tuple(r for r in ordered if r.first_segment() in (None, seg)) for seg in segments
        }
        self._default = tuple(r for r in ordered if r.first_segment() is None)

    def match(
        self,
        method: bytes,
        path: bytes,
        host: bytes,
        headers: Sequence[tuple[bytes, bytes]],
    ) -> tuple[RouteMatch, re.Match[bytes] | None] | None:
        """The first route that takes the request, with its regex match; None if none does.

        ``path`` is normalized and without the query; ``host`` is lowercase, without port.
        """
        by_segment = self._by_segment
        if by_segment:
            end = path.find(b"/", 1)
            candidates = by_segment.get(path[1:end] if end > 0 else path[1:], self._default)
        else:
            candidates = self._default
        for route in candidates:
            if route.simple:
                plen = route.plen
                if not plen or (
                    path.startswith(route.prefix) and (len(path) == plen or path[plen] == _SLASH)
                ):
                    return route, None
                continue
            if route.methods is not None and method not in route.methods:
                continue
            if not route.any_host and host not in route.exact_hosts:
                for suffix in route.wild_hosts:
                    if host.endswith(suffix) and len(host) > len(suffix):
                        break
                else:
                    continue
            found = None
            kind = route.kind
            if kind == _PREFIX:
                plen = route.plen
                if plen and not (
                    path.startswith(route.prefix) and (len(path) == plen or path[plen] == _SLASH)
                ):
                    continue
            elif kind == _EXACT:
                if path != route.path:
                    continue
            else:
                found = route.regex.fullmatch(path)  # type: ignore[union-attr]
                if found is None:
                    continue
            if route.headers and not all(check.holds(headers) for check in route.headers):
                continue
            return route, found
        return None
