"""The filter contract: what a route policy (a filter) and a balancer may see and do.

A filter is built once from its validated settings and a :class:`BuildContext`, and
fails at build time (a :class:`~meshgate.errors.ConfigError` naming its config path),
never per request. For each request its :meth:`Filter.request` gets the exchange as a
:class:`FilterExchange` and returns a :data:`Verdict`: None to go on, a complete
response (bytes, see :func:`reply`) to answer instead of the upstream, or something to
wait for (an :class:`asyncio.Future`, another awaitable, or a :class:`Deferred`). A
:class:`ResponseFilter` may also rewrite the response's header lines.

This module is a leaf: filters and balancers import it, never the data plane, so a
filter author reads this file (and :mod:`meshgate.gateway.http`), not the protocol code.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from meshgate.gateway.http import error_response

if TYPE_CHECKING:
    from meshgate.config.model import ConsumerSettings
    from meshgate.gateway.metrics import RouteStats

__all__ = [
    "PENDING",
    "BuildContext",
    "Deferred",
    "Filter",
    "FilterClient",
    "FilterExchange",
    "FilterRoute",
    "ResponseFilter",
    "Verdict",
    "reply",
]

log = logging.getLogger("meshgate.gateway.filters")


class Deferred:
    """A result that is not there yet, without the event loop: unlike an asyncio
    future, its callbacks run at once when it settles (in the settling
    ``data_received``), which spares each waiting request a turn of the loop. It
    offers what the filter chain uses of a future."""

    __slots__ = ("_callbacks", "_done", "_exception", "_result")

    def __init__(self) -> None:
        self._callbacks: list[Callable[[Any], object]] = []
        self._done = False
        self._result: Any = None
        self._exception: BaseException | None = None

    def done(self) -> bool:
        return self._done

    def cancelled(self) -> bool:
        return False  # nothing cancels it once it is queued

    def result(self) -> Any:
        if self._exception is not None:
            raise self._exception
        return self._result

    def exception(self) -> BaseException | None:
        return self._exception

    def set_result(self, value: Any) -> None:
        self._result = value
        self._settled()

    def set_exception(self, exc: BaseException) -> None:
        self._exception = exc
        self._settled()

    def add_done_callback(self, callback: Callable[[Any], object]) -> None:
        if self._done:
            _call(callback, self)
        else:
            self._callbacks.append(callback)

    def _settled(self) -> None:
        self._done = True
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            _call(callback, self)


def _call(callback: Callable[[Any], object], done: Any) -> None:
    # What the event loop does for a future's callback: a failure is logged and goes
    # no further (not into whatever settled the result).
    try:
        callback(done)
    except Exception:
        log.exception("a callback on a deferred result failed")


Verdict = bytes | Awaitable[bytes | None] | Deferred | None
"""What a filter's request phase returns: go on, answer, or wait for either."""

PENDING = object()
"""What a chain returns when one of its filters is waiting: the exchange hears the
outcome later, through :meth:`FilterExchange.filters_passed` or
:meth:`FilterExchange.answer`."""


class FilterClient(Protocol):
    """The client connection, as filters and balancers see it."""

    @property
    def peer_ip(self) -> str:
        """The peer's address, in canonical form (IPv4-mapped IPv6 as IPv4)."""
        ...

    @property
    def peer_trusted(self) -> bool:
        """Whether the peer is in ``gateway.trusted_proxies``."""
        ...

    @property
    def peer_cert(self) -> bool:
        """Whether the listener verified a client certificate (mTLS)."""
        ...


class _Named(Protocol):
    @property
    def name(self) -> str: ...


class FilterRoute(Protocol):
    """The matched route, as filters see it."""

    @property
    def name(self) -> str: ...

    @property
    def stats(self) -> RouteStats:
        """The route's counters (filters count their own events there)."""
        ...

    @property
    def upstream(self) -> _Named: ...


class FilterRuntime(Protocol):
    """The compiled configuration, as filters see it."""

    @property
    def rid_name(self) -> bytes:
        """The request id header's name."""
        ...

    @property
    def rid_prefix(self) -> bytes:
        """``<request id header>: ``, to write the header line."""
        ...


class FilterExchange(Protocol):
    """One request and its response, as filters and balancers see it.

    The request's head is already built for the upstream when filters run; they change
    it through the methods below, and add response header lines to :attr:`resp_extra`.
    """

    headers: list[tuple[bytes, bytes]]
    """The client's header fields as received (name, value)."""
    url: bytes
    """The request target as received."""
    method: bytes
    request_id: bytes
    status: int
    keep_alive: bool
    """Whether the client connection stays open after the response (a filter that
    answers while a body is still arriving clears it, see :func:`reply`)."""
    req_done: bool
    """Whether the whole request, body included, has been read."""
    has_body: bool
    done: bool
    resp_extra: bytes
    """Header lines (each ending in CRLF) added to the response, errors included."""
    set_cookie: bytes
    """A ``Set-Cookie`` line of a sticky-session balancer."""
    consumer: str | None
    """The authenticated caller (set by the auth filter)."""
    spoofed: bool
    """The client sent a header that the auth filter owns."""

    @property
    def client(self) -> FilterClient: ...

    @property
    def route(self) -> FilterRoute | None: ...

    @property
    def rt(self) -> FilterRuntime: ...

    def append_request_lines(self, lines: bytes) -> None:
        """Add header lines (each ending in CRLF) to the upstream request."""
        ...

    def rewrite_request_headers(self, rewrite: Callable[[bytes], bytes]) -> None:
        """Replace the forwarded header lines with ``rewrite(lines)``."""
        ...

    def request_target(self) -> bytes:
        """The target (path and query) the upstream request carries now."""
        ...

    def set_request_target(self, target: bytes) -> None:
        """Forward ``target`` instead."""
        ...

    def filters_passed(self) -> None:
        """A waiting chain let the request through: go on to the upstream."""
        ...

    def answer(self, response: bytes) -> None:
        """A waiting chain answers: send ``response`` and end the exchange."""
        ...

    def fail(self, status: int, error: str, detail: str, *, headers: bytes = b"") -> None:
        """End the exchange with an error response."""
        ...


class Filter(Protocol):
    """A per-route policy."""

    name: str
    """The filter's name, in metrics and logs."""

    def request(self, exchange: FilterExchange) -> Verdict:
        """Decide on a request: None to go on, bytes to answer, or something to wait for."""
        ...


class ResponseFilter(Protocol):
    """A filter that also rewrites the response's header lines."""

    def response(self, exchange: FilterExchange, headers: bytes) -> bytes:
        """The header lines (each ending in CRLF) to send instead of ``headers``."""
        ...


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class BuildContext:
    """What a filter is built with besides its own settings."""

    path: str
    """Where the route is in the configuration (``routes[3]``), for error messages."""
    route: str
    """The route's name."""
    trusted_proxies: tuple[Network, ...] = ()
    """``gateway.trusted_proxies``."""
    consumers: Mapping[str, ConsumerSettings] | None = None
    """``consumers``: the API key holders."""

    def at(self, field: str) -> str:
        """The config path of the route's ``field`` (``routes[3].auth``)."""
        return f"{self.path}.{field}"


def reply(
    exchange: FilterExchange,
    status: int,
    error: str,
    detail: str,
    *,
    headers: bytes = b"",
) -> bytes:
    """A complete problem-details error response for ``exchange``, answered by a filter
    (the exchange answers its own errors with the same builder,
    :func:`~meshgate.gateway.http.error_response`)."""
    # A request whose body is still on its way ends the connection: what is left of
    # it would otherwise be read and thrown away.
    exchange.keep_alive = exchange.keep_alive and (exchange.req_done or not exchange.has_body)
    exchange.status = status
    route = exchange.route
    return error_response(
        status,
        error,
        detail,
        request_id=exchange.request_id,
        request_id_header=exchange.rt.rid_name,
        route=route.name if route is not None else None,
        close=not exchange.keep_alive,
        extra_headers=headers + exchange.resp_extra if exchange.resp_extra else headers,
        instance=exchange.url,
    )
