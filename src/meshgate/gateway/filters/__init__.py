"""Gateway filters: per-route policies, built once from validated config.

One contract (:class:`Filter`): ``request(exchange)`` runs when the exchange is
dispatched (after routing, with the upstream request head already built) and
returns None to go on, a complete response (bytes) to answer with instead of the
upstream, or an awaitable of either (for a Redis round trip or a key fetch).
``response(exchange, headers)`` may rewrite the response's header lines. Filters
change the request through :meth:`Exchange.add_request_lines` and
:meth:`Exchange.drop_request_headers`, and add response headers to
``exchange.resp_extra``.

A filter fails at build time (its config is validated), never per request. The
order is written in one place, :func:`build_chain`: ip, cors, mtls, auth,
rate_limit, headers; a route without filters has no chain and pays nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from meshgate.gateway.http import error_response
from meshgate.gateway.resp import Deferred

if TYPE_CHECKING:
    from meshgate.config.model import Config, RouteSettings
    from meshgate.gateway.server import Exchange

__all__ = ["PENDING", "Chain", "Filter", "Verdict", "build_chain", "reply"]

log = logging.getLogger("meshgate.gateway.filters")

Verdict = bytes | Awaitable[bytes | None] | Deferred | None
"""What a filter's request phase returns: go on, answer, or wait for either."""


class Filter(Protocol):
    """A per-route policy."""

    name: str
    """The filter's name, in metrics and logs."""

    def request(self, exchange: Exchange) -> Verdict:
        """Decide on a request: None to go on, bytes to answer, or an awaitable."""
        ...


class ResponseFilter(Protocol):
    """A filter that also rewrites the response's header lines."""

    def response(self, exchange: Exchange, headers: bytes) -> bytes:
        """The header lines (each ending in CRLF) to send instead of ``headers``."""
        ...


def reply(
    exchange: Exchange,
    status: int,
    error: str,
    detail: str,
    *,
    headers: bytes = b"",
) -> bytes:
    """A complete problem-details error response for ``exchange``, answered by a filter."""
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


class Chain:
    """A route's filters, in order.

    :meth:`run` goes through them until one answers or waits. A filter that waits
    returns an :class:`asyncio.Future` (cheap: resumed by a callback) or any other
    awaitable (run as a task); the chain then resumes from the next filter when it
    completes and reports the outcome to the exchange.
    """

    name = "chain"

    __slots__ = ("filters", "response_filters")

    def __init__(self, filters: Sequence[Filter]) -> None:
        self.filters = tuple(filters)
        self.response_filters: tuple[ResponseFilter, ...] = tuple(
            f  # type: ignore[misc]
            for f in filters
            if hasattr(f, "response")
        )

    def run(self, exchange: Exchange, start: int = 0) -> object:
        """None (all passed), bytes (the answer), or :data:`PENDING`: the exchange
        hears later, through ``exchange.filters_passed()`` or ``exchange.answer()``."""
        filters = self.filters
        for index in range(start, len(filters)):
            verdict = filters[index].request(exchange)
            if verdict is None:
                continue
            if isinstance(verdict, bytes):
                return verdict
            waiting = verdict if hasattr(verdict, "add_done_callback") else _future(verdict)
            waiting.add_done_callback(partial(self._resume, exchange, index + 1))
            return PENDING
        return None

    def _resume(self, exchange: Exchange, start: int, done: Deferred | asyncio.Future[Any]) -> None:
        if exchange.done:
            return
        try:
            verdict = done.result()
        except Exception:
            log.exception("a filter failed on route %s", exchange.route.name)  # type: ignore[union-attr]
            exchange.fail(500, "internal_error", "the gateway failed to handle the request")
            return
        outcome: object = verdict
        if outcome is None:
            outcome = self.run(exchange, start)
            if outcome is PENDING:
                return
        if outcome is None:
            exchange.filters_passed()
        else:
            exchange.answer(outcome)  # type: ignore[arg-type]

    def response(self, exchange: Exchange, headers: bytes) -> bytes:
        for item in self.response_filters:
            headers = item.response(exchange, headers)
        return headers


def _future(awaitable: Awaitable[bytes | None]) -> asyncio.Future[bytes | None]:
    return asyncio.ensure_future(awaitable)


PENDING = object()
"""What :meth:`Chain.run` returns when a filter is waiting."""


def build_chain(route: RouteSettings, config: Config) -> Chain | None:
    """The filters ``route`` asks for, in the one order they run; None if none."""
    from meshgate.gateway.filters.auth import AuthFilter  # noqa: PLC0415
    from meshgate.gateway.filters.cors import CorsFilter  # noqa: PLC0415
    from meshgate.gateway.filters.headers import HeaderFilter  # noqa: PLC0415
    from meshgate.gateway.filters.ip import IpFilter, MtlsFilter  # noqa: PLC0415
    from meshgate.gateway.filters.ratelimit import RateLimitFilter  # noqa: PLC0415

    filters: list[Filter] = []
    if route.ip is not None:
        filters.append(IpFilter(route.ip, config))
    if route.cors is not None:
        filters.append(CorsFilter(route.cors))
    if route.mtls:
        filters.append(MtlsFilter())
    if route.auth is not None:
        filters.append(AuthFilter(route.auth, config))
    if route.rate_limit is not None:
        filters.append(RateLimitFilter(route.rate_limit, route.name, config))
    if route.headers is not None:
        filters.append(HeaderFilter(route.headers))
    return Chain(filters) if filters else None
