"""The HTTP API of a service's sagas, on the service's own port (not routed by the
gateway): what ``meshgate sagas`` asks.

- ``GET /meshgate/sagas?status=stuck&name=place-order&limit=50``: the sagas, newest
  first, and how many have each status;
- ``GET /meshgate/sagas/{id}``: one saga with every attempt of every step (timing,
  error, result);
- ``POST /meshgate/sagas/{id}/retry``: compensate a ``stuck`` saga again.

Errors are RFC 9457 problem details (``application/problem+json``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse

from meshgate.errors import PROBLEM_MEDIA_TYPE, problem_document
from meshgate.events.errors import EventsError, SagaNotFoundError
from meshgate.events.sagas import STATUSES

if TYPE_CHECKING:
    from meshgate.events.core import Events

__all__ = ["PREFIX", "saga_routes"]

PREFIX = "/meshgate/sagas"


def _problem(status: int, title: str, detail: str) -> JSONResponse:
    code = title.lower().replace(" ", "_")
    return JSONResponse(
        problem_document(status, code, detail, title=title),
        status_code=status,
        media_type=PROBLEM_MEDIA_TYPE,
    )


def saga_routes(events: Events) -> APIRouter:
    """The routes, over ``events``' sagas."""
    router = APIRouter(prefix=PREFIX, include_in_schema=False)

    def runner_or_404() -> Any:
        if events._sagas is None or not events._sagas.sagas:
            return None
        return events._sagas

    def none_here() -> JSONResponse:
        return _problem(
            404,
            "No sagas",
            f"service {events.service!r} drives no sagas (service.events.saga(...))",
        )

    @router.get("")
    async def list_sagas(
        status: Annotated[str | None, Query()] = None,
        name: Annotated[str | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> Any:
        runner = runner_or_404()
        if runner is None:
            return none_here()
        if status is not None and status not in STATUSES:
            return _problem(
                400,
                "Bad status",
                f"status {status!r} is not one of {', '.join(STATUSES)}",
            )
        return {
            "service": events.service,
            "sagas": await runner.list(status=status, name=name, limit=limit),
            "counts": await runner.counts(),
            "names": sorted(runner.sagas),
        }

    @router.get("/{saga_id}")
    async def show_saga(saga_id: str) -> Any:
        runner = runner_or_404()
        if runner is None:
            return none_here()
        try:
            return {"service": events.service, **(await runner.get(saga_id))}
        except SagaNotFoundError as exc:
            return _problem(404, "No such saga", str(exc))

    @router.post("/{saga_id}/retry", status_code=202)
    async def retry_saga(saga_id: str) -> Any:
        runner = runner_or_404()
        if runner is None:
            return none_here()
        try:
            return {"service": events.service, **(await runner.retry(saga_id))}
        except SagaNotFoundError as exc:
            return _problem(404, "No such saga", str(exc))
        except EventsError as exc:
            return _problem(409, "Not stuck", str(exc))

    return router
