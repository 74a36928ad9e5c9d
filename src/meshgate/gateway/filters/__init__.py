"""Gateway filters: per-route policies, built once from validated config.

The contract is :mod:`meshgate.gateway.contract`: ``request(exchange)`` runs when the
exchange is dispatched (after routing, with the upstream request head already built)
and returns None to go on, a complete response (bytes) to answer with instead of the
upstream, or something to wait for (a Redis round trip, a key fetch).
``response(exchange, headers)`` may rewrite the response's header lines. One module per
filter; :class:`Chain` runs a route's filters and is a filter itself.

A filter fails at build time (its config is validated), never per request. The
order is written in one place, :func:`build_chain`: ip, cors, mtls, auth,
rate_limit, headers; a route without filters has no chain and pays nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from meshgate.gateway.contract import (
    PENDING,
    BuildContext,
    Deferred,
    Filter,
    FilterExchange,
    ResponseFilter,
    Verdict,
    reply,
)

if TYPE_CHECKING:
    from meshgate.config.model import Config, RouteSettings

__all__ = [
    "PENDING",
    "BuildContext",
    "Chain",
    "Filter",
    "ResponseFilter",
    "Verdict",
    "build_chain",
    "reply",
]

log = logging.getLogger("meshgate.gateway.filters")


class Chain:
    """A route's filters, in order; itself a filter.

    :meth:`request` goes through them until one answers or waits. A filter that waits
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

    def request(self, exchange: FilterExchange) -> Verdict:
        """As a filter (a chain inside a chain): None (all passed), bytes (the answer),
        or a :class:`Deferred` that settles with either once a waiting filter is done."""
        return self.run(exchange, 0, _NESTED)  # type: ignore[return-value]

    def run(
        self, exchange: FilterExchange, start: int = 0, settle: Deferred | object | None = None
    ) -> object:
        """Run the filters from ``start`` on: None (all passed), bytes (the answer), or,
        when one waits, :data:`PENDING` (the exchange hears the outcome later, through
        ``exchange.filters_passed()`` or ``exchange.answer()``) or, for a nested chain
        (``settle``), the :class:`Deferred` that will carry it."""
        filters = self.filters
        for index in range(start, len(filters)):
            verdict = filters[index].request(exchange)
            if verdict is None:
                continue
            if isinstance(verdict, bytes):
                return verdict
            waiting = verdict if hasattr(verdict, "add_done_callback") else _future(verdict)
            report = Deferred() if settle is _NESTED else settle
            assert report is None or isinstance(report, Deferred)  # noqa: S101 - for mypy
            waiting.add_done_callback(partial(self._resume, exchange, index + 1, report))
            return PENDING if report is None else report
        return None

    def _resume(
        self,
        exchange: FilterExchange,
        start: int,
        settle: Deferred | None,
        done: Deferred | asyncio.Future[Any],
    ) -> None:
        if exchange.done:
            return
        try:
            verdict = done.result()
        except Exception as exc:
            if settle is not None:
                settle.set_exception(exc)  # the enclosing chain reports it
                return
            log.exception("a filter failed on route %s", exchange.route.name)  # type: ignore[union-attr]
            exchange.fail(500, "internal_error", "the gateway failed to handle the request")
            return
        outcome: object = verdict
        if outcome is None:
            outcome = self.run(exchange, start, settle)
            if outcome is PENDING or (settle is not None and outcome is settle):
                return
        if settle is not None:
            settle.set_result(outcome)
        elif outcome is None:
            exchange.filters_passed()
        else:
            exchange.answer(outcome)  # type: ignore[arg-type]

    def response(self, exchange: FilterExchange, headers: bytes) -> bytes:
        for item in self.response_filters:
            headers = item.response(exchange, headers)
        return headers


_NESTED = object()
"""``settle`` of a chain run as a filter: report through a Deferred, made when needed."""


def _future(awaitable: Awaitable[bytes | None]) -> asyncio.Future[bytes | None]:
    return asyncio.ensure_future(awaitable)


def build_chain(route: RouteSettings, config: Config, index: int) -> Chain | None:
    """The filters ``route`` (``config.routes[index]``) asks for, in the one order they
    run; None if none."""
    from meshgate.gateway.filters.auth import AuthFilter  # noqa: PLC0415
    from meshgate.gateway.filters.cors import CorsFilter  # noqa: PLC0415
    from meshgate.gateway.filters.headers import HeaderFilter  # noqa: PLC0415
    from meshgate.gateway.filters.ip import IpFilter, MtlsFilter  # noqa: PLC0415
    from meshgate.gateway.filters.ratelimit import RateLimitFilter  # noqa: PLC0415

    ctx = BuildContext(
        path=f"routes[{index}]",
        route=route.name,
        trusted_proxies=config.gateway.trusted_proxies,
        consumers=config.consumers,
    )
    filters: list[Filter] = []
    if route.ip is not None:
        filters.append(IpFilter(route.ip, ctx))
    if route.cors is not None:
        filters.append(CorsFilter(route.cors))
    if route.mtls:
        filters.append(MtlsFilter())
    if route.auth is not None:
        filters.append(AuthFilter(route.auth, ctx))
    if route.rate_limit is not None:
        filters.append(RateLimitFilter(route.rate_limit, ctx))
    if route.headers is not None:
        filters.append(HeaderFilter(route.headers))
    return Chain(filters) if filters else None
